import json

import pytest
import torch
from safetensors.torch import load_file

from tinyml_cli.core.model import load_model
from tinyml_cli.stages.sft import run_sft


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_pretrain_align_trains_only_the_connector(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.parts=connector", "train.lr=1e-2")
    r = run_sft(cfg, tmp_path / "align", "pretrain-align")
    from tinyml_cli.core.model import build_model
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg.model)
    trained = load_model(tmp_path / "align")
    assert _same(_snapshot(fresh.vision), _snapshot(trained.vision))
    assert _same(_snapshot(fresh.llm), _snapshot(trained.llm))
    assert not _same(_snapshot(fresh.connector), _snapshot(trained.connector))
    assert r["trainable_params"] == sum(p.numel() for p in fresh.connector.parameters())
    assert r["total_params"] > r["trainable_params"]
    assert (tmp_path / "align" / "config.yaml").is_file()
    lines = (tmp_path / "align" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 3


def test_vision_first_layers_stay_frozen(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.parts=connector,llm,vision", "train.vision_freeze_first_n=1", "train.lr=1e-2")
    run_sft(cfg, tmp_path / "share", "sft")
    from tinyml_cli.core.model import build_model
    torch.manual_seed(cfg.train.seed)
    before = _snapshot(build_model(cfg.model).vision)
    after = _snapshot(load_model(tmp_path / "share").vision)
    frozen = [n for n in before if ".layers.0." in n or "embeddings" in n]
    trained = [n for n in before if ".layers.2." in n]
    assert frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in trained)


def test_loss_goes_down(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.parts=connector,llm", "train.lr=3e-3", "train.max_steps=25", "train.log_every=1",
                   "train.batch_size=8")
    run_sft(cfg, tmp_path / "run", "sft")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_resume_after_crash_gives_identical_weights(tiny_cfg, sft_crashing_at, tmp_path):
    cfg = tiny_cfg("train.parts=connector,llm", "train.lr=3e-3", "train.max_steps=6", "train.save_every=3")
    run_sft(cfg, tmp_path / "full", "sft")
    sft_crashing_at(cfg, tmp_path / "resumed", 5)
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000003" / "meta.json").is_file()
    r = run_sft(cfg, tmp_path / "resumed", "sft", resume=True)
    assert r["metrics"]["resumed_from"] == 3
    for f in ["connector.safetensors", "llm/model.safetensors"]:
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "resumed" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), f


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model, shapes, tiny_cfg, tmp_path):
    from tinyml_cli.core.batching import Collator, ImageLoader
    from tinyml_cli.core.loop import ExampleBatches, latest_checkpoint, sft_step, train
    from tinyml_cli.core.trainable import configure_trainable
    from tinyml_cli.records.conversations import load_examples
    from tinyml_cli.records.encoder import Encoder
    cfg = tiny_cfg("train.max_steps=5", "train.save_every=2")
    enc = Encoder(tiny_model.tokenizer, tiny_model.num_image_tokens, 256)
    ex, _ = load_examples(shapes / "train.jsonl", enc)
    calls = []

    def step(model, batch):
        loss, n, m = sft_step(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), n, m
    configure_trainable(tiny_model, cfg)
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(tiny_model, ExampleBatches(ex, Collator(tiny_model.tokenizer.pad_token_id, ImageLoader(tiny_model.image_processor))),
              step, cfg.train, tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_failed_checkpoint_write_keeps_previous(tiny_model, tiny_cfg, tmp_path, monkeypatch):
    from tinyml_cli import UserError
    from tinyml_cli.core import loop as train_mod
    from tinyml_cli.core.trainable import configure_trainable
    configure_trainable(tiny_model, tiny_cfg())
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_mod.save_checkpoint(tmp_path, 1, tiny_model, opt, sched, keep_last=2)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        train_mod.save_checkpoint(tmp_path, 2, tiny_model, opt, sched, keep_last=2)
    assert train_mod.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_half_written_checkpoint_is_never_latest(tmp_path):
    from tinyml_cli.core.loop import latest_checkpoint
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000004" / "meta.json").write_text('{"step": 4}')
    (tmp_path / "checkpoints" / ".tmp-step-00000006").mkdir()
    (tmp_path / "checkpoints" / "step-00000008").mkdir()  # no meta.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_qlora_loads_the_llm_in_4bit_nf4_with_double_quantization(tiny_cfg):
    """QLoRA's base on CPU (bitsandbytes' CPU backend): NF4 weights, quantized constants, the compute dtype asked
    for; LoRA on top. (That it trains, keeps the 4-bit base bit-identical and reloads: test_peft_methods.py.)"""
    import bitsandbytes as bnb

    from tinyml_cli.core.model import build_model
    from tinyml_cli.core.trainable import configure_trainable, quantization_config

    cfg = tiny_cfg("peft.method=qlora", "peft.r=4", "train.parts=[]")
    model = build_model(cfg.model, quantization_config=quantization_config(cfg, torch.float32))
    configure_trainable(model, cfg)
    linears = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * model.llm.config.num_hidden_layers  # every linear layer but the output head
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested and m.compute_dtype == torch.float32
               for m in linears)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

import json

import pytest
import torch
from safetensors.torch import load_file

from tinyml_cli.model import load_model
from tinyml_cli.sft import run_sft


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_pretrain_align_trains_only_the_connector(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.parts=connector", "train.lr=1e-2")
    r = run_sft(cfg, tmp_path / "align", "pretrain-align")
    from tinyml_cli.model import build_model
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
    from tinyml_cli.model import build_model
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


def test_resume_after_crash_gives_identical_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.parts=connector,llm", "train.lr=3e-3", "train.max_steps=6", "train.save_every=3")
    run_sft(cfg, tmp_path / "full", "sft")

    class Crash(Exception):
        pass

    def crash_at_5(step, total, loss, tps):
        if step == 5:
            raise Crash()
    with pytest.raises(Crash):
        run_sft(cfg, tmp_path / "resumed", "sft", progress=crash_at_5)
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000003" / "meta.json").is_file()
    r = run_sft(cfg, tmp_path / "resumed", "sft", resume=True)
    assert r["metrics"]["resumed_from"] == 3
    for f in ["connector.safetensors", "llm/model.safetensors"]:
        a, b = load_file(tmp_path / "full" / f), load_file(tmp_path / "resumed" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), f


def test_lora_sft_saves_peft_adapter_and_loads(tiny_cfg, tmp_path, shapes):
    cfg = tiny_cfg("peft.method=lora", "peft.r=4", "train.parts=connector", "train.lr=1e-2")
    r = run_sft(cfg, tmp_path / "lora", "sft")
    out = tmp_path / "lora"
    assert (out / "llm_adapter" / "adapter_config.json").is_file()
    assert (out / "llm_adapter" / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(out / "llm")
    PeftModel.from_pretrained(base, out / "llm_adapter")
    model = load_model(out)
    assert hasattr(model.llm, "peft_config")
    # LoRA trains the adapters and the connector, a small part of the model
    assert 0 < r["trainable_params"] < r["total_params"] / 2

"""tinyml merge: adapters folded into full weights give the adapter model's logits (QLoRA: over its
dequantized 4-bit base); methods that cannot fold are refused."""

import json
import subprocess
import sys

import pytest
import torch

from tinyml_cli import UserError
from tinyml_cli.core.batching import Collator, ImageLoader
from tinyml_cli.core.model import build_model, load_model
from tinyml_cli.core.trainable import configure_trainable, quantization_config
from tinyml_cli.records.conversations import load_examples
from tinyml_cli.records.encoder import Encoder
from tinyml_cli.stages.merge import merge_run


def _run_folder(tiny_cfg, tmp_path, method, *sets):
    """A saved run whose adapters are far from their no-op start, as after training."""
    cfg = tiny_cfg(f"peft.method={method}", "peft.r=4", *sets)
    torch.manual_seed(0)
    model = build_model(cfg.model, quantization_config=quantization_config(cfg, torch.float32))
    configure_trainable(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(1.0 if "ia3_l" in n or "magnitude" in n else 0.0, 0.1)
    model.save(tmp_path / "run")  # before any eval forward: bitsandbytes repacks 4-bit weights on the first one
    return tmp_path / "run"


def _logits(folder, shapes):
    model = load_model(folder).eval()
    enc = Encoder(model.tokenizer, model.num_image_tokens, 256)
    ex, _ = load_examples(shapes / "eval.jsonl", enc)
    b = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))(ex[:3])
    with torch.no_grad():
        return model(b["input_ids"], b["attention_mask"], b["pixel_values"])


@pytest.mark.parametrize("method,sets,atol", [
    ("lora", [], 1e-4), ("dora", [], 1e-4), ("ia3", [], 1e-4),
    ("lora", ["peft.parts=[llm,vision,connector]"], 1e-4),
    pytest.param("bitfit", ["peft.parts=[vision,connector]"], 0.0, marks=pytest.mark.slow),  # via the CLI
    # QLoRA: bitsandbytes' fast CPU inference kernel computes in bf16 (0.05 off here), far inside the 4-bit
    # quantization error (1.7 on these logits against the fp32 base); with its exact kernel, see below, 1e-4
    ("qlora", [], 0.1)])
def test_merged_model_gives_the_adapter_model_s_logits(tiny_cfg, shapes, tmp_path, method, sets, atol):
    run, merged = _run_folder(tiny_cfg, tmp_path, method, *sets), tmp_path / "merged"
    if method == "bitfit":  # through the command line, as users run it
        p = subprocess.run([sys.executable, "-m", "tinyml_cli", "merge", str(run), str(merged), "--json"],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout.strip().splitlines()[-1])
    else:
        r = merge_run(run, merged)
    if method == "lora" and sets:
        assert {a.name for a in run.glob("*_adapter")} == {"llm_adapter", "vision_adapter", "connector_adapter"}
    assert not list(merged.glob("*_adapter"))
    conf = json.loads((merged / "llm" / "config.json").read_text())
    assert "quantization_config" not in conf
    back = load_model(merged)
    assert not back.peft_parts()
    assert all(p.dtype == torch.float32 for p in back.llm.parameters())  # full precision, QLoRA included
    assert r["metrics"]["dequantized_4bit_base"] == (method == "qlora")
    ref, out = _logits(run, shapes), _logits(merged, shapes)
    assert torch.allclose(out, ref, atol=atol, rtol=atol), (out - ref).abs().max()  # fp32 rounding: W x + B A x vs (W + B A) x
    if method == "qlora":  # the fp32 merge is exact against the 4-bit model run with bitsandbytes' exact kernel
        exact = load_model(run)
        for m in exact.llm.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        assert torch.allclose(_logits_of(exact, shapes), out, atol=1e-4, rtol=1e-4)
    if method != "bitfit":  # the adapters matter: the base alone answers differently
        base = load_model(run, adapter=False).eval()
        base.llm = base.llm.dequantize(dtype=torch.float32) if method == "qlora" else base.llm
        assert not torch.allclose(_logits(merged, shapes), _logits_of(base, shapes), atol=1e-2)


def _logits_of(model, shapes):
    enc = Encoder(model.tokenizer, model.num_image_tokens, 256)
    ex, _ = load_examples(shapes / "eval.jsonl", enc)
    b = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))(ex[:3])
    with torch.no_grad():
        return model.eval()(b["input_ids"], b["attention_mask"], b["pixel_values"])


@pytest.mark.parametrize("method,match", [("adapter", "non-linear"), ("prompt-tuning", "learned tokens")])
def test_methods_that_cannot_fold_are_refused(tiny_cfg, tmp_path, method, match):
    run = _run_folder(tiny_cfg, tmp_path, method)
    with pytest.raises(UserError, match=match):
        merge_run(run, tmp_path / "merged")


def test_merge_cli_refuses_to_overwrite(tiny_cfg, tmp_path):
    run = _run_folder(tiny_cfg, tmp_path, "lora")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("x")
    p = subprocess.run([sys.executable, "-m", "tinyml_cli", "merge", str(run), str(tmp_path / "merged")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr

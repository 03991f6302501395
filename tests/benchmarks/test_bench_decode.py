"""benchmarks/decode.py end to end on the tiny model: its JSON carries the ratios, and the fp32 ONNX export
decodes the same greedy tokens as the eager PyTorch model (the comparison is between equal functions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


@pytest.mark.slow
def test_decode_benchmark_reports_ratios_of_equal_models(tiny_model, shapes, tmp_path):
    tiny_model.save(tmp_path / "model")
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", "--work", str(tmp_path / "work"),
                          "--model", str(tmp_path / "model"), "--data", str(shapes / "eval.jsonl"),
                          "--prompts", "2", "--new-tokens", "6", "--repeats", "1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    r = out["ratios"]
    assert r["int4_vs_eager"] > 0 and r["fp32_onnx_vs_eager"] > 0
    assert r["fp32_onnx_greedy_match"] == 1.0
    assert out["sides"]["eager"]["tokens"] == out["sides"]["fp32_onnx"]["tokens"] > 0
    assert out["sides"]["int4_onnx"]["bytes"] < out["sides"]["fp32_onnx"]["bytes"] / 3
    # the side the peers are compared with: tinyml's int4 on their text prompts (the image tokens left out)
    text = out["sides"]["int4_onnx_text"]
    assert text["prompt_tokens"] == out["sides"]["int4_onnx"]["prompt_tokens"] - tiny_model.num_image_tokens
    assert 0 <= r["int4_text_greedy_match"] <= 1
    for peer in ("ortgenai_int4", "llamacpp_q4_0"):
        if "skipped" not in out["sides"][peer]:
            assert out["sides"][peer]["prompt_tokens"] == text["prompt_tokens"]
    for side in ("eager", "fp32_onnx", "int4_onnx", "int4_onnx_text"):  # prefill and decode measured apart
        assert out["sides"][side]["prefill_tokens_per_s"] > 0 and out["sides"][side]["decode_tokens_per_s"] >= 0
    # the peers: measured where their runtime is installed, else named as skipped; the ratio keys always there
    assert {"int4_vs_llamacpp_q4_0", "int4_vs_llamacpp_q8_0", "int4_vs_ortgenai"} <= set(r)
    for side, ratio in (("ortgenai_int4", "int4_vs_ortgenai"), ("llamacpp_q4_0", "int4_vs_llamacpp_q4_0")):
        assert ("skipped" in out["sides"][side]) == (r[ratio] is None)
    # the int4 sides follow --eight-bit: the cached int4 copy is made again when the setting differs
    assert out["setting"]["int4_eight_bit"] == ["lm_head", "q_proj", "k_proj", "v_proj", "down_proj"]
    sys.path.insert(0, str(SCRIPT.parent))
    import decode
    sizes = decode.exports(str((tmp_path / "model").resolve()), tmp_path / "work", ())
    meta = json.loads((tmp_path / "work" / "onnx-int4" / "tinyml_onnx.json").read_text())
    assert meta["quantization"]["eight_bit"] == [] and sizes["int4_onnx"] < out["sides"]["int4_onnx"]["bytes"]

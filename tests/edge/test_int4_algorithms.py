"""int4 algorithms (edge.int4): k-quant, HQQ and GPTQ write MatMulNBits graphs the runner decodes; GPTQ needs calibration."""

import pytest


def _ops(path) -> set:
    import onnx
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_kquant_hqq_and_gptq_quantize_the_decoder_and_the_runner_decodes_them(exported, tmp_path):
    from tinyml_cli.edge.int4 import quantize_onnx
    from tinyml_cli.edge.runner import OnnxLMM
    fp32 = OnnxLMM(exported)
    prompt = fp32.tokenizer(fp32.tokenizer.apply_chat_template([{"role": "user", "content": "What color?"}],
                                                               add_generation_prompt=True))["input_ids"]
    calib = [fp32.prefill_feed(prompt + [i], []) for i in range(20, 24)]
    ref = fp32.generate([prompt], [[]], 4)[0]
    for algo in ("kquant", "hqq", "gptq"):
        r = quantize_onnx(exported, tmp_path / algo, 32, algorithm=algo, calibration=list(calib))
        assert r["size_ratio"] < 0.35
        assert "MatMulNBits" in _ops(tmp_path / algo / "decoder.onnx")
        got = OnnxLMM(tmp_path / algo).generate([prompt], [[]], 4)[0]
        assert len(got) == len(ref) == 4 and all(0 <= t < 10_000 for t in got)
    rtn = quantize_onnx(exported, tmp_path / "rtn", 32)
    assert rtn["size_ratio"] == pytest.approx(r["size_ratio"], rel=0.05)


def test_gptq_without_calibration_and_unknown_algorithms_are_refused(exported, tmp_path):
    from tinyml_cli import UserError
    from tinyml_cli.edge.int4 import quantize_onnx
    with pytest.raises(UserError, match="gptq needs calibration"):
        quantize_onnx(exported, tmp_path / "a", algorithm="gptq")
    with pytest.raises(UserError, match="must be one of rtn, kquant, hqq, gptq"):
        quantize_onnx(exported, tmp_path / "b", algorithm="awq")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eight_bit_projections_are_8bit_matmulnbits_and_closer_to_fp32(exported, tmp_path):
    """`eight_bit` keeps the named decoder projections (and lm_head) at 8 bits, everything else at 4; `()` is
    4 bits throughout."""
    import numpy as np
    import onnx

    from tinyml_cli import UserError
    from tinyml_cli.edge.int4 import quantize_onnx
    from tinyml_cli.edge.runner import OnnxLMM
    plain = quantize_onnx(exported, tmp_path / "q4", 32, algorithm="rtn", eight_bit=())
    mixed = quantize_onnx(exported, tmp_path / "mix", 32, algorithm="rtn", eight_bit=("lm_head", "v_proj", "down_proj"))
    bits = {n.name: a.i for n in onnx.load(str(tmp_path / "mix" / "decoder.onnx")).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    eight = {n for n, b in bits.items() if b == 8}
    assert eight and all(("/v_proj/" in n or "/down_proj/" in n or "lm_head" in n) for n in eight)
    assert any("lm_head" in n for n in eight) and {b for n, b in bits.items() if n not in eight} == {4}
    assert mixed["size_ratio"] > plain["size_ratio"]
    assert not [n for n in onnx.load(str(tmp_path / "q4" / "decoder.onnx")).graph.node
                for a in n.attribute if a.name == "bits" and a.i != 4]
    fp32 = OnnxLMM(exported)
    ids = fp32.tokenizer("a red circle at the top left")["input_ids"]
    logits = {k: r.sessions["decoder"].run(["logits"], r.prefill_feed(ids, []))[0]
              for k, r in {"fp32": fp32, "q4": OnnxLMM(tmp_path / "q4"), "mix": OnnxLMM(tmp_path / "mix")}.items()}
    err = {k: float(np.abs(logits[k] - logits["fp32"]).mean()) for k in ("q4", "mix")}
    assert err["mix"] < err["q4"], err
    with pytest.raises(UserError, match="unknown projection 'mlp'"):
        quantize_onnx(exported, tmp_path / "bad", eight_bit=("mlp",))
    assert not (tmp_path / "bad").exists()

"""Edge deployment: ONNX export + torch-free runner (greedy parity), int4, fp16, hf-llava, bitsandbytes, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_cli import one_json, tinyml


@pytest.fixture(scope="session")
def examples(trained, tiny_cfg):
    from tinyml_cli.core.model import load_model
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    cfg = tiny_cfg()
    return eval_examples(cfg.data.eval, encoder_for(load_model(trained), cfg.data), cfg.data)


def test_onnx_greedy_tokens_equal_pytorch(trained, exported, examples):
    from tinyml_cli.core.generation import generated_tokens
    from tinyml_cli.core.model import load_model
    from tinyml_cli.edge.runner import OnnxLMM
    ref = generated_tokens(load_model(trained), examples, 6, batch_size=8)
    got = OnnxLMM(exported).generated_tokens(examples, 6, batch_size=8)
    assert all(len(t) == 6 for t in ref)  # multi-token answers: the cache is really used
    assert got == ref


def test_runner_preprocessing_matches_the_pytorch_path(trained, exported, examples, tiny_cfg):
    from tinyml_cli.core.batching import ImageLoader
    from tinyml_cli.core.model import load_model
    from tinyml_cli.edge.runner import OnnxLMM
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    runner, model = OnnxLMM(exported), load_model(trained)
    cfg = tiny_cfg("data.system_prompt=Answer briefly.")
    assert [e.input_ids for e in eval_examples(cfg.data.eval, encoder_for(runner, cfg.data), cfg.data)] == \
           [e.input_ids for e in eval_examples(cfg.data.eval, encoder_for(model, cfg.data), cfg.data)]
    paths = [e.images[0] for e in examples[:4]]
    np.testing.assert_allclose(runner.pixel_values(paths), ImageLoader(model.image_processor)(paths).numpy(), atol=1e-6)
    ids = examples[0].input_ids
    assert runner.tokenizer.decode(ids) == model.tokenizer.decode(ids, skip_special_tokens=True)


def test_onnx_runner_imports_no_torch(exported, shapes):
    code = f"""
import sys
from tinyml_cli.config import load_config
from tinyml_cli.stages.eval import run_eval, run_generate
cfg = load_config(None, ["data.eval={shapes / 'eval.jsonl'}", "gen.max_new_tokens=3"])
m = run_eval(None, cfg, None, onnx={str(exported)!r})["metrics"]
a = run_generate(None, {str(shapes / 'images' / '000048.png')!r}, "What color?", cfg, onnx={str(exported)!r})["answer"]
assert m["n"] == 30 and isinstance(a, str)
sys.exit(int("torch" in sys.modules or "transformers" in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_int4_quantization_sizes_and_ops(exported, examples, tmp_path):
    import onnx

    from tinyml_cli.edge.int4 import quantize_onnx
    from tinyml_cli.edge.runner import OnnxLMM
    asym = quantize_onnx(exported, tmp_path / "asym", block_size=32)
    sym = quantize_onnx(exported, tmp_path / "sym", block_size=32, symmetric=True, accuracy_level=0)
    assert asym["size_ratio"] <= 0.35 and sym["size_ratio"] < asym["size_ratio"]
    levels = {f: {a.i for n in onnx.load(str(tmp_path / f / "decoder.onnx")).graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"} for f in ("asym", "sym")}
    assert levels == {"asym": {4}, "sym": set()}  # int8 compute by default; 0 (fp32) leaves the attribute out
    for f in ("decoder", "vision"):
        g = onnx.load(str(tmp_path / "asym" / f"{f}.onnx")).graph
        weights = {i.name for i in g.initializer}
        assert any(n.op_type == "MatMulNBits" for n in g.node)
        # every product with a weight is int4 (lm_head and the patch embedding too); attention's stay MatMul
        assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert {n.op_type for n in onnx.load(str(tmp_path / "asym" / "embed.onnx")).graph.node} == {"GatherBlockQuantized"}
    toks = OnnxLMM(tmp_path / "sym").generated_tokens(examples, 3)
    assert len(toks) == len(examples) and all(len(t) == 3 for t in toks)
    with pytest.raises(Exception, match="already quantized"):
        quantize_onnx(tmp_path / "asym", tmp_path / "again")


def test_fp16_export_runs_close_to_fp32(trained, exported, examples, tmp_path):
    from tinyml_cli.core.export import export_onnx
    from tinyml_cli.edge.runner import OnnxLMM
    sizes = export_onnx(trained, tmp_path, "fp16")
    fp16, fp32 = OnnxLMM(tmp_path), OnnxLMM(exported)
    ids = np.array([examples[0].input_ids])
    pv = fp32.pixel_values(examples[0].images)
    a = fp32.embed(ids, pv)
    b = fp16.embed(ids, pv.astype(np.float16))
    assert b.dtype == np.float16 and np.abs(a - b.astype(np.float32)).max() < 1e-2
    assert sizes["total"] < 0.65 * sum((exported / f"{k}.onnx").stat().st_size for k in ("vision", "embed", "decoder"))


def test_hf_llava_logits_match_from_a_lora_run(tiny_cfg, examples, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from tinyml_cli.core.export import export_hf_llava, llava_max_logit_diff
    from tinyml_cli.stages.sft import run_sft
    run_sft(tiny_cfg("peft.method=lora", "peft.r=4", "peft.parts=[llm,vision,connector]"), tmp_path / "lora", "sft")
    export_hf_llava(tmp_path / "lora", tmp_path / "llava")
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava"), LlavaForConditionalGeneration)
    assert llava_max_logit_diff(tmp_path / "lora", tmp_path / "llava", examples[:6]) <= 1e-3


@pytest.mark.slow
def test_edge_demo_metrics(trained, shapes, tiny_cfg, tmp_path):
    from tinyml_cli.demo.pipeline import edge_demo_metrics
    m = edge_demo_metrics(trained, shapes / "eval.jsonl", tmp_path, cfg=tiny_cfg())
    assert m["onnx_greedy_match"] == 1.0 and m["onnx_prompts"] == 30
    assert m["int4_size_ratio"] <= 0.35 and m["hf_llava_max_logit_diff"] <= 1e-3
    assert 0 <= m["vqa_accuracy_int4"] <= 1 and m["vqa_accuracy_onnx"] == m["vqa_accuracy_torch"]


@pytest.mark.slow
def test_cli_export_quantize_eval_generate(trained, shapes, tmp_path):
    r = tinyml("export", trained, tmp_path / "onnx", "--json")
    assert r.returncode == 0, r.stderr
    assert one_json(r.stdout)["metrics"]["bytes"]["total"] > 0
    r = tinyml("quantize", tmp_path / "onnx", tmp_path / "q4", "--block-size", "32", "--symmetric",
               "--data", shapes / "eval.jsonl", "--set", "gen.max_new_tokens=3", "--json")
    assert r.returncode == 0, r.stderr
    m = one_json(r.stdout)["metrics"]
    assert m["size_ratio"] <= 0.35 and "vqa_accuracy_change" in m
    assert json.loads((tmp_path / "q4" / "tinyml_onnx.json").read_text())["quantization"]["eight_bit"] == [
        "lm_head", "q_proj", "k_proj", "v_proj", "down_proj"]
    r = tinyml("quantize", tmp_path / "onnx", tmp_path / "q4-all", "--eight-bit", "none", "--algorithm", "rtn", "--json")
    assert r.returncode == 0 and one_json(r.stdout)["metrics"]["size_ratio"] < m["size_ratio"]
    r = tinyml("quantize", tmp_path / "onnx", tmp_path / "q4-bad", "--eight-bit", "v_proj,mlp")
    assert r.returncode == 2 and "unknown projection 'mlp'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q4-bad").exists()
    r = tinyml("eval", "--onnx", tmp_path / "q4", "--data", shapes / "eval.jsonl", "-o", tmp_path / "ev", "--json")
    assert r.returncode == 0 and one_json(r.stdout)["metrics"]["n"] == 30
    assert (tmp_path / "ev" / "predictions.jsonl").is_file()
    r = tinyml("generate", "--onnx", tmp_path / "onnx", "-i", shapes / "images" / "000048.png", "-p", "What color?",
               "--json")
    assert r.returncode == 0 and "answer" in one_json(r.stdout)
    r = tinyml("export", trained, tmp_path / "x", "--format", "tflite")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = tinyml("eval", "--data", shapes / "eval.jsonl")
    assert r.returncode == 2 and "MODEL_DIR" in r.stderr


@pytest.mark.slow
def test_cli_bnb_nf4_reports_sizes_and_eval_change(trained, shapes, tmp_path):
    r = tinyml("quantize", trained, tmp_path / "nf4", "--method", "nf4", "--data", shapes / "eval.jsonl",
               "--set", "gen.max_new_tokens=3", "--json")
    assert r.returncode == 0, r.stderr
    m = one_json(r.stdout)["metrics"]
    assert m["size_ratio"] < 0.6 and "vqa_accuracy_change" in m
    cfg = json.loads((tmp_path / "nf4" / "llm" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_edge_commands_have_help_with_an_example(command):
    r = tinyml(command, "--help")
    assert r.returncode == 0 and "Example: tinyml" in r.stdout

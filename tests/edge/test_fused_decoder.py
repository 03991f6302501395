"""The fused decoder: `tinyml export` writes decoder.onnx with onnxruntime-genai's model builder where the LLM is
one it takes (Llama here, heads of 16: GroupQueryAttention's smallest), and the runner decodes it with its KV
cache written in place. Greedy tokens equal PyTorch's (a batch of prompts of different lengths), onnxruntime-genai's
and, at int4, the runner's own; the tiny default (heads of 8) keeps the traced graph."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (a dependency: pip install -e .)")


@pytest.fixture(scope="module")
def fused_run(tiny, tiny_cfg, tmp_path_factory):
    """A composed model over a Llama LLM with 16-wide heads and grouped K/V (4 query heads, 2 K/V heads), random
    weights, its EOS row zeroed: a random model then rarely ends an answer, so answers run through the cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tinyml_cli.core.model import build_model
    llm_dir = tmp_path_factory.mktemp("llm16")
    tok = AutoTokenizer.from_pretrained(tiny / "llm")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       initializer_range=0.2, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    model = build_model(tiny_cfg(f"model.llm={llm_dir}").model)
    head = model.llm.get_output_embeddings().weight.data
    head[model.tokenizer.eos_token_id] = 0
    run = tmp_path_factory.mktemp("fused-run")
    model.save(run)
    return run


@pytest.fixture(scope="module")
def fused(fused_run, tmp_path_factory):
    from tinyml_cli.core.export import export_onnx
    out = tmp_path_factory.mktemp("fused-onnx")
    export_onnx(fused_run, out)
    return out


@pytest.fixture(scope="module")
def fused_int4(fused, tmp_path_factory):
    from tinyml_cli.edge.int4 import quantize_onnx
    out = tmp_path_factory.mktemp("fused-int4")
    quantize_onnx(fused, out)
    return out


def test_export_writes_the_builders_graph(fused, exported):
    import onnx
    meta = json.loads((fused / "tinyml_onnx.json").read_text())
    assert meta["kv_cache"] == "shared" and meta["kv_heads"] == 2 and meta["head_dim"] == 16
    g = onnx.load(str(fused / "decoder.onnx"))
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    assert "position_ids" not in {i.name for i in g.graph.input}
    # q, k and v apart (quantize --eight-bit names them), no embedding in the graph (embed.onnx feeds it)
    assert any("/v_proj/" in n.name for n in g.graph.node) and "Gather" not in ops[:3]
    cfg = json.loads((fused / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in cfg["model"]["decoder"]["pipeline"][1]["decoder"]["inputs"]
    # the tiny default's heads are 8 wide, under GroupQueryAttention's 16: its decoder is traced by torch.onnx
    assert json.loads((exported / "tinyml_onnx.json").read_text())["kv_cache"] == "concat"


def test_fused_greedy_tokens_equal_pytorch_in_a_batch(fused_run, fused, tiny_cfg):
    from tinyml_cli.core.generation import generated_tokens
    from tinyml_cli.core.model import load_model
    from tinyml_cli.edge.runner import OnnxLMM
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    model, runner = load_model(fused_run), OnnxLMM(fused)
    cfg = tiny_cfg()
    examples = eval_examples(cfg.data.eval, encoder_for(model, cfg.data), cfg.data)
    assert len({len(e.input_ids) for e in examples}) > 1  # right padding really happens in the runner's batches
    ref = generated_tokens(model, examples, 8, batch_size=16)
    assert sum(len(t) == 8 for t in ref) > len(ref) / 2, ref
    assert runner.generated_tokens(examples, 8, batch_size=16) == ref
    # one at a time too, and the whole-sequence feed the int4 tools use gives the same last logits
    assert [runner.generate([e.input_ids], [e.images], 8)[0] for e in examples[:3]] == ref[:3]
    e = examples[0]
    logits = runner.sessions["decoder"].run(["logits"], runner.prefill_feed(e.input_ids, e.images))[0]
    assert int(logits[0, -1].argmax()) == ref[0][0]


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_ortgenai_runs_the_fused_export(fused, fused_int4, which):
    import onnxruntime_genai as og
    from test_ortgenai import QUESTIONS, ortgenai_greedy

    from tinyml_cli.edge.runner import OnnxLMM
    folder = fused if which == "fp32" else fused_int4
    runner, model = OnnxLMM(folder), og.Model(str(folder))
    tok, pick, gaps = runner.tokenizer, runner._pick, []

    def pick_noting_the_gap(logits, *rest):  # top-1 minus top-2 logit of each step
        top = np.sort(logits[0])[-2:]
        gaps.append(top[1] - top[0])
        return pick(logits, *rest)
    runner._pick = pick_noting_the_gap
    for q in QUESTIONS:
        ids = tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))["input_ids"]
        gaps.clear()
        ref = runner.generate([ids], [[]], 8)[0]
        assert len(ref) == 8
        # at int4 the activations are int8-quantized and a random model has near-ties (a gap of 0.007 seen):
        # the two runtimes must agree up to the first step whose top two logits are within 0.01 (before it)
        n = next((i for i, g in enumerate(gaps) if g < 0.01), 8) if which == "int4" else 8
        assert ortgenai_greedy(model, ids, 8)[:n] == ref[:n]


def test_int4_of_the_fused_graph_keeps_the_eight_bit_projections(fused, fused_int4):
    import onnx

    from tinyml_cli.edge.runner import OnnxLMM
    bits = {n.name: a.i for n in onnx.load(str(fused_int4 / "decoder.onnx")).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert {b for n, b in bits.items() if any(f"/{p}/" in n for p in ("q_proj", "k_proj", "v_proj", "down_proj"))} == {8}
    assert {b for n, b in bits.items() if any(f"/{p}/" in n for p in ("o_proj", "gate_proj", "up_proj"))} == {4}
    fp32, int4 = OnnxLMM(fused), OnnxLMM(fused_int4)
    ids = fp32.tokenizer("a red circle at the top left")["input_ids"]
    a, b = (r.sessions["decoder"].run(["logits"], r.prefill_feed(ids, []))[0] for r in (fp32, int4))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95  # the int4 graph computes the same function, roughly


def test_a_builder_failure_falls_back_to_the_traced_decoder(fused_run, fused, monkeypatch, tmp_path):
    import subprocess

    from tinyml_cli.core.export import export_onnx
    from tinyml_cli.edge.runner import OnnxLMM
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "Traceback ...\nNotImplementedError: this rope scaling is not supported"))
    export_onnx(fused_run, tmp_path / "traced")
    meta = json.loads((tmp_path / "traced" / "tinyml_onnx.json").read_text())
    assert meta["kv_cache"] == "concat"
    assert meta["builder_failed"] == "NotImplementedError: this rope scaling is not supported"
    ids = OnnxLMM(fused).tokenizer("a red circle at the top left")["input_ids"]
    assert OnnxLMM(tmp_path / "traced").generate([ids], [[]], 6) == OnnxLMM(fused).generate([ids], [[]], 6)

"""onnxruntime-genai runs the ONNX export through the genai_config.json that `tinyml export` writes (text path):
its greedy tokens equal tinyml's own runner's, at fp32 and int4."""

import pytest

QUESTIONS = ["What color is the shape?", "How many objects are there?", "Where is the circle?"]


def ortgenai_greedy(model, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


@pytest.fixture(scope="module")
def int4_export(exported, tmp_path_factory):
    from tinyml_cli.edge.int4 import quantize_onnx
    out = tmp_path_factory.mktemp("int4")
    quantize_onnx(exported, out)
    return out


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_ortgenai_greedy_tokens_equal_the_runner(exported, int4_export, which):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (a dependency: pip install -e .)")
    from tinyml_cli.edge.runner import OnnxLMM
    folder = exported if which == "fp32" else int4_export
    assert (folder / "genai_config.json").is_file()
    runner, model = OnnxLMM(folder), og.Model(str(folder))
    tok = runner.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))["input_ids"]
               for q in QUESTIONS]
    assert [list(og.Tokenizer(model).encode(tok.decode(p, skip_special_tokens=False))) for p in prompts] == prompts
    for ids in prompts:
        ref = runner.generate([ids], [[]], 8)[0]
        assert len(ref) == 8  # the fixture's EOS is pushed down: 8 steps through onnxruntime-genai's cache
        assert ortgenai_greedy(model, ids, 8) == ref

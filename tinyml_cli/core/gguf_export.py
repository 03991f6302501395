"""GGUF export for llama.cpp: `model.gguf` (the LLM, its tokenizer and chat template) and `mmproj.gguf` (the vision
tower and the connector, for llama.cpp's multimodal library mtmd / clip.cpp), written with the `gguf` package.

What llama.cpp can run decides what exports:
- the LLM: the Llama architecture (Llama, SmolLM, TinyLlama, the tiny default) with plain RoPE. llama.cpp's
  `llama` graph rotates interleaved pairs of a head's dimensions where transformers rotates its two halves, so the
  rows of q_proj / k_proj are reordered (within each head: the pairs (i, i + d/2) become adjacent);
- the tokenizer: byte-level BPE (llama.cpp's `gpt2` model) with GPT-2's pre-tokenizer, or SmolLM's (digits split
  first); the token types mark special tokens as control tokens so that llama.cpp parses them in prompts;
- the vision side: clip.cpp's LLaVA graph (projector type `mlp`: Linear-GELU-Linear) over a CLIP or SigLIP tower.
  Its graph applies the GELU after the first projection unconditionally, so the `linear` connector (one Linear)
  and the resampler / Q-Former / C-Abstractor / xattn connectors have no equivalent and are refused;
- tinyml's `vision_feature_layer` k (hidden state after k blocks) is clip.cpp's feature layer k: only the first k
  blocks are written, and the post-layernorm only when the last layer is taken *and* transformers applies it
  (never: `hidden_states[-1]` is before SigLIP's / CLIP's post-layernorm).
Tensor names and metadata keys follow llama.cpp's `gguf-py/gguf/constants.py` and `tools/mtmd/clip-impl.h`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import UserError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
CONNECTORS = ("mlp2x_gelu",)
LLM_TYPES = ("llama",)
VISION_TYPES = ("siglip_vision_model", "clip_vision_model")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_gguf_exportable(model_dir: str | Path) -> None:
    """Refuse, from the folder's JSON files alone (before any weight is read), what llama.cpp cannot express."""
    path = Path(model_dir)
    spec = _json(path / "tinyml_model.json")
    if spec.get("format") == "tinyml-vlm/1":
        raise UserError("--format gguf: model.vlm checkpoints are not exported to GGUF (llama.cpp converts them "
                        "with its own convert_hf_to_gguf.py); a composed LLaVA-style model is")
    if spec:
        connector, vision, llm = spec["connector"], _json(path / "vision" / "config.json"), _json(path / "llm" / "config.json")
    else:  # a transformers LLaVA folder
        cfg = _json(path / "config.json")
        connector = "mlp2x_gelu" if cfg.get("projector_hidden_act") == "gelu" else "linear"
        vision, llm = cfg.get("vision_config", {}), cfg.get("text_config", {})
    if connector not in CONNECTORS:
        raise UserError(f"--format gguf: the {connector} connector has no llama.cpp (clip.cpp) equivalent; "
                        f"supported: {', '.join(CONNECTORS)} (LLaVA's projector type 'mlp')")
    if vision.get("model_type") and vision["model_type"] not in VISION_TYPES:
        raise UserError(f"--format gguf: a {vision['model_type']} vision tower; supported: CLIP and SigLIP")
    if llm.get("model_type") and llm["model_type"] not in LLM_TYPES:
        raise UserError(f"--format gguf: a {llm['model_type']} LLM; supported: {', '.join(LLM_TYPES)}")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise UserError(f"--format gguf: RoPE scaling '{params['rope_type']}' is not exported")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _pre_tokenizer(tok) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer (its regexes are built into llama.cpp by name)."""
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name of GPT-2's pre-tokenizer (the tokenizer model is "gpt2")
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    raise UserError(f"--format gguf: the tokenizer's pre-tokenizer {kinds} has no llama.cpp name "
                    "(byte-level BPE with GPT-2's or SmolLM's pre-tokenizer exports)")


def _add_tokenizer(w, tok, vocab_rows: int) -> None:
    """tokens, token types, merges, special ids and the chat template in the GGUF metadata."""
    import gguf
    state = json.loads(tok.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise UserError(f"--format gguf: a {state['model']['type']} tokenizer (byte-level BPE only)")
    vocab = tok.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [gguf.TokenType.UNUSED] * vocab_rows
    for text, i in vocab.items():
        if i < vocab_rows:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for t in state.get("added_tokens", []):
        if t["id"] < vocab_rows:
            types[t["id"]] = gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for name, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id),
                      ("unk", tok.unk_token_id)):
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(tid)
    probe = tok("a")["input_ids"]  # does encoding add BOS / EOS by itself? (tinyml's chat template writes <s>)
    w.add_add_bos_token(bool(probe) and probe[0] == tok.bos_token_id)
    w.add_add_eos_token(bool(probe) and probe[-1] == tok.eos_token_id and len(probe) > 1)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k projection rows from transformers' rotate-half order to llama.cpp's interleaved pairs."""
    out_dim, in_dim = weight.shape
    d = out_dim // heads
    return weight.reshape(heads, 2, d // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _tensor_type(name: str, arr: np.ndarray, kind: str):
    """The GGML type of one tensor: 1-d tensors stay f32 (as llama.cpp's converter does); matrices whose rows are
    not a whole number of 32-value blocks fall back to f16."""
    import gguf
    T = gguf.GGMLQuantizationType
    if arr.ndim == 1 or kind == "f32":
        return T.F32
    if kind == "f16" or arr.shape[-1] % 32:
        return T.F16
    if kind == "q4_0" and name == "output.weight":
        return T.Q8_0  # the vocabulary projection at 4 bits costs most of q4_0's error (llama-quantize keeps it higher)
    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]


def _add(w, name: str, arr: np.ndarray, kind: str) -> None:
    import gguf
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    qtype = _tensor_type(name, arr, kind)
    w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def _file_type(kind: str) -> int:
    import gguf
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]


def write_llm_gguf(llm, tok, path: Path, kind: str, name: str) -> None:
    import gguf
    cfg = llm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    emb = llm.get_input_embeddings().weight.detach().float().numpy()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(_file_type(kind))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(emb.shape[0])
    _add_tokenizer(w, tok, emb.shape[0])

    sd = {k: v.detach().float().numpy() for k, v in llm.state_dict().items()}
    _add(w, "token_embd.weight", emb, kind)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            for part in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{part}")
                if t is None:
                    continue
                if gg in ("attn_q", "attn_k"):
                    n = heads if gg == "attn_q" else kv_heads
                    t = _rope_rows(t, n) if part == "weight" else _rope_rows(t[:, None], n)[:, 0]
                _add(w, f"blk.{i}.{gg}.{part}", t, kind)
    _add(w, "output_norm.weight", sd["model.norm.weight"], kind)
    head = llm.get_output_embeddings().weight
    if head.data_ptr() != llm.get_input_embeddings().weight.data_ptr():  # tied: llama.cpp reuses token_embd
        _add(w, "output.weight", head.detach().float().numpy(), kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_mmproj_gguf(model, path: Path, kind: str, name: str) -> None:
    """The vision tower up to the feature layer, and the connector, as clip.cpp's LLaVA (`mlp`) projector."""
    import gguf
    vision = model.vision
    vcfg = vision.config
    n_layers = vcfg.num_hidden_layers
    k = model.spec["vision_feature_layer"] % (n_layers + 1)  # hidden_states[k]: the output of k blocks
    sd = {kk: v.detach().float().numpy() for kk, v in vision.state_dict().items()}
    prefix = "vision_model." if any(kk.startswith("vision_model.") for kk in sd) else ""
    sd = {kk[len(prefix):]: v for kk, v in sd.items()}
    proc = model.image_processor
    size = proc.size
    image_size = size.get("height", size.get("shortest_edge"))
    if image_size != vcfg.image_size:
        raise UserError(f"--format gguf: the image processor resizes to {image_size}, the tower takes {vcfg.image_size}")
    act = vcfg.hidden_act
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(name)
    w.add_file_type(_file_type(kind))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", vcfg.image_size)
    w.add_uint32("clip.vision.patch_size", vcfg.patch_size)
    w.add_uint32("clip.vision.embedding_length", vcfg.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", vcfg.intermediate_size)
    w.add_uint32("clip.vision.projection_dim", model.spec["llm_dim"])
    w.add_uint32("clip.vision.block_count", k)
    w.add_uint32("clip.vision.attention.head_count", vcfg.num_attention_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vcfg.layer_norm_eps)
    w.add_array("clip.vision.image_mean", [float(x) for x in proc.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in proc.image_std])
    w.add_array("clip.vision.feature_layer", [k])
    # clip.cpp: use_gelu -> tanh-approximated GELU (SigLIP's gelu_pytorch_tanh); neither -> quick_gelu (CLIP)
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        w.add_bool("clip.use_gelu", True)
    elif act != "quick_gelu":
        raise UserError(f"--format gguf: the vision tower's activation {act} has no clip.cpp equivalent")

    emb = "embeddings."
    _add(w, "v.patch_embd.weight", sd[emb + "patch_embedding.weight"], kind)
    if emb + "patch_embedding.bias" in sd:
        _add(w, "v.patch_embd.bias", sd[emb + "patch_embedding.bias"], kind)
    _add(w, "v.position_embd.weight", sd[emb + "position_embedding.weight"], "f32" if kind == "f32" else "f16")
    if emb + "class_embedding" in sd:  # CLIP: the CLS token goes in and is dropped from the features, as in tinyml
        _add(w, "v.class_embd", sd[emb + "class_embedding"], kind)
    for pre in ("pre_layrnorm", "pre_layernorm"):  # CLIP's (sic) pre-layernorm
        if pre + ".weight" in sd:
            _add(w, "v.pre_ln.weight", sd[pre + ".weight"], kind)
            _add(w, "v.pre_ln.bias", sd[pre + ".bias"], kind)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
             "mlp.fc2": "ffn_down"}
    for i in range(k):
        for hf, gg in names.items():
            for part in ("weight", "bias"):
                _add(w, f"v.blk.{i}.{gg}.{part}", sd[f"encoder.layers.{i}.{hf}.{part}"], kind)
    proj = model.connector.proj
    for idx in (0, 2):
        _add(w, f"mm.{idx}.weight", proj[idx].weight.detach().float().numpy(), kind)
        _add(w, f"mm.{idx}.bias", proj[idx].bias.detach().float().numpy(), kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f16") -> dict:
    """Write model.gguf and mmproj.gguf into `out`; returns their sizes in bytes. The mmproj stays f32 at f32 and
    f16 otherwise (clip.cpp's usual precision: the tower is small, and its error reaches every image token)."""
    import logging

    from .export import load_merged
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it logs every file it writes at INFO
    if kind not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got '{kind}'")
    check_gguf_exportable(model_dir)
    model = load_merged(model_dir)
    if model.spec.get("connector") not in CONNECTORS:  # a LLaVA folder's linear projector, seen once loaded
        raise UserError(f"--format gguf: the {model.spec.get('connector')} connector has no llama.cpp equivalent; "
                        f"supported: {', '.join(CONNECTORS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(model_dir).resolve().name
    write_llm_gguf(model.base_llm(), model.tokenizer, out / "model.gguf", kind, name)
    write_mmproj_gguf(model, out / "mmproj.gguf", "f32" if kind == "f32" else "f16", name + "-mmproj")
    sizes = {f.stem: f.stat().st_size for f in (out / "model.gguf", out / "mmproj.gguf")}
    return {**sizes, "total": sum(sizes.values())}

"""export: a trained tinyml folder to ONNX for onnxruntime, or to a transformers LLaVA checkpoint.

ONNX (`--format onnx`) writes three graphs in the layout of onnxruntime-genai's vision models (Phi-3-vision):
`vision.onnx` (pixel_values -> image_embeds: vision tower and connector in one graph) and `embed.onnx`
(input_ids -> inputs_embeds) by torch.onnx's TorchScript exporter, and `decoder.onnx` (inputs_embeds,
attention_mask and `past_key_values.{i}.key/value` -> logits and `present.{i}.key/value`, batch and sequence
dynamic). Where onnxruntime-genai's model builder takes the LLM (`fusable`), it writes the decoder, as the
graph onnxruntime-genai runs itself: GroupQueryAttention over a KV buffer written in place (`kv_cache: shared`),
1.5x faster per token than the trace on the benchmark model. Otherwise torch.onnx traces it (`kv_cache: concat`:
the cache grows by concatenation, position_ids an input). Beside them: the tokenizer, the image processor's
config and `tinyml_onnx.json`, all that `edge.runner` needs to run the model without torch, and
`genai_config.json`, with which onnxruntime-genai runs the text path: its `decoder-pipeline` model type chains
embed.onnx and decoder.onnx as the graphs are. Its multimodal model types each
expect their own family's vision graph and image processor (Phi-3-vision's HD crops, ...), so image questions go
through tinyml's runner, not onnxruntime-genai.

optimum's exporters pin transformers < 4.58 and do not run here; transformers 5's own `exporters` go through
the dynamo exporter and onnxscript (not a dependency). The TorchScript exporter traces the decoder with a
`DynamicCache` built from the flat past tensors, which is all the glue a KV-cache graph needs; its trace keeps
every shape computation as nodes (339 on the benchmark model against the builder's 54).

hf-llava (`--format hf-llava`) writes a `LlavaForConditionalGeneration` checkpoint (MLP connectors only:
LLaVA's projector is Linear-act-Linear) that transformers loads with logits equal to tinyml's model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .. import UserError
from ..edge.runner import META as ONNX_META
from ..edge.runner import onnx_sizes

OPSET = 17


def load_merged(model_dir: str | Path, dtype=torch.float32):
    """A tinyml model with any LoRA / DoRA / IA3 adapter merged into its parts, in eval mode."""
    from .model import load_model
    model = load_model(model_dir, dtype=dtype)
    if model.peft_parts():
        if getattr(model.base_llm(), "is_loaded_in_4bit", False):
            raise UserError(f"{model_dir}: the LLM base is 4-bit (a QLoRA run); export needs a full-precision base")
        model.merge_adapters()
    return model.eval()


class _ImageEncoder(nn.Module):
    """pixel_values -> image_embeds (the vision tower's chosen layer through the connector)."""

    def __init__(self, lmm):
        super().__init__()
        self.lmm = lmm

    def forward(self, pixel_values):
        return self.lmm.encode_images(pixel_values)


class _PatchMatMul(nn.Module):
    """A ViT patch embedding (Conv2d with stride = kernel, no padding) as patchify + one matrix product.

    The same function, written as a MatMul so that the int4 quantizer (MatMulNBits) also takes this weight: it is
    a large share of a small vision tower, and a Conv stays fp32.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.p, self.out = conv.kernel_size[0], conv.out_channels
        self.linear = nn.Linear(conv.in_channels * self.p * self.p, self.out, bias=conv.bias is not None)
        self.linear.weight.data = conv.weight.detach().reshape(self.out, -1).clone()
        if conv.bias is not None:
            self.linear.bias.data = conv.bias.detach().clone()
        self.linear.to(conv.weight.dtype)

    @property
    def weight(self):  # the embeddings read the conv's dtype from it
        return self.linear.weight

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        return self.linear(x).reshape(b, h // p, w // p, self.out).permute(0, 3, 1, 2)


def _patch_convs_as_matmuls(vision: nn.Module) -> None:
    for name, mod in list(vision.named_modules()):
        if (isinstance(mod, nn.Conv2d) and mod.kernel_size == mod.stride and mod.kernel_size[0] == mod.kernel_size[1]
                and mod.padding in (0, (0, 0), "valid") and mod.groups == 1 and mod.dilation == (1, 1)):
            parent, _, child = name.rpartition(".")
            setattr(vision.get_submodule(parent) if parent else vision, child, _PatchMatMul(mod))


class _Embed(nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids):
        return self.embedding(input_ids)


class _DecoderStep(nn.Module):
    """One forward of the LLM on a KV cache given as flat tensors, returning the grown cache the same way."""

    def __init__(self, llm):
        super().__init__()
        self.llm, self.layers = llm, llm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.llm.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _kv_shape(llm) -> tuple[int, int]:
    cfg = llm.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return heads, head_dim


def _onnx_export(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are about Python branches it fixed
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False)


def export_onnx(model_dir: str | Path, out: str | Path, dtype: str = "fp32") -> dict:
    """Write vision.onnx, embed.onnx, decoder.onnx and what the runner needs; returns the file sizes."""
    if dtype not in ("fp32", "fp16"):
        raise UserError(f"--dtype must be fp32 or fp16, got '{dtype}'")
    tdtype = torch.float32 if dtype == "fp32" else torch.float16
    model = load_merged(model_dir, dtype=tdtype)
    if model.spec.get("connector") == "xattn":
        raise UserError("--format onnx: the xattn connector runs cross-attention inside the decoder, which the ONNX "
                        "layout (image tokens in the sequence) cannot express; linear, mlp2x_gelu, resampler, qformer "
                        "and c-abstractor export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _patch_convs_as_matmuls(model.vision)
    llm = model.base_llm()
    proc = model.image_processor
    size = proc.size
    h, w = (size["height"], size["width"]) if "height" in size else (proc.crop_size["height"], proc.crop_size["width"])

    _onnx_export(_ImageEncoder(model), (torch.zeros(1, 3, h, w, dtype=tdtype),), out / "vision.onnx",
                 ["pixel_values"], ["image_embeds"], {"pixel_values": {0: "images"}, "image_embeds": {0: "images"}})
    _onnx_export(_Embed(llm.get_input_embeddings()), (torch.zeros(1, 2, dtype=torch.long),), out / "embed.onnx",
                 ["input_ids"], ["inputs_embeds"],
                 {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}})

    layers, (heads, head_dim) = llm.config.num_hidden_layers, _kv_shape(llm)
    builder_failed = fused_decoder(llm, model.tokenizer, out) if dtype == "fp32" and fusable(llm) else None
    kv_cache = "shared" if builder_failed == "" else "concat"
    if kv_cache == "concat":
        _traced_decoder(llm, model.spec["llm_dim"], tdtype, out)

    tok = model.tokenizer
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    meta = {"format": "tinyml-onnx/1", "dtype": dtype, "quantization": None,
            "files": {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"},
            "num_image_tokens": model.num_image_tokens, "image_token_id": model.image_token_id,
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "num_layers": layers,
            "kv_heads": heads, "head_dim": head_dim, "hidden_size": model.spec["llm_dim"], "kv_cache": kv_cache,
            "source": str(model_dir)}
    if builder_failed:  # traced instead; said in the export's summary
        meta["builder_failed"] = builder_failed
    (out / ONNX_META).write_text(json.dumps(meta, indent=2))
    (out / "genai_config.json").write_text(json.dumps(genai_config(meta, llm.config, tok), indent=2))
    return onnx_sizes(out)


# The LLM architectures whose decoder onnxruntime-genai's model builder writes (fused attention; tested here on
# Llama: the tiny default, the benchmark model, SmolLM2). Others are traced by torch.onnx.
FUSED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def fusable(llm) -> bool:
    """Whether onnxruntime-genai's model builder takes the LLM: an architecture of FUSED_ARCHITECTURES with heads
    at least as wide as GroupQueryAttention takes (a multiple of 16: the tiny default's are 8)."""
    arch = (llm.config.architectures or [type(llm).__name__])[0]
    return arch in FUSED_ARCHITECTURES and _kv_shape(llm)[1] % 16 == 0


def fused_decoder(llm, tok, out: Path) -> str:
    """decoder.onnx (+ decoder.onnx.data) by onnxruntime-genai's model builder, as the graphs it runs itself:
    GroupQueryAttention with rotary embedding inside, the KV cache one buffer per layer written in place, fused
    norms, 54 nodes on the benchmark model where torch.onnx's trace has 339; inputs_embeds in (no embedding:
    embed.onnx feeds it, image tokens included), the q/k/v projections kept apart so that `quantize --eight-bit`
    can name them. Returns "" when written, else the builder's last line of error (the caller traces instead)."""
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        src, built = Path(tmp) / "llm", Path(tmp) / "built"
        llm.save_pretrained(src)
        tok.save_pretrained(src)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(built), "-p", "fp32",
               "-e", "cpu", "-c", str(Path(tmp) / "cache"), "--extra_options", "exclude_embeds=true",
               "disable_qkv_fusion=true", "filename=decoder.onnx"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not (built / "decoder.onnx").is_file():
            return (run.stderr.strip().splitlines() or ["no decoder.onnx written"])[-1][:300]
        for f in ("decoder.onnx", "decoder.onnx.data"):
            (built / f).replace(out / f)
    return ""


def _traced_decoder(llm, llm_dim: int, tdtype, out: Path) -> None:
    """decoder.onnx by torch.onnx's TorchScript exporter: the cache grows by concatenation."""
    layers, (heads, head_dim) = llm.config.num_hidden_layers, _kv_shape(llm)
    b, s, p = 2, 3, 2  # traced with a non-empty past; the graph also runs with past length 0 (prefill)
    past = [torch.zeros(b, heads, p, head_dim, dtype=tdtype) for _ in range(2 * layers)]
    sample = (torch.zeros(b, s, llm_dim, dtype=tdtype), torch.ones(b, p + s, dtype=torch.long),
              torch.arange(p, p + s).expand(b, -1), *past)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dynamic = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
               **{n: {0: "batch", 2: "past"} for n in past_names}, **{n: {0: "batch", 2: "total"} for n in present_names}}
    _onnx_export(_DecoderStep(llm), sample, out / "decoder.onnx",
                 ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names], dynamic)


def genai_config(meta: dict, cfg, tok) -> dict:
    """onnxruntime-genai's config for the text path: a `decoder-pipeline` of embed.onnx then decoder.onnx, greedy
    by default; the cache is the builder's in-place buffer (past_present_share_buffer) or grows by concatenation
    (the traced decoder, which also takes position_ids)."""
    layers, shared = meta["num_layers"], meta.get("kv_cache") == "shared"
    positions = [] if shared else ["position_ids"]
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    context = cfg.max_position_embeddings
    decoder = {"session_options": {"log_id": "tinyml", "provider_options": []}, "head_size": meta["head_dim"],
               "hidden_size": meta["hidden_size"], "num_attention_heads": cfg.num_attention_heads,
               "num_key_value_heads": meta["kv_heads"], "num_hidden_layers": layers,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                          **{p: p for p in positions}, "past_key_names": "past_key_values.%d.key",
                          "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"},
               "pipeline": [{"embed": {"filename": meta["files"]["embed"], "inputs": ["input_ids"],
                                       "outputs": ["inputs_embeds"]}},
                            {"decoder": {"filename": meta["files"]["decoder"],
                                         "inputs": ["inputs_embeds", "attention_mask", *positions, *past],
                                         "outputs": ["logits", *present]}}]}
    return {"model": {"type": "decoder-pipeline", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                      "pad_token_id": tok.pad_token_id, "vocab_size": cfg.vocab_size, "context_length": context,
                      "decoder": decoder},
            "search": {"do_sample": False, "num_beams": 1, "top_k": 1, "max_length": context,
                       "past_present_share_buffer": shared}}


def export_hf_llava(model_dir: str | Path, out: str | Path) -> dict:
    """A transformers `LlavaForConditionalGeneration` folder (weights, tokenizer, image processor, processor)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    model = load_merged(model_dir)
    spec = model.spec
    if spec["connector"] not in ("linear", "mlp2x_gelu"):
        raise UserError(f"--format hf-llava needs an MLP connector (linear or mlp2x_gelu), not {spec['connector']}")
    llm = model.base_llm()
    out = Path(out)
    cls_token = model.vision.config.model_type.startswith("clip")  # CLIP's CLS token is dropped ("default")
    cfg = LlavaConfig(vision_config=model.vision.config.to_dict(), text_config=llm.config.to_dict(),
                      image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
                      projector_hidden_act="gelu" if spec["connector"] == "mlp2x_gelu" else "linear",
                      vision_feature_select_strategy="default" if cls_token else "full",
                      vision_feature_layer=spec["vision_feature_layer"], multimodal_projector_bias=True,
                      tie_word_embeddings=llm.config.tie_word_embeddings)
    llava = LlavaForConditionalGeneration(cfg).eval()
    proj = model.connector.proj
    first, second = proj[0], (proj[2] if len(proj) > 1 else None)
    if second is None:  # linear connector: LLaVA's second projection is the identity, its activation "linear"
        second = nn.Linear(first.out_features, first.out_features)
        nn.init.eye_(second.weight), nn.init.zeros_(second.bias)
    state = {f"model.vision_tower.{k}": v for k, v in model.vision.state_dict().items()}
    state |= {f"model.multi_modal_projector.linear_1.{k}": v for k, v in first.state_dict().items()}
    state |= {f"model.multi_modal_projector.linear_2.{k}": v for k, v in second.state_dict().items()}
    state |= {f"model.language_model.{k}": v for k, v in llm.get_decoder().state_dict().items()}
    state |= {f"lm_head.{k}": v for k, v in llm.get_output_embeddings().state_dict().items()}
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k.startswith("lm_head"))]
    if missing or unexpected:
        raise RuntimeError(f"LLaVA weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    llava.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    model.image_processor.save_pretrained(out)
    return {"bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")}


def llava_max_logit_diff(model_dir: str | Path, llava_dir: str | Path, examples: list) -> float:
    """Largest |logit| difference between tinyml's model and the LLaVA checkpoint on encoded prompts."""
    from transformers import LlavaForConditionalGeneration

    from .batching import Collator, ImageLoader
    model = load_merged(model_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), dtype=torch.float32).eval()
    batch = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))(examples)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
        theirs = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch.get("pixel_values")).logits
    keep = batch["attention_mask"].bool()
    return float((ours - theirs).abs()[keep].max())

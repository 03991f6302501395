"""The multimodal model: a HF vision encoder + a connector + a HF causal LM (LLaVA / TinyLLaVA layout).

`<image>` in the text becomes `num_image_tokens` copies of the image token; their embeddings are replaced by
the connector's outputs before the LLM runs. A model saves as one folder:

    tinyml_model.json      composition (connector, feature layer, image token, ...)
    llm/                   HF causal LM + tokenizer (save_pretrained)
    llm_adapter/           peft adapter, when the LLM was trained with one (vision_adapter/, connector_adapter/:
                           LoRA / DoRA on those parts, loading with PeftModel.from_pretrained on the saved part)
    adapters.safetensors   bottleneck adapters (peft.method=adapter; see adapters.py)
    vision/                HF vision encoder + image processor
    connector.safetensors
"""

from __future__ import annotations

import contextlib
import json
import typing
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .. import IMAGE_TOKEN, UserError
from ..config import Part
from ..records.encoder import Encoder, encoder_for
from .connectors import build_connector, connector_size
from .hfutil import (  # noqa: F401
    DEFAULT_CHAT_TEMPLATE,
    _hf_load,
    adapters_lifted,
    compiled_chat_template,
    labelled_loss,
    llm_source,
    prepare_tokenizer,
)


# ------------------------------------------------------------------------------------------ loading parts
def load_vision(ident: str, trust_remote_code: bool = False, dtype=None):
    """A CLIP / SigLIP vision tower from a vision-only or a full (text+vision) checkpoint, plus its processor."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        CLIPVisionModel,
        SiglipVisionModel,
    )
    if not ident:
        raise UserError("model.vision is not set (a hub id or a local folder)")
    cfg = _hf_load(AutoConfig.from_pretrained, ident, "vision encoder", trust_remote_code=trust_remote_code)
    kind = cfg.model_type.replace("_vision_model", "")
    cls = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}.get(kind, AutoModel)
    model = _hf_load(cls.from_pretrained, ident, "vision encoder", dtype=dtype, trust_remote_code=trust_remote_code,
                     use_safetensors=True)
    processor = _hf_load(AutoImageProcessor.from_pretrained, ident, "image processor")
    return model, processor


def load_llm(ident: str, trust_remote_code: bool = False, dtype=None, attn_implementation: str = "sdpa",
             quantization_config=None):
    """A causal LM and its tokenizer; `quantization_config` (bitsandbytes) loads the weights quantized (QLoRA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not ident:
        raise UserError("model.llm is not set (a hub id or a local folder)")
    ident = llm_source(ident)
    tok = _hf_load(AutoTokenizer.from_pretrained, ident, "tokenizer", trust_remote_code=trust_remote_code)
    quant = {"quantization_config": quantization_config} if quantization_config is not None else {}
    llm = _hf_load(AutoModelForCausalLM.from_pretrained, ident, "LLM", dtype=dtype, use_safetensors=True,
                   trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, **quant)
    _fit_4bit_cpu_kernels(llm)
    prepare_tokenizer(tok, llm)
    return llm, tok


def _fit_4bit_cpu_kernels(llm) -> None:
    """bitsandbytes' fast CPU 4-bit inference kernel fails on layers whose output width is not a multiple of 32
    or whose input width is not a multiple of the quantization block; those layers take its general kernel."""
    if not getattr(llm, "is_loaded_in_4bit", False):
        return
    for m in llm.modules():
        if hasattr(m, "support_avx512bf16_for_cpu") and (
                m.out_features % 32 or m.in_features % getattr(m.weight, "blocksize", 64)):
            m.support_avx512bf16_for_cpu = False


def vision_geometry(vision) -> tuple[int, int]:
    """(hidden size, patch tokens per image) of a ViT-style vision config."""
    cfg = vision.config
    return cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2


# ----------------------------------------------------------------------------------------------- the model
PARTS = typing.get_args(Part)  # the part names, declared once with the recipe keys that take them


class LMM(nn.Module):
    def __init__(self, vision, connector, llm, tokenizer, image_processor, spec: dict):
        super().__init__()
        self.vision, self.connector, self.llm = vision, connector, llm
        self.tokenizer, self.image_processor, self.spec = tokenizer, image_processor, spec
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.chunked_loss = True  # train.chunked_loss (see chunked_loss.py)
        if hasattr(connector, "attach"):  # xattn: its blocks run in front of the LLM's decoder layers
            connector.attach(self.base_llm().get_decoder().layers)

    @property
    def num_image_tokens(self) -> int:
        return self.spec["num_image_tokens"]

    @property
    def device(self):
        return next(self.llm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.spec["llm_dim"]

    @property
    def dtype(self):
        return next(self.connector.parameters()).dtype  # the LLM's weights may be 4-bit integers (qlora)

    @property
    def image_tokens(self):
        return None  # every image is num_image_tokens copies of the image token

    @property
    def render_chat(self):
        return compiled_chat_template(self.tokenizer)

    def collator(self, left_pad: bool = False):
        """The collator of this model's records (padding, pixel tensors)."""
        from .batching import Collator, ImageLoader
        return Collator(self.tokenizer.pad_token_id, ImageLoader(self.image_processor), left_pad=left_pad)

    def add_peft(self, configs: dict) -> None:
        """Wrap each named part in a peft model with its config ({part: peft config})."""
        from .hfutil import wrap_parts
        wrap_parts(self, configs)

    def load_adapters(self, path) -> None:
        """Put the peft adapters saved in a model folder (`PART_adapter/`) back on their parts."""
        from peft import PeftModel
        for p in PARTS:
            if (Path(path) / f"{p}_adapter").is_dir():
                setattr(self, p, PeftModel.from_pretrained(getattr(self, p), str(Path(path) / f"{p}_adapter"),
                                                           is_trainable=False))

    def dequantize(self) -> None:
        """The 4-bit LLM (a QLoRA run's base) as fp32 weights, so that adapters merge into full precision."""
        from transformers import AutoModelForCausalLM

        from .hfutil import dequantized
        self.llm = dequantized(self.llm, AutoModelForCausalLM)

    def base_llm(self):
        """The LLM under any peft wrapper."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def peft_parts(self) -> list[str]:
        """The parts wrapped in a peft model (LoRA, DoRA, IA3, prompt / prefix tuning)."""
        return [p for p in PARTS if hasattr(getattr(self, p), "peft_config")]

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base model: every part's peft adapters off until the block ends (the DPO / PPO reference)."""
        with contextlib.ExitStack() as stack:
            for p in self.peft_parts():
                stack.enter_context(getattr(self, p).disable_adapter())
            yield

    def merge_adapters(self) -> None:
        """Fold every part's peft adapters into its weights (peft's merge_and_unload)."""
        for p in self.peft_parts():
            setattr(self, p, getattr(self, p).merge_and_unload())

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vdtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=pixel_values.to(vdtype), output_hidden_states=True)
        feats = out.hidden_states[self.spec["vision_feature_layer"]]
        if feats.shape[1] == self.spec["num_patches"] + 1:  # CLIP's CLS token carries no patch content
            feats = feats[:, 1:]
        return self.connector(feats.to(next(self.connector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self.connector, "media"):  # xattn: the images go to the cross-attention, not the sequence
            media = None if pixel_values is None else self.encode_images(pixel_values)
            if media is not None and media.shape[0] != input_ids.shape[0]:
                raise ValueError(f"the xattn connector takes one image per record: {media.shape[0]} images "
                                 f"for {input_ids.shape[0]} records")
            self.connector.media = media
        is_img = input_ids == self.image_token_id
        emb_layer = self.llm.get_input_embeddings()
        emb = emb_layer(input_ids.masked_fill(is_img, 0))
        n_img = int(is_img.sum())
        if n_img:
            if pixel_values is None:
                raise ValueError("image tokens in the batch but no pixel_values")
            img = self.encode_images(pixel_values).to(emb.dtype)
            if img.shape[0] * img.shape[1] != n_img:
                raise ValueError(f"{n_img} image tokens for {img.shape[0]} images of {img.shape[1]} tokens")
            emb = emb.masked_scatter(is_img.unsqueeze(-1), img.reshape(-1, img.shape[-1]))
        return emb

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, position_ids=None) -> torch.Tensor:
        from .prompt_learning import with_virtual_tokens
        emb = self.embed(input_ids, pixel_values)
        decoder = self.base_llm().get_decoder()
        if position_ids is not None:  # packed records: with no mask, transformers keeps each record's attention
            # to itself from where the positions restart (a block-diagonal causal mask; varlen on flash-attention)
            return decoder(inputs_embeds=emb, position_ids=position_ids, use_cache=False).last_hidden_state
        emb, attention_mask, extra, drop = with_virtual_tokens(self.llm, emb, attention_mask)
        return decoder(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False,
                       **extra).last_hidden_state[:, drop:]

    @property
    def head(self) -> nn.Module:
        """The LLM's projection onto the vocabulary."""
        return self.llm.get_output_embeddings()

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None, position_ids=None):
        """Mean next-token loss over labelled positions; logits are computed only where a label is. With
        `position_ids` (packed records, see batching.Collator) the attention mask is not used."""
        from .chunked_loss import mean_nll
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, position_ids)
        if labels is None:
            return self.logits_at(hidden)
        h, y = hidden[:, :-1], labels[:, 1:]
        keep = y != -100
        if not keep.any():
            raise ValueError("no labelled token in the batch")
        # Only assistant tokens carry labels: projecting just those rows onto the vocabulary saves most of the
        # logits memory and compute; the chunked loss never holds more than a chunk of their logits.
        return mean_nll(self.head, h[keep], y[keep], chunked=self.chunked_loss)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=16, temperature=0.0,
                 top_p=1.0, streamer=None, repeats: int = 1) -> torch.Tensor:
        """New tokens for left-padded prompts (HF generate over our input embeddings); a `streamer` (transformers'
        put / end protocol) is handed each step's tokens as they are decoded.

        With `repeats` > 1 each prompt is answered that many times (rows prompt-major, as GRPO's groups): the
        prompt is encoded and run through the LLM once, and its KV cache repeated, instead of once per answer.
        """
        emb = self.embed(input_ids, pixel_values)
        tok = self.tokenizer
        # The image placeholder is input only: a sampled one would be read as an image slot in the next forward.
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, suppress_tokens=[self.image_token_id], streamer=streamer)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)  # no hidden top-k cut: PPO scores this distribution
        else:  # greedy: drop sampling defaults a checkpoint's generation_config may carry
            kw.update(temperature=None, top_p=None, top_k=None)
        from .prompt_learning import num_virtual_tokens, with_virtual_tokens
        if num_virtual_tokens(self.llm):  # peft's generate takes no inputs_embeds: prepend its prompt here
            emb, attention_mask = emb.repeat_interleave(repeats, 0), attention_mask.repeat_interleave(repeats, 0)
            emb, attention_mask, extra, _ = with_virtual_tokens(self.llm, emb, attention_mask, generating=True)
            return self.base_llm().generate(inputs_embeds=emb, attention_mask=attention_mask, **kw, **extra)
        if repeats > 1:
            # All but the last prompt position go through the LLM once per prompt; generate then runs the last
            # position and the answers over the repeated cache. Positions follow the left padding, as generate's.
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            cache = self.llm(inputs_embeds=emb[:, :-1], attention_mask=attention_mask[:, :-1],
                             position_ids=positions[:, :-1], use_cache=True).past_key_values
            cache.batch_repeat_interleave(repeats)
            kw["cache"] = cache
            emb, attention_mask = emb.repeat_interleave(repeats, 0), attention_mask.repeat_interleave(repeats, 0)
        return self.llm.generate(inputs_embeds=emb, attention_mask=attention_mask, **kw)

    # ------------------------------------------------------------------------------------------ save/load
    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for p in self.peft_parts():
            getattr(self, p).save_pretrained(out / f"{p}_adapter")
        with adapters_lifted(self.llm) as llm, adapters_lifted(self.vision) as vision, \
                adapters_lifted(self.connector) as connector:
            llm.save_pretrained(out / "llm")
            vision.save_pretrained(out / "vision")
            state = {k: v.detach().contiguous() for k, v in connector.state_dict().items()}
            save_file(state, str(out / "connector.safetensors"))
        self.tokenizer.save_pretrained(out / "llm")
        self.image_processor.save_pretrained(out / "vision")
        if "bottleneck_adapters" in self.spec:  # tinyml's own adapters (peft has none of that kind)
            from .adapters import save_adapters
            save_adapters(self, out)
        (out / "tinyml_model.json").write_text(json.dumps(self.spec, indent=2))


def build_model(mcfg, dtype=None, quantization_config=None):
    """Compose the model a recipe describes: from `model.init_from` (a tinyml folder) or from its parts."""
    from .prompt_learning import num_virtual_tokens
    if mcfg.vlm and not mcfg.init_from:
        from .hf_vlm import build_vlm
        return build_vlm(mcfg, dtype, quantization_config)
    if mcfg.init_from:
        model = load_model(mcfg.init_from, dtype=dtype, trust_remote_code=mcfg.trust_remote_code,
                           quantization_config=quantization_config)
        # The previous stage's peft adapters fold into the weights this stage starts from (a new peft method
        # would otherwise wrap a peft model, which peft nests under the same adapter name).
        if model.peft_parts():
            prompts = any(getattr(c, "is_adaption_prompt", False) for c in getattr(model.llm, "peft_config", {}).values())
            if getattr(model.base_llm(), "is_loaded_in_4bit", False) or num_virtual_tokens(model.llm) or prompts:
                raise UserError(f"model.init_from={mcfg.init_from}: its adapters do not fold into this run's "
                                f"weights (a 4-bit base, or learned tokens or prompts); run `tinyml merge` on it first for "
                                f"LoRA / QLoRA, and start from the merged folder")
            model.merge_adapters()
        return model
    vision, processor = load_vision(mcfg.vision, mcfg.trust_remote_code, dtype)
    llm, tok = load_llm(mcfg.llm, mcfg.trust_remote_code, dtype, mcfg.attn_implementation, quantization_config)
    vdim, patches = vision_geometry(vision)
    ldim = llm.get_input_embeddings().weight.shape[1]
    llm_layers = llm.config.num_hidden_layers
    connector = build_connector(mcfg.connector, vdim, ldim, *connector_size(mcfg), llm_layers, mcfg.xattn_every)
    if dtype is not None:
        connector.to(dtype)
    spec = {"format": "tinyml-lmm/1", "connector": mcfg.connector, "vision_dim": vdim, "llm_dim": ldim,
            "connector_tokens": mcfg.connector_tokens, "xattn_every": mcfg.xattn_every, "llm_layers": llm_layers,
            "num_patches": patches, "num_image_tokens": connector.num_tokens(patches),
            "vision_feature_layer": mcfg.vision_feature_layer, "resampler_queries": mcfg.resampler_queries,
            "resampler_layers": mcfg.resampler_layers, "llm_source": mcfg.llm, "vision_source": mcfg.vision,
            "qformer_queries": mcfg.qformer_queries, "qformer_layers": mcfg.qformer_layers}
    return LMM(vision, connector, llm, tok, processor, spec)


def is_model_dir(path: str | Path) -> bool:
    """A tinyml model folder, or a transformers LLaVA checkpoint (taken in as a composed model)."""
    return (Path(path) / "tinyml_model.json").is_file() or is_llava_dir(path)


def is_llava_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return (not (Path(path) / "tinyml_model.json").is_file() and cfg.is_file()
            and json.loads(cfg.read_text()).get("model_type") == "llava")


def load_llava(path: str | Path, dtype=None) -> LMM:
    """A transformers `LlavaForConditionalGeneration` checkpoint (LLaVA-1.5, a converted TinyLLaVA, or tinyml's own
    `export --format hf-llava`) as a composed model: its vision tower, its projector as the mlp2x_gelu connector
    (a `linear` activation: the linear connector, whose second layer is folded in) and its language model, so that
    every command, ONNX export and int4 included, runs on it. The inverse of `export.export_hf_llava`."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaForConditionalGeneration,
        SiglipVisionModel,
    )
    c = _hf_load(AutoConfig.from_pretrained, str(path), "LLaVA config")  # checked before any weight is read
    kind = c.vision_config.model_type.replace("_vision_model", "")
    if kind not in ("clip", "siglip"):
        raise UserError(f"{path}: LLaVA with a {c.vision_config.model_type} vision tower (CLIP or SigLIP only)")
    if not isinstance(c.vision_feature_layer, int):
        raise UserError(f"{path}: vision_feature_layer {c.vision_feature_layer} (several layers) has no tinyml equivalent")
    if kind == "clip" and c.vision_feature_select_strategy != "default":
        raise UserError(f"{path}: CLIP features with the CLS token kept ('full') have no tinyml equivalent")
    if c.projector_hidden_act not in ("gelu", "linear"):
        raise UserError(f"{path}: projector activation {c.projector_hidden_act} (tinyml's MLP connector uses gelu)")
    llava = _hf_load(LlavaForConditionalGeneration.from_pretrained, str(path), "LLaVA checkpoint", dtype=dtype,
                     use_safetensors=True)
    vision = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}[kind](c.vision_config)
    vision.load_state_dict(llava.model.vision_tower.state_dict())
    llm = AutoModelForCausalLM.from_config(c.text_config, dtype=dtype)
    llm.get_decoder().load_state_dict(llava.model.language_model.state_dict())
    if not c.text_config.tie_word_embeddings:
        llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
    p = llava.model.multi_modal_projector
    vdim, ldim = p.linear_1.in_features, p.linear_2.out_features
    kind_c = "mlp2x_gelu" if c.projector_hidden_act == "gelu" else "linear"
    connector = build_connector(kind_c, vdim, ldim)
    with torch.no_grad():
        if kind_c == "mlp2x_gelu":
            connector.proj[0].load_state_dict(p.linear_1.state_dict())
            connector.proj[2].load_state_dict(p.linear_2.state_dict())
        else:  # two linear layers in a row are one: W2 (W1 x + b1) + b2
            connector.proj[0].weight.copy_(p.linear_2.weight @ p.linear_1.weight)
            connector.proj[0].bias.copy_(p.linear_2.weight @ p.linear_1.bias + p.linear_2.bias)
    if dtype is not None:
        vision.to(dtype), connector.to(dtype)
    tok = _hf_load(AutoTokenizer.from_pretrained, str(path), "tokenizer")
    processor = _hf_load(AutoImageProcessor.from_pretrained, str(path), "image processor")
    prepare_tokenizer(tok, llm)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != c.image_token_id:
        raise UserError(f"{path}: the image token is id {c.image_token_id}, not the tokenizer's {IMAGE_TOKEN}")
    vdim_, patches = vision_geometry(vision)
    spec = {"format": "tinyml-lmm/1", "connector": kind_c, "vision_dim": vdim, "llm_dim": ldim, "num_patches": patches,
            "num_image_tokens": connector.num_tokens(patches), "vision_feature_layer": c.vision_feature_layer,
            "llm_source": str(path), "vision_source": str(path), "imported_from": "hf-llava"}
    return LMM(vision.eval(), connector, llm, tok, processor, spec)


def load_model(path: str | Path, dtype=None, trust_remote_code: bool = False, adapter: bool = True,
               quantization_config=None):
    """Load a saved tinyml model folder (either kind); the same `from_pretrained` calls as for hub parts.

    A QLoRA run's `llm/` holds the 4-bit base it was trained on, and loads back quantized by itself.
    """
    from safetensors.torch import load_file
    path = Path(path)
    if not is_model_dir(path):
        raise UserError(f"not a tinyml model folder (no tinyml_model.json): {path}")
    if is_llava_dir(path):
        return load_llava(path, dtype)
    spec = json.loads((path / "tinyml_model.json").read_text())
    if spec.get("format") == "tinyml-vlm/1":
        from .hf_vlm import load_vlm
        return load_vlm(path, dtype, trust_remote_code, adapter, quantization_config)
    vision, processor = load_vision(str(path / "vision"), trust_remote_code, dtype)
    llm, tok = load_llm(str(path / "llm"), trust_remote_code, dtype, quantization_config=quantization_config)
    connector = build_connector(spec["connector"], spec["vision_dim"], spec["llm_dim"], *connector_size(spec),
                                spec.get("llm_layers", 0), spec.get("xattn_every", 1))
    connector.load_state_dict(load_file(str(path / "connector.safetensors")))
    if dtype is not None:
        connector.to(dtype)
    model = LMM(vision, connector, llm, tok, processor, spec)
    if adapter:
        load_peft_adapters(model, path)
    if "bottleneck_adapters" in spec:
        from .adapters import load_adapters
        load_adapters(model, path)
    return model


def load_peft_adapters(model, path: str | Path) -> None:
    """Put the peft adapters saved in a model folder back on the model (either kind)."""
    model.load_adapters(path)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


def resolve_dtype(name: str):
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    except KeyError:
        raise UserError(f"model.dtype must be auto, fp32, bf16 or fp16, got '{name}'") from None


def recipe_encoder(cfg) -> Encoder:
    """The Encoder of a recipe's model from its tokenizer and image-token count, without loading any weights."""
    from transformers import AutoConfig, AutoTokenizer

    m = cfg.model
    vlm = m.vlm if not m.init_from else ""
    if m.init_from and json.loads((Path(m.init_from) / "tinyml_model.json").read_text()).get("format") == "tinyml-vlm/1":
        vlm = str(Path(m.init_from) / "vlm")
    if vlm:
        from .hf_vlm import ProcessorImageTokens, load_processor
        images = ProcessorImageTokens(load_processor(vlm, m.trust_remote_code), vlm)
        return encoder_for(SimpleNamespace(tokenizer=images.tok, num_image_tokens=None, image_tokens=images), cfg.data)
    if m.init_from:
        spec = json.loads((Path(m.init_from) / "tinyml_model.json").read_text())
        llm, n_img = str(Path(m.init_from) / "llm"), spec["num_image_tokens"]
    else:
        if not m.vision:
            raise UserError("model.vision is not set (needed to count image tokens)")
        vcfg = _hf_load(AutoConfig.from_pretrained, m.vision, "vision config", trust_remote_code=m.trust_remote_code)
        vcfg = getattr(vcfg, "vision_config", vcfg)
        llm = llm_source(m.llm)
        n_img = ({"resampler": m.resampler_queries, "qformer": m.qformer_queries}.get(m.connector)
                 or (vcfg.image_size // vcfg.patch_size) ** 2)
    tok = _hf_load(AutoTokenizer.from_pretrained, llm, "tokenizer", trust_remote_code=m.trust_remote_code)
    prepare_tokenizer(tok, None)
    return encoder_for(SimpleNamespace(tokenizer=tok, num_image_tokens=n_img, render_chat=compiled_chat_template(tok)),
                       cfg.data)

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

import torch
import torch.nn.functional as F
from torch import nn

from .. import IMAGE_TOKEN, UserError
from ..config import Part
from .connectors import build_connector, connector_size

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ------------------------------------------------------------------------------------------ loading parts
def _hf_load(fn, ident: str, what: str, **kw):
    """from_pretrained with a one-line user error for a missing folder or an id that can't be reached.

    Weights load only from safetensors (`use_safetensors=True` where passed): a pickled checkpoint can run
    code when it is unpickled, so one from a stranger is refused rather than trusted.
    """
    try:
        return fn(ident, **kw)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what} '{ident}': {msg}") from None


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


def prepare_tokenizer(tok, llm) -> None:
    """Make sure the tokenizer has an image token, a pad token and a chat template; grow embeddings if needed."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if llm is not None and len(tok) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok))


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

    @property
    def num_image_tokens(self) -> int:
        return self.spec["num_image_tokens"]

    @property
    def device(self):
        return next(self.llm.parameters()).device

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

    def hidden_states(self, input_ids, attention_mask, pixel_values=None) -> torch.Tensor:
        from .prompt_learning import with_virtual_tokens
        emb = self.embed(input_ids, pixel_values)
        decoder = self.base_llm().get_decoder()
        emb, attention_mask, extra, drop = with_virtual_tokens(self.llm, emb, attention_mask)
        return decoder(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False,
                       **extra).last_hidden_state[:, drop:]

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(hidden)

    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None):
        """Mean next-token loss over labelled positions; logits are computed only where a label is."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values)
        if labels is None:
            return self.logits_at(hidden)
        h, y = hidden[:, :-1], labels[:, 1:]
        keep = y != -100
        if not keep.any():
            raise ValueError("no labelled token in the batch")
        # Only assistant tokens carry labels: projecting just those rows onto the vocabulary saves most of the
        # logits memory and compute, and chunking bounds it for large vocabularies.
        h, y = h[keep], y[keep]
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, y.shape[0], 2048):
            logits = self.logits_at(h[i:i + 2048]).float()
            total = total + F.cross_entropy(logits, y[i:i + 2048], reduction="sum")
        return total / y.shape[0]

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=16, temperature=0.0,
                 top_p=1.0, repeats: int = 1) -> torch.Tensor:
        """New tokens for left-padded prompts (HF generate over our input embeddings).

        With `repeats` > 1 each prompt is answered that many times (rows prompt-major, as GRPO's groups): the
        prompt is encoded and run through the LLM once, and its KV cache repeated, instead of once per answer.
        """
        emb = self.embed(input_ids, pixel_values)
        tok = self.tokenizer
        # The image placeholder is input only: a sampled one would be read as an image slot in the next forward.
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, suppress_tokens=[self.image_token_id])
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


@contextlib.contextmanager
def adapters_lifted(module):
    """The base model of a peft model with its original layers back in place, until the block ends (any other
    module: itself).

    peft wraps each adapted layer (`q_proj` -> `q_proj.base_layer` + `lora_A`...); saved as is, the base's own
    weights would be missing under their real names and re-initialised on load. Swapping the modules (rather
    than passing a cleaned state dict, which the bitsandbytes quantizer ignores) works for 4-bit bases too.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    if not hasattr(module, "get_base_model"):
        yield module
        return
    base = module.get_base_model()
    swapped = []
    for name, mod in list(base.named_modules()):
        if isinstance(mod, BaseTunerLayer) and hasattr(mod, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            setattr(parent, child, mod.base_layer)
            swapped.append((parent, child, mod))
    try:
        yield base
    finally:
        for parent, child, mod in swapped:
            setattr(parent, child, mod)


def build_model(mcfg, dtype=None, quantization_config=None) -> LMM:
    """Compose the model a recipe describes: from `model.init_from` (a tinyml folder) or from its parts."""
    from .prompt_learning import num_virtual_tokens
    if mcfg.init_from:
        model = load_model(mcfg.init_from, dtype=dtype, trust_remote_code=mcfg.trust_remote_code,
                           quantization_config=quantization_config)
        # The previous stage's peft adapters fold into the weights this stage starts from (a new peft method
        # would otherwise wrap a peft model, which peft nests under the same adapter name).
        if model.peft_parts():
            if getattr(model.base_llm(), "is_loaded_in_4bit", False) or num_virtual_tokens(model.llm):
                raise UserError(f"model.init_from={mcfg.init_from}: its adapters do not fold into this run's "
                                f"weights (a 4-bit base, or learned tokens); run `tinyml merge` on it first for "
                                f"LoRA / QLoRA, and start from the merged folder")
            model.merge_adapters()
        return model
    vision, processor = load_vision(mcfg.vision, mcfg.trust_remote_code, dtype)
    llm, tok = load_llm(mcfg.llm, mcfg.trust_remote_code, dtype, mcfg.attn_implementation, quantization_config)
    vdim, patches = vision_geometry(vision)
    ldim = llm.get_input_embeddings().weight.shape[1]
    connector = build_connector(mcfg.connector, vdim, ldim, *connector_size(mcfg))
    if dtype is not None:
        connector.to(dtype)
    spec = {"format": "tinyml-lmm/1", "connector": mcfg.connector, "vision_dim": vdim, "llm_dim": ldim,
            "num_patches": patches, "num_image_tokens": connector.num_tokens(patches),
            "vision_feature_layer": mcfg.vision_feature_layer, "resampler_queries": mcfg.resampler_queries,
            "resampler_layers": mcfg.resampler_layers, "llm_source": mcfg.llm, "vision_source": mcfg.vision,
            "qformer_queries": mcfg.qformer_queries, "qformer_layers": mcfg.qformer_layers}
    return LMM(vision, connector, llm, tok, processor, spec)


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "tinyml_model.json").is_file()


def load_model(path: str | Path, dtype=None, trust_remote_code: bool = False, adapter: bool = True,
               quantization_config=None) -> LMM:
    """Load a saved tinyml model folder; the same `from_pretrained` calls as for hub parts.

    A QLoRA run's `llm/` holds the 4-bit base it was trained on, and loads back quantized by itself.
    """
    from safetensors.torch import load_file
    path = Path(path)
    if not is_model_dir(path):
        raise UserError(f"not a tinyml model folder (no tinyml_model.json): {path}")
    spec = json.loads((path / "tinyml_model.json").read_text())
    vision, processor = load_vision(str(path / "vision"), trust_remote_code, dtype)
    llm, tok = load_llm(str(path / "llm"), trust_remote_code, dtype, quantization_config=quantization_config)
    connector = build_connector(spec["connector"], spec["vision_dim"], spec["llm_dim"], *connector_size(spec))
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


def load_peft_adapters(model: LMM, path: str | Path) -> None:
    """Put the peft adapters saved in a model folder (`PART_adapter/`) back on their parts."""
    from peft import PeftModel
    for p in PARTS:
        if (Path(path) / f"{p}_adapter").is_dir():
            setattr(model, p, PeftModel.from_pretrained(getattr(model, p), str(Path(path) / f"{p}_adapter"),
                                                        is_trainable=False))


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

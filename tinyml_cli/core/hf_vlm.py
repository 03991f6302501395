"""The second kind of model: a published image-text-to-text checkpoint (`model.vlm: <hub id or folder>`), loaded
with `AutoModelForImageTextToText` and its `AutoProcessor`, behind the interface the composed LMM (model.py)
offers to stages: tokenizer, an image-token expander for the encoder, collator, hidden_states / logits_at /
forward, generate, save / load, peft_parts / adapters_disabled / merge_adapters, base_llm, and the parts
`vision` / `connector` / `llm` (views over the family's own modules, found by name: `PART_NAMES`).

Records go through the family's own pieces: its chat template renders the messages (an image becomes an image
part), its processor's `replace_image_token` says what each image becomes (variable counts: Qwen's dynamic
resolution, SmolVLM / Idefics3 splitting, InternVL tiling), its image processor makes the pixel tensors and
extras (`image_grid_thw`, `pixel_attention_mask`, ...), and the model's own forward merges the image features.
What is family-specific lives here, in `token_types` and `PART_NAMES`. A model folder:

    tinyml_model.json   {"format": "tinyml-vlm/1", "family", "source", "peft_parts"}
    vlm/                the HF model and its processor (save_pretrained; loads with from_pretrained)
    vlm_adapter/        the peft adapter over the whole model (LoRA / DoRA on the parts in peft.parts)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .. import IMAGE_TOKEN, UserError

FORMAT = "tinyml-vlm/1"
# A parameter belongs to the part named by the last component of its name that is listed here (else to the LLM):
# `model.visual.merger.*` is Qwen's connector inside its vision module.
PART_NAMES = {
    "connector": ("multi_modal_projector", "connector", "merger", "deepstack_merger_list", "mlp1"),
    "vision": ("vision_tower", "vision_model", "visual", "vision_encoder"),
}


def part_of(name: str) -> str:
    for comp in reversed(name.split(".")):
        for part, names in PART_NAMES.items():
            if comp in names:
                return part
    return "llm"


class PartView(nn.Module):
    """The modules of one part of a HF VLM, as one module (not registered anywhere: a view)."""

    def __init__(self, pieces: list[tuple[str, nn.Module]], hf=None):
        super().__init__()
        for name, module in pieces:
            self.add_module(name.replace(".", "/") or "model", module)
        object.__setattr__(self, "_hf", hf)  # the LLM view answers for the model's embeddings

    def get_input_embeddings(self):
        return self._hf.get_input_embeddings()

    def get_output_embeddings(self):
        return self._hf.get_output_embeddings()

    @property
    def config(self):
        return getattr(self._hf.config, "text_config", self._hf.config)

    def full_name(self, name: str) -> str:
        """A module name inside the view as its name inside the HF model."""
        return name.replace("/", ".")


def split_parts(hf) -> dict[str, list[tuple[str, nn.Module]]]:
    """The largest submodules of a HF VLM whose parameters all belong to one part."""
    out = {"vision": [], "connector": [], "llm": []}

    def walk(module, name):
        parts = {part_of(f"{name}.{n}" if name else n) for n, _ in module.named_parameters()}
        if len(parts) == 1:
            out[parts.pop()].append((name, module))
        elif parts:
            for child, m in module.named_children():
                walk(m, f"{name}.{child}" if name else child)
    walk(hf, "")
    return out


# ------------------------------------------------------------------------------------------- processors
class NoVideos(dict):
    """Stands in for a processor's video processor: transformers 5's video processors need torchvision, which
    tinyml does not install, and tinyml feeds images only. (A dict, so that the processor's config serialises.)"""
    _auto_class = None
    model_input_names: list = []
    num_frames = fps = None  # read by SmolVLM's apply_chat_template


def without_videos(cls):
    """The processor class, accepting `NoVideos` as its video processor."""
    class Processor(cls):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and isinstance(arg, NoVideos):
                return NoVideos
            return super().check_argument_for_proper_class(name, arg)
    Processor.__name__ = Processor.__qualname__ = cls.__name__  # saved as the family's own class
    return Processor


def _lfm2_vl_image_processor():
    """LFM2-VL's image processor on transformers' PIL backend (transformers ships it for torchvision only): the
    same smart resize, tiling with a thumbnail, patchify and padding to `max_num_patches`, with numpy. PIL's
    bilinear resize differs slightly from torchvision's antialiased one, so pixels may differ in the last bits."""
    import math

    import numpy as np
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling, SizeDict
    from transformers.processing_utils import ImagesKwargs

    class Lfm2VlKwargs(ImagesKwargs, total=False):
        downsample_factor: int
        do_image_splitting: bool
        min_tiles: int
        max_tiles: int
        use_thumbnail: bool
        min_image_tokens: int
        max_image_tokens: int
        encoder_patch_size: int
        tile_size: int
        max_pixels_tolerance: float
        return_row_col_info: bool

    class Lfm2VlImageProcessorPil(PilBackend):
        downsample_factor, do_image_splitting, min_tiles, max_tiles, use_thumbnail = 2, True, 2, 10, True
        min_image_tokens, max_image_tokens, encoder_patch_size, tile_size, max_pixels_tolerance = 64, 256, 16, 512, 2.0
        do_resize, size, resample = True, {"height": 512, "width": 512}, PILImageResampling.BILINEAR
        do_rescale, rescale_factor, do_normalize, do_pad, return_row_col_info = True, 1 / 255, True, True, False
        image_mean, image_std = IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
        model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]
        valid_kwargs = Lfm2VlKwargs

        def __init__(self, **kwargs):
            for k in ("downsample_factor", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail",
                      "min_image_tokens", "max_image_tokens", "encoder_patch_size", "tile_size",
                      "max_pixels_tolerance", "return_row_col_info"):
                if k in kwargs:
                    setattr(self, k, kwargs.pop(k))
            kwargs.pop("max_num_patches", None)
            super().__init__(**kwargs)
            self.max_num_patches = max(self.max_image_tokens * self.downsample_factor ** 2,
                                       (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0)

        def to_dict(self):
            d = super().to_dict()
            for k in ("downsample_factor", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail",
                      "min_image_tokens", "max_image_tokens", "encoder_patch_size", "tile_size", "max_pixels_tolerance"):
                d[k] = getattr(self, k)
            return d

        def _smart_resize(self, h, w):
            f, p = self.encoder_patch_size * self.downsample_factor, self.encoder_patch_size
            lo, hi = self.min_image_tokens * p * p * self.downsample_factor ** 2, self.max_image_tokens * p * p * self.downsample_factor ** 2
            hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
            if hb * wb > hi:
                beta = math.sqrt(h * w / hi)
                hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
            elif hb * wb < lo:
                beta = math.sqrt(lo / (h * w))
                hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
            return hb, wb

        def _grid(self, h, w):
            ratios = sorted({(a, b) for n in range(self.min_tiles, self.max_tiles + 1) for a in range(1, n + 1)
                             for b in range(1, n + 1) if self.min_tiles <= a * b <= self.max_tiles}, key=lambda r: r[0] * r[1])
            best, diff = (1, 1), float("inf")
            for r in ratios:
                d = abs(w / h - r[0] / r[1])
                if d < diff:
                    best, diff = r, d
                elif d == diff and h * w > 0.5 * self.tile_size ** 2 * r[0] * r[1]:
                    best = r
            return best

        def _preprocess(self, images, resample=None, return_tensors=None, **kwargs):
            p, f = self.encoder_patch_size, self.encoder_patch_size * self.downsample_factor
            split = self.do_image_splitting and not self.min_tiles == self.max_tiles == 1
            mean, std = np.array(self.image_mean)[:, None, None], np.array(self.image_std)[:, None, None]
            tiles_all, rows, cols, sizes = [], [], [], []
            for image in images:
                h, w = image.shape[-2:]
                hb, wb = self._smart_resize(h, w)
                large = (max(p, round(h / f) * f) * max(p, round(w / f) * f)
                         > self.max_image_tokens * p * p * self.downsample_factor ** 2 * self.max_pixels_tolerance)
                if large and split:
                    gw, gh = self._grid(h, w)
                    big = self.resize(image, SizeDict(height=self.tile_size * gh, width=self.tile_size * gw), resample)
                    t = self.tile_size
                    tiles = [big[:, r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(gh) for c in range(gw)]
                    if self.use_thumbnail and gw * gh != 1:
                        tiles.append(self.resize(image, SizeDict(height=hb, width=wb), resample))
                    rows.append(gh), cols.append(gw)
                else:
                    tiles = [self.resize(image, SizeDict(height=hb, width=wb), resample)]
                    rows.append(1), cols.append(1)
                sizes.append([hb, wb])
                tiles_all += tiles
            pixels, masks, shapes = [], [], []
            for t in tiles_all:
                t = (t.astype(np.float32) * self.rescale_factor - mean) / std
                c, th, tw = t.shape
                nh, nw = th // p, tw // p
                patches = t.reshape(c, nh, p, nw, p).transpose(1, 3, 2, 4, 0).reshape(nh * nw, p * p * c)
                mask = np.zeros(self.max_num_patches, dtype=np.int32)
                mask[:nh * nw] = 1
                padded = np.zeros((self.max_num_patches, p * p * c), dtype=np.float32)
                padded[:nh * nw] = patches
                pixels.append(padded), masks.append(mask), shapes.append([nh, nw])
            data = {"pixel_values": np.stack(pixels), "pixel_attention_mask": np.stack(masks),
                    "spatial_shapes": np.array(shapes, dtype=np.int64)}
            if kwargs.get("return_row_col_info", self.return_row_col_info):
                data.update(image_rows=rows, image_cols=cols, image_sizes=sizes)
            return BatchFeature(data=data, tensor_type=return_tensors)

    return Lfm2VlImageProcessorPil


def load_processor(ident: str, trust_remote_code: bool = False):
    """AutoProcessor.from_pretrained, or (for a processor with a video part) the family's processor class built
    from its tokenizer, image processor and saved settings without the video processor."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from .hfutil import _hf_load
    try:
        return AutoProcessor.from_pretrained(ident, trust_remote_code=trust_remote_code)
    except (ValueError, AttributeError, ImportError) as e:
        if "video" not in str(e).lower() and "torchvision" not in str(e):
            raise UserError(f"cannot load the processor of '{ident}': {str(e).splitlines()[0]}") from None
    except OSError as e:
        if "torchvision" not in str(e):
            raise UserError(f"cannot load the processor of '{ident}': {str(e).splitlines()[0]}") from None
    cfg = _hf_load(AutoConfig.from_pretrained, ident, "VLM config", trust_remote_code=trust_remote_code)
    cls = without_videos(getattr(transformers, PROCESSOR_MAPPING_NAMES[cfg.model_type]))
    processor_dict, kwargs = cls.get_processor_dict(ident)
    args = []
    for attr in cls.get_attributes():
        if attr == "tokenizer":
            args.append(AutoTokenizer.from_pretrained(ident, trust_remote_code=trust_remote_code))
        elif attr == "image_processor":
            try:
                args.append(AutoImageProcessor.from_pretrained(ident, trust_remote_code=trust_remote_code))
            except (ImportError, ValueError, OSError) as e:
                if cfg.model_type != "lfm2_vl" or "torchvision" not in str(e):
                    raise UserError(f"cannot load the image processor of '{ident}': {str(e).splitlines()[0]}") from None
                args.append(_lfm2_vl_image_processor().from_pretrained(ident))
        elif attr == "video_processor":
            args.append(NoVideos())
        else:
            raise UserError(f"the processor of '{ident}' needs a {attr}, which tinyml cannot load")
    return cls.from_args_and_dict(args, processor_dict, **kwargs)


def message_parts(content: str) -> list[dict]:
    """Text with `<image>` markers as chat-template parts: image parts where the markers are, text between
    (the newline that conventionally follows a marker is dropped: the family's template places its own)."""
    parts = []
    for i, piece in enumerate(content.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        piece = piece.strip("\n") if i or IMAGE_TOKEN in content else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class ProcessorImageTokens:
    """What the encoder needs from a processor: the rendered chat, the placeholder the processor replaces, and
    the tokens each image becomes. An image's tokens depend only on its size, so they are worked out once per
    size, from a blank image of that size, with the processor's own `replace_image_token`."""

    def __init__(self, processor, source: str = ""):
        self.processor, self.tok = processor, processor.tokenizer
        if not getattr(processor, "chat_template", None):
            raise UserError(f"the processor of '{source}' has no chat template: tinyml renders conversations with "
                            "it (give the folder a chat_template.jinja)")
        self.placeholder = processor.image_token
        self.cache: dict = {}

    def render(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        conv = [{"role": m["role"], "content": message_parts(m["content"])} for m in msgs]
        return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)

    def ids(self, image) -> list[int]:
        from ..records.conversations import image_size
        size = image_size(image)
        if size not in self.cache:
            from PIL import Image

            from .batching import process_images
            _, text = process_images(self.processor, [[Image.new("RGB", size)]])
            self.cache[size] = self.tok(text[0], add_special_tokens=False)["input_ids"]
        return self.cache[size]


# --------------------------------------------------------------------------------------------- the model
class _SoftCapped(nn.Module):
    """A vocabulary projection whose logits are soft-capped: cap * tanh(logits / cap)."""

    def __init__(self, linear: nn.Module, cap: float):
        super().__init__()
        self.linear, self.cap = linear, cap

    def forward(self, hidden):
        return torch.tanh(self.linear(hidden) / self.cap) * self.cap


class HFVLM(nn.Module):
    """A HF image-text-to-text model behind the composed LMM's interface (see the module docstring)."""

    def __init__(self, hf, processor, spec: dict):
        super().__init__()
        self.model = hf  # the HF model, or a peft model around it
        self.processor, self.spec = processor, spec
        self.family = hf.config.model_type
        self.tokenizer = processor.tokenizer if processor is not None else None
        if self.tokenizer is not None and self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token_id = getattr(hf.config, "image_token_id", None) or getattr(hf.config, "image_token_index", None)
        self.image_tokens = ProcessorImageTokens(processor, spec.get("source", "")) if processor is not None else None
        import inspect
        self.forward_inputs = set(inspect.signature(self.hf.model.forward).parameters)

    # -- the interface the stages use
    @property
    def hf(self):
        """The HF model under any peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model

    @property
    def num_image_tokens(self):
        return None  # per image: see image_tokens

    @property
    def hidden_size(self) -> int:
        return self.hf.get_output_embeddings().weight.shape[1]

    @property
    def dtype(self):
        return self.hf.get_output_embeddings().weight.dtype

    @property
    def device(self):
        return next(self.hf.parameters()).device

    def _parts(self):
        return split_parts(self.hf)

    @property
    def vision(self):
        return PartView(self._parts()["vision"], self.hf)

    @property
    def connector(self):
        return PartView(self._parts()["connector"], self.hf)

    @property
    def llm(self):
        return PartView(self._parts()["llm"], self.hf)

    def dequantize(self) -> None:
        """A 4-bit (QLoRA) base as fp32 weights, so that adapters merge into full precision."""
        from transformers import AutoModelForImageTextToText

        from .hfutil import dequantized
        self.model = dequantized(self.hf, AutoModelForImageTextToText)

    def base_llm(self):
        """The HF model under any peft wrapper (gradient checkpointing, 4-bit checks apply to all of it)."""
        return self.hf

    def collator(self, left_pad: bool = False):
        from .batching import ProcessorCollator
        return ProcessorCollator(self.processor, self.family, self.forward_inputs, left_pad)

    def peft_parts(self) -> list[str]:
        return list(self.spec.get("peft_parts", [])) if hasattr(self.model, "peft_config") else []

    @contextlib.contextmanager
    def adapters_disabled(self):
        if hasattr(self.model, "peft_config"):
            with self.model.disable_adapter():
                yield
        else:
            yield

    def merge_adapters(self) -> None:
        if hasattr(self.model, "peft_config"):
            self.model = self.model.merge_and_unload()
        self.spec["peft_parts"] = []

    def add_peft(self, configs: dict) -> None:
        """LoRA / DoRA on the linear layers of the named parts, as one peft model over the whole HF model (so
        that the adapter loads with `PeftModel.from_pretrained(AutoModelForImageTextToText..., vlm_adapter)`)."""
        from peft import LoraConfig, get_peft_model
        names = []
        for part, cfg in configs.items():
            if not isinstance(cfg, LoraConfig):
                raise UserError(f"peft.method={cfg.peft_type.value.lower()} is not available for model.vlm "
                                "checkpoints: use full, freeze, lora, dora, qlora or bitfit")
            names += lora_targets(self, part, cfg.target_modules)
        first = next(iter(configs.values()))
        config = LoraConfig(r=first.r, lora_alpha=first.lora_alpha, lora_dropout=first.lora_dropout,
                            use_dora=first.use_dora, target_modules=sorted(set(names)))
        self.model = get_peft_model(self.model, config)
        self.spec["peft_parts"] = list(configs)

    def load_adapters(self, path) -> None:
        from peft import PeftModel
        if (Path(path) / "vlm_adapter").is_dir():
            self.model = PeftModel.from_pretrained(self.model, str(Path(path) / "vlm_adapter"), is_trainable=False)

    # -- compute
    def hidden_states(self, input_ids, attention_mask, pixel_values=None) -> torch.Tensor:
        extra = dict(pixel_values or {})
        return self.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             **extra).last_hidden_state

    @property
    def head(self) -> nn.Module:
        """The projection onto the vocabulary (soft-capped where the family caps its logits, as Gemma does): what
        the chunked losses project each chunk of rows with."""
        linear = self.hf.get_output_embeddings()
        cap = getattr(getattr(self.hf.config, "text_config", self.hf.config), "final_logit_softcapping", None)
        return _SoftCapped(linear, cap) if cap else linear

    def logits_at(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None):
        from .hfutil import labelled_loss
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values)
        return self.logits_at(hidden) if labels is None else labelled_loss(self.logits_at, hidden, labels)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, max_new_tokens=16, temperature=0.0,
                 top_p=1.0, repeats: int = 1) -> torch.Tensor:
        """New tokens for left-padded prompts (the model's own generate, image inputs included); `repeats` answers
        per prompt, rows prompt-major (generate's num_return_sequences expands each family's image inputs)."""
        tok = self.tokenizer
        eos = self.hf.generation_config.eos_token_id
        eos = list(dict.fromkeys(([eos] if isinstance(eos, int) else list(eos or [])) + [tok.eos_token_id]))
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  eos_token_id=eos, suppress_tokens=[self.image_token_id] if self.image_token_id is not None else None)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        if repeats > 1:
            kw["num_return_sequences"] = repeats
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, **dict(pixel_values or {}), **kw)
        return out[:, input_ids.shape[1]:]

    # -- save / load
    def save(self, out: str | Path) -> None:
        from .hfutil import adapters_lifted
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(out / "vlm_adapter")
        with adapters_lifted(self.model) as hf:
            hf.save_pretrained(out / "vlm")
        self.processor.save_pretrained(out / "vlm")
        spec = {**self.spec, "format": FORMAT, "family": self.family, "peft_parts": self.peft_parts()}
        (out / "tinyml_model.json").write_text(json.dumps(spec, indent=2))


def lora_targets(model: HFVLM, part: str, targets) -> list[str]:
    """Full names of the linear layers LoRA adapts in a part: `all-linear` (the LLM's output head excepted), or
    those whose own name is in the list."""
    from .hfutil import linear_names
    view = getattr(model, part)
    head = model.hf.get_output_embeddings()
    linear = [n for n in linear_names(view) if view.get_submodule(n) is not head]
    if targets != "all-linear":
        wanted = {targets} if isinstance(targets, str) else set(targets)
        # the recipe's names (a layer's own name), or the part's layers as trainable.peft_config lists them
        linear = [n for n in linear if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    if not linear:
        raise UserError(f"peft.target_modules={targets} matches no linear layer of the {part} "
                        f"({model.family})")
    return [view.full_name(n) for n in linear]


def _load_hf(ident: str, dtype=None, trust_remote_code: bool = False, quantization_config=None,
             attn_implementation: str = "sdpa"):
    from transformers import AutoModelForImageTextToText

    from .hfutil import _hf_load
    quant = {}
    if quantization_config is not None:  # QLoRA: the LLM in 4-bit, the vision tower, connector and head kept
        # transformers matches these from the start of a module's name or as regexes: any depth here
        quantization_config.llm_int8_skip_modules = [rf"(?:.*\.)?{n}" for n in
                                                     (*PART_NAMES["vision"], *PART_NAMES["connector"], "lm_head")]
        quant = {"quantization_config": quantization_config}
    return _hf_load(AutoModelForImageTextToText.from_pretrained, ident, "VLM", dtype=dtype, use_safetensors=True,
                    trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, **quant)


def build_vlm(mcfg, dtype=None, quantization_config=None) -> HFVLM:
    """The model `model.vlm` names (a hub id or a folder with config, weights and processor)."""
    hf = _load_hf(mcfg.vlm, dtype, mcfg.trust_remote_code, quantization_config, mcfg.attn_implementation)
    processor = load_processor(mcfg.vlm, mcfg.trust_remote_code)
    return HFVLM(hf, processor, {"format": FORMAT, "source": mcfg.vlm})


def load_vlm(path: str | Path, dtype=None, trust_remote_code: bool = False, adapter: bool = True,
             quantization_config=None) -> HFVLM:
    path = Path(path)
    spec = json.loads((path / "tinyml_model.json").read_text())
    hf = _load_hf(str(path / "vlm"), dtype, trust_remote_code, quantization_config)
    model = HFVLM(hf, load_processor(str(path / "vlm"), trust_remote_code), spec)
    if adapter:
        model.load_adapters(path)
    return model


# Image tokens of one image (one tile) at a family's usual resolution: what `tinyml estimate` counts. Families that
# resize dynamically (Qwen, LFM2) are counted at the side given here; `--image-size` sets another.
DEFAULT_SIDE = {"qwen2_5_vl": 448, "qwen3_vl": 448, "lfm2_vl": 512, "qwen2_vl": 448}


def vision_config(config):
    """The vision config's sizes under one set of names (Qwen's say `num_heads` and `depth`)."""
    from types import SimpleNamespace
    v = config.vision_config
    patch = v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size
    side = getattr(v, "image_size", None) or DEFAULT_SIDE.get(config.model_type, 448)
    side = side[0] if isinstance(side, (list, tuple)) else side
    return SimpleNamespace(model_type=v.model_type, hidden_size=v.hidden_size, patch_size=patch, image_size=side,
                           intermediate_size=getattr(v, "intermediate_size", 4 * v.hidden_size),
                           num_attention_heads=getattr(v, "num_attention_heads", None) or v.num_heads,
                           num_hidden_layers=getattr(v, "num_hidden_layers", None) or getattr(v, "depth", 0))


def image_geometry(config, side: int = 0) -> tuple[int, int, int]:
    """(image side, vision patches, image tokens) of one square image (one tile) for a family's config."""
    v, fam = vision_config(config), config.model_type
    side = side or v.image_size
    patches = (side // v.patch_size) ** 2
    if fam in ("idefics3", "smolvlm"):
        tokens = patches // config.scale_factor ** 2
    elif fam in ("qwen2_5_vl", "qwen3_vl", "qwen2_vl"):
        tokens = patches // config.vision_config.spatial_merge_size ** 2
    elif fam == "lfm2_vl":
        tokens = patches // config.downsample_factor ** 2
    elif fam == "gemma3":
        tokens = config.mm_tokens_per_image
    elif fam == "internvl":
        tokens = int(patches * config.downsample_ratio ** 2)
    else:  # llava, paligemma: one token per patch (LLaVA's "default" strategy drops CLIP's CLS token)
        tokens = patches
    return side, patches, tokens


def num_parameters(model: HFVLM) -> dict:
    """Parameters per part and in all (peft adapters apart): the parts cover the model exactly once."""
    counts = {p: sum(w.numel() for n, w in getattr(model, p).named_parameters() if "lora_" not in n)
              for p in ("vision", "connector", "llm")}
    counts["total"] = sum(counts.values())
    return counts

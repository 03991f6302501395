"""Memory planner: what a training or inference setting of a recipe needs, part by part, and how to make it fit.

Parameter counts are exact: the model is built from its `config.json` files on the meta device (no weights,
no memory) and the recipe's trainable parts and peft adapters are applied to it with the training code's own
`configure_trainable`. The rest is arithmetic over those counts and the configs' shapes:

- weights per part in their dtype (a qlora LLM's linear layers as bitsandbytes stores them: 4 bits plus
  block constants); gradients and AdamW states for what trains, in the trainable parameters' dtype;
- activations that autograd keeps per decoder layer, from the layer's saved tensors (norm inputs, attention
  q / k / v / output, MLP intermediates; the linear inputs only where their weights train; LoRA's dropout copies
  and masks), per vision layer when the vision tower trains, and for the connector; gradient checkpointing
  keeps one tensor per LLM layer and recomputes one layer at a time in the backward pass;
- logits only at labelled positions (tinyml's loss projects just those, in chunks of 2048 rows), the
  log-softmax saved for the backward pass and its gradients;
- the peak of a step: weights and optimizer states are always there; on top, whichever is largest of every
  saved activation at the start of the backward pass, a layer's backward pass (with checkpointing: the
  recomputed last and first layers), or every gradient at the optimizer step.
A step is assumed to use full-length sequences whose text tokens are all labelled (the upper bound of
`data.max_length`). `measure` runs real training steps of the same setting and reports the measured peak.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from .. import UserError

GIB = 1 << 30


CUDA_CONTEXT = 500 << 20  # CUDA context + cuBLAS / kernels loaded by torch: ~0.3-0.6 GiB on current drivers


ALLOCATOR_OVERHEAD = 0.08  # caching-allocator fragmentation above the peak of live tensors (typical 5-10 %)


LOGIT_CHUNK = 2048  # rows per logits chunk in LMM.forward


QLORA_BLOCK = 64  # bitsandbytes 4-bit quantization block


# Consumer and workstation cards of 8-24 GB (and one 48 GB for scale): name, memory in GiB.
GPUS = [("RTX 3070 / 4060 / 4060 Ti 8GB", 8), ("RTX 3080", 10), ("RTX 2080 Ti", 11),
        ("RTX 3060 12GB / 4070 / 4070 Ti", 12), ("RTX 4060 Ti 16GB / 4080 / A4000", 16),
        ("RTX 4000 Ada", 20), ("RTX 3090 / 4090 / A5000", 24), ("RTX A6000", 48)]


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


# ------------------------------------------------------------------------------------------- the model
def part_configs(mcfg):
    """(llm config, vision config, connector source) of a recipe, from config.json files only; the connector source
    is the recipe's model section, or the saved spec (a dict) of `model.init_from`."""
    import json

    from transformers import AutoConfig

    from .hfutil import _hf_load, llm_source
    llm, vision, connector = mcfg.llm, mcfg.vision, mcfg
    if mcfg.init_from:
        spec_file = Path(mcfg.init_from) / "tinyml_model.json"
        if not spec_file.is_file():
            raise UserError(f"not a tinyml model folder (no tinyml_model.json): {mcfg.init_from}")
        connector = json.loads(spec_file.read_text())
        llm, vision = str(Path(mcfg.init_from) / "llm"), str(Path(mcfg.init_from) / "vision")
    if not llm:
        raise UserError("model.llm must be set (a hub id or a folder holding a config.json)")
    kw = {"trust_remote_code": mcfg.trust_remote_code}
    lcfg = _hf_load(AutoConfig.from_pretrained, llm_source(llm), "LLM config", **kw)
    if not vision:  # a text-only LLM
        return lcfg, None, connector
    vcfg = _hf_load(AutoConfig.from_pretrained, vision, "vision config", **kw)
    return lcfg, getattr(vcfg, "vision_config", vcfg), connector


def vlm_source(mcfg) -> str:
    """The `model.vlm` checkpoint a recipe trains (directly or through `model.init_from`), or ""."""
    import json
    if mcfg.init_from:
        spec = Path(mcfg.init_from) / "tinyml_model.json"
        if spec.is_file() and json.loads(spec.read_text()).get("format") == "tinyml-vlm/1":
            return str(Path(mcfg.init_from) / "vlm")
        return ""
    return mcfg.vlm


class MetaVLM:
    """A `model.vlm` checkpoint built from its config.json on the meta device (no weights read), with the recipe's
    trainable parts, seen through the same attributes as `MetaLMM`."""

    def __init__(self, cfg, dtype, source: str):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        from .hf_vlm import HFVLM, image_geometry, vision_config
        from .hfutil import _hf_load
        from .trainable import configure_trainable
        config = _hf_load(AutoConfig.from_pretrained, source, "VLM config", trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            hf = AutoModelForImageTextToText.from_config(config, dtype=dtype,
                                                         trust_remote_code=cfg.model.trust_remote_code)
        self.model = HFVLM(hf, None, {"source": source})
        configure_trainable(self.model, cfg)
        self.llm, self.vision, self.connector = self.model.llm, self.model.vision, self.model.connector
        self.config = config
        self.lcfg = getattr(config, "text_config", config)
        self.vcfg = vision_config(config)
        self.num_patches, self.num_image_tokens = image_geometry(config)[1:]
        self.text_only = False

    def tokens_for(self, num_patches: int) -> int:
        from .hf_vlm import image_geometry
        side = int(round(num_patches ** 0.5)) * self.vcfg.patch_size
        return image_geometry(self.config, side)[2]

    def requires_grad_(self, flag: bool):
        self.model.requires_grad_(flag)

    def parameters(self):
        yield from self.model.parameters()


def meta_model(cfg, dtype):
    """The recipe's model on the meta device: either kind."""
    source = vlm_source(cfg.model)
    return MetaVLM(cfg, dtype, source) if source else MetaLMM(cfg, dtype)


class MetaLMM:
    """The parts of an LMM on the meta device, with the recipe's trainable parts (what `configure_trainable` sees).
    Without `model.vision` it is a text-only LLM: the vision tower and the connector are empty modules."""

    def tokens_for(self, num_patches: int) -> int:
        return self.image_tokens(num_patches)

    def add_peft(self, configs: dict) -> None:
        from .hfutil import wrap_parts
        wrap_parts(self, configs)

    def __init__(self, cfg, dtype):
        import torch
        from torch import nn
        from transformers import (
            AutoModelForCausalLM,
            CLIPVisionModel,
            SiglipVisionModel,
        )

        from .connectors import build_connector, connector_size
        from .trainable import configure_trainable
        self.lcfg, self.vcfg, src = part_configs(cfg.model)
        get = src.get if isinstance(src, dict) else lambda k, d=None: getattr(src, k, d)
        self.connector_kind = get("connector")
        kind = self.vcfg.model_type.replace("_vision_model", "") if self.vcfg is not None else None
        if kind not in ("siglip", "clip", None):
            raise UserError(f"vision model type '{self.vcfg.model_type}' is not CLIP or SigLIP")
        with torch.device("meta"):
            self.llm = AutoModelForCausalLM.from_config(self.lcfg, dtype=dtype,
                                                        trust_remote_code=cfg.model.trust_remote_code)
            if kind is None:
                self.vision, self.connector = nn.Module(), nn.Module()
            else:
                self.vision = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}[kind](self.vcfg).to(dtype)
                self.connector = build_connector(self.connector_kind, self.vcfg.hidden_size, self.lcfg.hidden_size,
                                                 *connector_size(src), self.lcfg.num_hidden_layers,
                                                 get("xattn_every", 1)).to(dtype)
        self.num_patches = (self.vcfg.image_size // self.vcfg.patch_size) ** 2 if kind else 0
        self.num_image_tokens = self.image_tokens(self.num_patches)
        configure_trainable(self, cfg)

    @property
    def text_only(self) -> bool:
        return self.vcfg is None

    def image_tokens(self, num_patches: int) -> int:
        return 0 if self.text_only else self.connector.num_tokens(num_patches)

    def requires_grad_(self, flag: bool):
        for part in (self.llm, self.vision, self.connector):
            part.requires_grad_(flag)

    def parameters(self):
        for part in (self.vision, self.connector, self.llm):
            yield from part.parameters()


def _sums(meta: MetaLMM) -> dict:
    """The parameter sums the estimate reads, computed once per model (walking a peft model's parameters is slow,
    and the advice estimates hundreds of settings of one model)."""
    if "_sums" in meta.__dict__:
        return meta._sums
    import torch.nn as nn
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    llm = list(meta.llm.named_parameters())
    head = meta.llm.get_output_embeddings()
    emb = meta.llm.get_input_embeddings().weight
    trainable = [p for p in meta.parameters() if p.requires_grad]
    linears = [m for n, m in meta.llm.named_modules()
               if isinstance(m, nn.Linear) and m is not head and not _is_adapter(n) and getattr(m, "weight", None) is not None]
    meta._sums = dict(
        trainable_bytes=[p.numel() * p.element_size() for p in trainable], trainable_numels=[p.numel() for p in trainable],
        llm_trains=any(p.requires_grad for n, p in llm if not _is_adapter(n)),
        vision_trains=any(p.requires_grad for p in meta.vision.parameters()),
        vision_trained_layers=sum(1 for layer in _vision_layers(meta.vision)
                                  if any(p.requires_grad for p in layer.parameters())),
        vision_params=_numel(meta.vision),
        conn_trains=any(p.requires_grad for p in meta.connector.parameters()),
        head_grad=nbytes(p for p in head.parameters() if p.requires_grad),
        llm_grads=nbytes(p for _, p in llm if p.requires_grad),
        embed_grads=0 if emb is head.weight else nbytes(p for p in meta.llm.get_input_embeddings().parameters()
                                                         if p.requires_grad),
        # the largest gradient of one weight inside the layers (the embeddings and head excluded)
        one_layer_grad=max((p.numel() * p.element_size() for _, p in llm if p.requires_grad and p.numel() < emb.numel()),
                           default=0),
        emb_requires_grad=emb.requires_grad, resid=emb.element_size(),
        llm_matmul=sum(p.numel() for _, p in llm if p is not emb),
        linear_numels=[m.weight.numel() for m in linears])
    return meta._sums


def _numel(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_counts(meta: MetaLMM) -> dict:
    """Exact parameter counts per part (without peft adapters, which are counted apart) and trainable."""
    if "_counts" in meta.__dict__:
        return dict(meta._counts)
    parts = {"llm": meta.llm, "vision": meta.vision, "connector": meta.connector}
    adapters = {k: sum(p.numel() for n, p in m.named_parameters() if _is_adapter(n)) for k, m in parts.items()}
    counts = {k: _numel(m) - adapters[k] for k, m in parts.items()}  # LoRA / DoRA may adapt any part
    counts["total"] = sum(counts.values())
    counts["adapters"] = sum(adapters.values())
    counts["trainable"] = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    meta._counts = dict(counts)
    return counts


def _is_adapter(name: str) -> bool:
    return any(k in name for k in ("lora_", "ia3_"))


def qlora_weight_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of a bitsandbytes 4-bit weight: packed 4-bit values plus one absmax per block of 64.

    With double quantization the absmax values are themselves 8-bit, with an fp32 constant per 256 of them.
    """
    blocks = math.ceil(numel / QLORA_BLOCK)
    consts = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + consts


def weight_bytes(meta: MetaLMM, method: str, double_quant: bool = True) -> dict:
    """Bytes of the weights per part; with qlora the LLM's linear layers (not lm_head) in 4-bit."""
    key = ("_weights", method, double_quant)
    if key in meta.__dict__:
        return dict(meta.__dict__[key])
    meta.__dict__[key] = out = _weight_bytes(meta, method, double_quant)
    return dict(out)


def _weight_bytes(meta: MetaLMM, method: str, double_quant: bool) -> dict:
    import torch.nn as nn
    out = {"vision": sum(p.numel() * p.element_size() for p in meta.vision.parameters()),
           "connector": sum(p.numel() * p.element_size() for p in meta.connector.parameters())}
    llm = 0
    quantized = set()
    if method == "qlora":
        head = meta.llm.get_output_embeddings()
        for name, m in meta.llm.named_modules():
            if isinstance(m, nn.Linear) and m is not head and "lora_" not in name and getattr(m, "weight", None) is not None:
                llm += qlora_weight_bytes(m.weight.numel(), double_quant)
                quantized.add(id(m.weight))
    llm += sum(p.numel() * p.element_size() for p in meta.llm.parameters() if id(p) not in quantized)
    out["llm"] = llm
    return out


# ------------------------------------------------------------------------------------------ the setting
@dataclass
class Setting:
    """Everything besides the model that the estimate depends on."""
    device: str = "cuda"  # cuda | cpu: dtype defaults, dropout mask width, optimizer temporaries, context
    mode: str = "train"  # train | infer
    batch: int = 8
    seq: int = 512  # tokens per record, image tokens included (data.max_length)
    checkpointing: bool = False
    optimizer: str = "adamw"
    grad_accum: int = 1  # > 1: every gradient stays alive across the micro-batches of a step
    in_backward: bool = False  # train.optimizer_in_backward: each weight steps (and drops its gradient) in backward
    chunked_loss: bool = True  # train.chunked_loss
    offload: bool = False  # train.offload_activations
    context: int = 2048  # inference: tokens in the KV cache per sequence
    kv_bytes: int = 2  # inference: KV cache element size (2: bf16 / fp16, 1: fp8)
    image_size: int = 0  # 0: the vision config's resolution


def dtypes(cfg, device: str):
    """(weights dtype, activation element size) the way training resolves them on that device."""
    import torch
    name = cfg.model.dtype
    if name == "auto":
        name = "bf16" if device == "cuda" else "fp32"  # estimates assume a bf16 GPU (Ampere or newer)
    wdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    if wdtype is None:
        raise UserError(f"model.dtype must be auto, fp32, bf16 or fp16, got '{cfg.model.dtype}'")
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if device == "cuda" else "no"
    act = 2 if mp in ("bf16", "fp16") or wdtype != torch.float32 else 4
    return wdtype, act


def _geometry(lcfg) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, heads, kv heads, head dim) of a decoder config."""
    h, i, nh = lcfg.hidden_size, lcfg.intermediate_size, lcfg.num_attention_heads
    return h, i, nh, getattr(lcfg, "num_key_value_heads", None) or nh, getattr(lcfg, "head_dim", None) or h // nh


def lora_targets(cfg, lcfg) -> dict[str, tuple[int, int]]:
    """{name: (in, out) features} of the adapted linear layers of one decoder layer."""
    h, i, nh, kv, hd = _geometry(lcfg)
    shapes = {"q_proj": (h, nh * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (nh * hd, h),
              "dense": (nh * hd, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
              "fc1": (h, i), "fc2": (i, h)}
    names = cfg.peft.target_modules
    if names == "all-linear":  # Phi names its layers dense / fc1 / fc2
        names = "q_proj,k_proj,v_proj,dense,fc1,fc2" if lcfg.model_type == "phi" else \
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    return {n: shapes[n] for n in (x.strip() for x in names.split(",")) if n in shapes}


def llm_layer_activations(cfg, lcfg, act: int, device: str, llm_trains: bool) -> int:
    """Bytes per token that one decoder layer keeps for the backward pass (sdpa / eager attention).

    Always: the two norms' fp32 inputs (the residual stream), attention q / k / v / output, the MLP's gate,
    activation and up outputs, softmax statistics. Where the linear weights train, their inputs too (the
    normed hidden states twice, the MLP product). LoRA adds, per adapted layer, its dropout output and mask
    (or the shared layer input when dropout is 0) and the rank-r intermediate.
    """
    h, i, nh, kv, hd = _geometry(lcfg)
    attn = (2 * nh * hd + 2 * kv * hd) * act + nh * 4  # q, k, v, output; log-sum-exp (fp32)
    if cfg.model.attn_implementation == "eager":  # scores and probabilities (S per head per token), k / v repeated
        attn += 2 * nh * cfg.data.max_length * act + 2 * (nh - kv) * hd * act
    gated = lcfg.model_type not in ("phi", "gpt2", "gpt_neox")
    frozen = attn + 2 * h * 4 + 2 * 4 + (3 if gated else 1) * i * act  # fp32 norm inputs, 1/rms; gate, act, up
    if llm_trains:
        return frozen + (4 * h + i) * act  # norm outputs before / after their weight (x2); the MLP product
    method = cfg.peft.method
    if method in ("lora", "qlora", "dora"):
        targets = lora_targets(cfg, lcfg)
        extra = len(targets) * cfg.peft.r * 4  # the rank-r intermediates (adapters compute in fp32)
        if cfg.peft.dropout > 0:
            # each adapted layer drops out its own copy of its input and keeps the mask (bool on CUDA, a float
            # tensor on CPU)
            extra += sum(fin for fin, _ in targets.values()) * (act + (1 if device == "cuda" else act))
        else:  # the adapters keep their inputs: q / k / v share one, gate / up share one; o's is kept anyway
            shared = [{"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj", "fc1"}, {"down_proj", "fc2"}]
            extra += sum(targets[next(iter(g & targets.keys()))][0] for g in shared if g & targets.keys()) * act
        if method == "dora":  # the magnitude path re-runs the base layer: one more output per adapted layer
            extra += sum(fout for _, fout in targets.values()) * act
        return frozen + extra
    if method == "ia3":  # scaling vectors: k / v outputs and the down projection's input are kept
        return frozen + (2 * kv * hd + i) * act
    return frozen


def vision_layer_activations(vcfg, act: int) -> int:
    """Bytes per patch one trainable ViT layer keeps: input, two LayerNorm outputs, q / k / v / output, the
    residual, the MLP's two intermediates (GELU input and output), softmax and LayerNorm statistics."""
    h, i, nh = vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_attention_heads
    return (8 * h + 2 * i) * act + nh * 4 + 4 * 4


@dataclass
class Estimate:
    params: dict
    breakdown: dict  # bytes per component (training: the components of the peak)
    tensor_bytes: int  # peak of live tensors: what torch.cuda.max_memory_allocated / the CPU tracker measure
    total_bytes: int  # tensor_bytes plus, on CUDA, the context and allocator overhead
    detail: dict  # per-layer activations, image tokens, peak phase, the setting


def estimate(cfg, setting: Setting, meta: MetaLMM | None = None) -> Estimate:
    """Bytes a training step (or inference with a KV cache) of this recipe needs on `setting.device`."""
    if setting.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{setting.optimizer}'")
    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size, cfg.data.max_length = setting.batch, setting.seq
    cfg.train.gradient_checkpointing = setting.checkpointing
    wdtype, act = dtypes(cfg, setting.device)
    meta = meta or meta_model(cfg, wdtype)
    lcfg, vcfg = meta.lcfg, meta.vcfg
    weights = weight_bytes(meta, cfg.peft.method, cfg.peft.double_quant)
    params = param_counts(meta)
    num_patches = (setting.image_size // vcfg.patch_size) ** 2 if setting.image_size and vcfg else meta.num_patches
    n_img, B, S = meta.tokens_for(num_patches), setting.batch, setting.seq
    if n_img >= S:
        raise UserError(f"data.max_length={S} leaves no text token after {n_img} image tokens")
    V, h, L = lcfg.vocab_size, lcfg.hidden_size, lcfg.num_hidden_layers
    patches = B * (num_patches + (vcfg is not None and vcfg.model_type.startswith("clip")))  # CLIP adds a CLS token
    bd = {f"weights_{k}": v for k, v in weights.items()}
    detail = {"image_tokens": n_img, "dtype": str(wdtype).replace("torch.", ""), "activation_bytes": act,
              "device": setting.device, "mode": setting.mode}
    if setting.mode == "infer":
        _, _, nh, kv, hd = _geometry(lcfg)
        T = B * setting.context
        bd["kv_cache"] = 2 * L * kv * hd * T * setting.kv_bytes
        # the prefill's largest transient: one layer's hidden states, q / k / v and MLP intermediates, and
        # the last position's logits; the vision tower runs without keeping anything
        prefill = B * (setting.context + n_img)
        bd["activations"] = prefill * ((3 * h + 2 * nh * hd + 3 * lcfg.intermediate_size) * act)
        bd["logits"] = B * V * 4
        bd["images"] = patches * vision_layer_activations(vcfg, act) // 4 if vcfg else 0
        tensor = sum(bd.values())
    else:
        tensor = _train_peak(cfg, setting, meta, bd, detail, act, patches, n_img)
    if setting.device == "cuda":
        bd["cuda_context"] = CUDA_CONTEXT
        bd["allocator_overhead"] = int(ALLOCATOR_OVERHEAD * tensor)
    total = tensor + (CUDA_CONTEXT + int(ALLOCATOR_OVERHEAD * tensor) if setting.device == "cuda" else 0)
    detail["setting"] = {"batch": B, "seq": S, "checkpointing": setting.checkpointing,
                         "method": cfg.peft.method, "optimizer": setting.optimizer, "grad_accum": setting.grad_accum,
                         "optimizer_in_backward": setting.in_backward, "chunked_loss": setting.chunked_loss,
                         "offload_activations": setting.offload, "text_only": meta.text_only}
    return Estimate(params, bd, tensor, total, detail)


def _train_peak(cfg, setting, meta, bd, detail, act, patches, n_img) -> int:
    """Fill the training components of `bd` and return the peak tensor bytes of a step.

    The peak is the largest of a few moments of a step; weights and optimizer states are there at each:
    - the loss (chunked: during its forward pass, when every activation is saved and the loss holds the labelled
      rows, the gradient it takes ahead, the head's gradient when the head trains, and one chunk of logits; not
      chunked: at the start of the backward pass, with the saved fp32 log-softmax of every labelled row);
    - the backward pass of the last and of the first LLM layer (with checkpointing: their recomputation), when
      the gradients of the layers above exist (optimizer in backward: only the current layer's);
    - the optimizer step, with every gradient (none with the optimizer in backward).
    With grad_accum > 1 every gradient stays alive through the forward and backward passes of the later
    micro-batches. With offloading, saved activations (with checkpointing: each layer's input) live in CPU memory
    and the backward pass brings back one layer's at a time (on CUDA, `OffloadActivations.prefetch` storages more).
    """
    from .chunked_loss import chunk_rows
    from .offload import OffloadActivations
    lcfg, vcfg = meta.lcfg, meta.vcfg
    B, S, V, h, L = setting.batch, setting.seq, lcfg.vocab_size, lcfg.hidden_size, lcfg.num_hidden_layers
    T = B * S
    sums = _sums(meta)
    grads, n_train = sum(sums["trainable_bytes"]), sum(sums["trainable_numels"])
    opt, paged = optimizer_state_bytes(sums["trainable_bytes"], sums["trainable_numels"], setting.optimizer,
                                       setting.device)
    llm_trains = sums["llm_trains"]
    per_layer = llm_layer_activations(cfg, lcfg, act, setting.device, llm_trains) * T
    detail["llm_layer_activation_bytes"] = per_layer
    vision_trains = sums["vision_trains"]
    vis = 0
    if vision_trains:  # a frozen vision tower upstream of everything that trains keeps nothing
        trained_layers = sums["vision_trained_layers"]
        size = setting.image_size or vcfg.image_size
        vis = trained_layers * patches * vision_layer_activations(vcfg, act) + B * 3 * size ** 2 * 4
        vis += patches * 4 * vcfg.hidden_size * act  # post-LayerNorm and SigLIP's pooling head
    conn_trains = sums["conn_trains"]
    conn = (patches * vcfg.hidden_size + 2 * B * n_img * h) * act if conn_trains or vision_trains else 0
    offload = setting.offload
    common = {"activations_vision": 0 if offload else vis, "activations_connector": 0 if offload else conn}
    N = B * (S - max(n_img, 1))  # labelled positions: every text token but the first (the upper bound)
    head_grad = sums["head_grad"]
    resid = sums["resid"]  # the embeddings' element size: the residual stream's, and the decoder output's
    final_norm = T * (h * 4 + (h * act if llm_trains else 0))
    if setting.chunked_loss:
        # the decoder's output, its labelled rows and their gradient taken ahead (see chunked_loss.py), one chunk of
        # fp32 logits and its low-precision matmul output (the head's gradient, taken ahead too, is a gradient)
        rows = min(N, chunk_rows(V))
        loss = T * h * resid + 2 * N * h * resid + rows * V * (4 + (act if act < 4 else 0))
    else:  # the saved log-softmax of every chunk (fp32), then at the start of the backward pass its gradient and
        # the logits' gradient for one chunk (plus the low-precision copy of the logits under bf16)
        chunk = min(N, LOGIT_CHUNK)
        loss = N * V * 4 + chunk * V * (8 + (act if act < 4 else 0)) + (N * h * act if head_grad else 0)
    if cfg.peft.method == "qlora":  # each 4-bit layer is dequantized for its matmul: the widest one at a time
        common["dequant_scratch"] = max(sums["linear_numels"], default=0) * act
    # The backward pass of a gated MLP holds the gradients of its product and of both factors at once (the
    # product itself, kept where down_proj trains, is freed by then).
    gated = lcfg.model_type not in ("phi", "gpt2", "gpt_neox")
    mlp_grads = T * ((3 if gated else 2) - llm_trains) * lcfg.intermediate_size * act
    # Gradients arrive from the output down: when the first (lowest) LLM layer is in its backward pass, every
    # LLM gradient but that layer's and the embeddings' exists; vision and connector gradients come after.
    # (tied embeddings: the head's gradient is there from the start)
    body_grads = sums["llm_grads"] - head_grad - sums["embed_grads"]
    # the chunked loss makes the head's gradient in the forward pass (where the head trains)
    if setting.in_backward:  # each weight's gradient dies at its step: one layer weight's at a time
        one = sums["one_layer_grad"]
        at_top, at_bottom, at_loss = one, one, head_grad
    elif setting.grad_accum > 1:  # a later micro-batch: the earlier ones' gradients are all there
        at_top = at_bottom = grads
        at_loss = grads + head_grad
    else:
        at_top, at_bottom, at_loss = head_grad, head_grad + body_grads * (L - 1) // L, head_grad
    at_start = head_grad if setting.in_backward else at_top  # the head's gradient is made before its step
    # CUDA prefetches the next storages of the backward pass while a layer computes; CPU brings them on demand
    ahead = OffloadActivations.prefetch_default if setting.device == "cuda" else 0
    if setting.checkpointing:
        # Each layer keeps only its input (the residual stream, in the weights' dtype) and frees it once its own
        # backward pass is done; the pass recomputes one layer at a time. The last recomputed layer (all inputs
        # kept, few gradients yet) and the first (one input, nearly every gradient) bound the moments between.
        # transformers makes frozen embeddings' output require grad under checkpointing: a leaf that the graph
        # holds until the backward pass ends (offloading leaves it: autograd holds it anyway).
        inputs = T * h * resid
        leaf = 0 if sums["emb_requires_grad"] else inputs
        recomputed = per_layer - (T * h * 4 if resid == 4 else 0)  # fp32: its norm's input is the kept input
        kept = (1 + ahead) * inputs if offload else L * inputs
        phases = {"backward, recomputed last layer": {**common, "activations": kept + leaf + recomputed,
                                                      "gradients": at_top, "backward_scratch": mlp_grads},
                  "backward, recomputed first layer": {**common, "activations": inputs + leaf + recomputed,
                                                       "gradients": at_bottom, "backward_scratch": mlp_grads}}
        saved = leaf if offload else L * inputs + leaf + final_norm
    else:  # the final norm's saved tensors are gone once the last layer's backward pass starts
        if offload:
            # Each saved tensor comes back when its own node's backward pass runs and goes after it: the largest
            # moment is the gated MLP's product, whose two factors are back beside the three gradients of its
            # backward pass (and the residual stream's gradient); CUDA also has the next storages on their way.
            i = lcfg.intermediate_size
            back = T * (2 if gated else 1) * i * act + ahead * T * max(h, i) * act
            scratch = T * (3 if gated else 2) * i * act + T * h * resid
            phases = {"backward, last layer": {**common, "activations": back, "gradients": at_top,
                                               "backward_scratch": scratch},
                      "backward, first layer": {**common, "activations": back, "gradients": at_bottom,
                                                "backward_scratch": scratch}}
        else:
            phases = {"backward, last layer": {**common, "activations": L * per_layer, "gradients": at_top,
                                               "backward_scratch": mlp_grads}}
        saved = 0 if offload else L * per_layer + final_norm
    if setting.chunked_loss:
        phases["loss"] = {**common, "activations": saved, "logits": loss, "gradients": at_loss}
    else:
        phases["backward start"] = {**common, "activations": saved, "logits": loss, "gradients": at_start}
    if not setting.in_backward:
        # the optimizer step: every gradient. torch's fused AdamW (tinyml's) and bitsandbytes' 8-bit AdamW update
        # in place, without a temporary (on CPU bitsandbytes dequantizes one parameter's states to fp32 in scratch
        # that no tensor meter sees).
        phases["optimizer step"] = {"gradients": grads}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    detail.update(peak_phase=phase, gradients_bytes=grads, trainable_params=n_train, paged_optimizer_bytes=paged)
    bd["optimizer_states"] = opt
    for k in ("activations", "activations_vision", "activations_connector", "logits", "gradients",
              "backward_scratch", "dequant_scratch"):
        bd[k] = phases[phase].get(k, 0)
    return sum(bd.values())


def optimizer_state_bytes(nbytes: list[int], numels: list[int], optimizer: str, device: str) -> tuple[int, int]:
    """(bytes in the allocator, bytes paged) of the optimizer states of the trainable tensors.

    torch AdamW: two states per parameter in its dtype. bitsandbytes 8-bit AdamW: two 1-byte states plus an
    fp32 absmax per block of 256 for tensors of 4096 elements or more, two fp32 states below that. Paged (CUDA
    only; bitsandbytes falls back to plain 8-bit on CPU): the 1-byte states of tensors of 100k elements or more
    live in CUDA unified memory, outside torch's allocator, and move to CPU RAM when the card is full.
    """
    if optimizer == "adamw":
        return 2 * sum(nbytes), 0
    small = sum(n for n in numels if n < 4096)
    big = [n for n in numels if n >= 4096]
    states = 8 * small + sum(2 * n + 8 * math.ceil(n / 256) for n in big)
    paged = 2 * sum(n for n in big if n >= 100_000) if optimizer.startswith("paged") and device == "cuda" else 0
    return states - paged, paged


def _vision_layers(vision):
    from .trainable import encoder_layers
    layers = encoder_layers(vision)
    return list(layers) if layers is not None else []


# ------------------------------------------------------------------------------------------- measuring
def synthetic_batches(model, batch: int, seq: int, n: int, seed: int = 0):
    """n records of exactly `seq` tokens: one image, then text tokens that are all labelled (the estimate's
    assumption), and a collator whose images are random pixels of the vision tower's size."""
    import torch

    from ..records.conversations import Example
    from .batching import Collator
    g = torch.Generator().manual_seed(seed)
    n_img, vocab = model.num_image_tokens, len(model.tokenizer)
    examples = []
    for _ in range(n):
        text = torch.randint(0, vocab, (seq - n_img,), generator=g)
        text[text == model.image_token_id] = model.tokenizer.pad_token_id
        ids = [model.image_token_id] * n_img + text.tolist()
        examples.append(Example(ids, [-100] * n_img + ids[n_img:], [Path("synthetic")] if n_img else []))
    size = model.vision.config.image_size if n_img else 0
    pixels = lambda paths: torch.randn(len(paths), 3, size, size)  # noqa: E731 - stands in for ImageLoader
    return examples, Collator(model.tokenizer.pad_token_id, pixels)


def text_only_model(mcfg, dtype=None, quantization_config=None):
    """A text-only LLM in tinyml's model class, for measuring: empty vision tower and connector, no image token
    in any record. (Training commands need `model.vision`; the estimate and its measurement do not.)"""
    from torch import nn

    from .model import LMM, load_llm
    llm, tok = load_llm(mcfg.llm, mcfg.trust_remote_code, dtype, mcfg.attn_implementation, quantization_config)
    spec = {"num_image_tokens": 0, "llm_dim": llm.get_input_embeddings().weight.shape[1]}
    return LMM(nn.Module(), nn.Module(), llm, tok, None, spec)


def measure(cfg, steps: int = 2, device: str | None = None) -> dict:
    """Peak tensor memory of real training steps of this recipe (tinyml's model, sft step and train loop).

    Two steps by default: AdamW allocates its states in the first optimizer step, so the steady-state peak
    (states alive during forward and backward) shows from the second. CUDA: `torch.cuda.max_memory_allocated`;
    CPU: `PeakTensorMemory`, live tensor storage bytes.
    """
    import contextlib

    import torch

    from .loop import ExampleBatches, sft_step, train
    from .memory import PeakTensorMemory
    from .trainable import setup_model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if vlm_source(cfg.model):
        raise UserError("--measure builds synthetic records of the composed model; it does not run on model.vlm yet")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    torch.manual_seed(cfg.train.seed)
    model = setup_model(cfg, build=None if cfg.model.vision or cfg.model.init_from else text_only_model)
    tcfg = copy.deepcopy(cfg.train)
    tcfg.max_steps, tcfg.save_every, tcfg.log_every = steps, 0, 10 ** 9
    examples, collate = synthetic_batches(model, cfg.train.batch_size, cfg.data.max_length,
                                          cfg.train.batch_size * cfg.train.grad_accum * steps, cfg.train.seed)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tracker = contextlib.nullcontext()
    else:
        tracker = PeakTensorMemory(model.vision, model.connector, model.llm)
    with tempfile.TemporaryDirectory() as out, tracker:
        stats = train(model, ExampleBatches(examples, collate), sft_step, tcfg, Path(out))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else tracker.peak
    return {"measured_bytes": int(peak), "device": device, "steps": steps, "loss": stats.get("loss_last")}


# ------------------------------------------------------------------------------------ cards and advice
def verdict(total_bytes: int, gib: float) -> str:
    """fits (under 90 % of the card), tight (90-100 %: fragmentation or another process can tip it) or no."""
    cap = gib * GIB
    return "fits" if total_bytes <= 0.9 * cap else "tight" if total_bytes <= cap else "no"


def gpu_table(total_bytes: int) -> list[dict]:
    return [{"gpu": name, "gib": gib, "verdict": verdict(total_bytes, gib)} for name, gib in GPUS]


def _variant(cfg, **sets):
    cfg = copy.deepcopy(cfg)
    for key, value in sets.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def infer_advice(cfg, setting: Setting, gib: float, meta=None) -> list[dict]:
    """Inference: single changes that lower memory, each with its new total and verdict on a `gib` card."""
    out = []
    for change, s in ([("KV cache in 8 bits", replace(setting, kv_bytes=1))] if setting.kv_bytes > 1 else []) + \
            [(f"context {setting.context // 2}", replace(setting, context=max(1, setting.context // 2)))]:
        e = estimate(cfg, s, meta)
        out.append({"change": change, "total_bytes": e.total_bytes, "verdict": verdict(e.total_bytes, gib)})
    return out


# ------------------------------------------------------------------------------ the fastest setting that fits
ADVICE_GIB = (8, 12, 16, 24)  # the consumer card sizes the advice plans for (GiB)

# Seconds per training token, to rank the settings that fit: a roofline model with assumed rates of a consumer
# card (no GPU was measured for it): matmuls at GPU_FLOPS, memory traffic at GPU_BYTES_S, host copies at
# PCIE_BYTES_S. Work per token: 2 x (matmul weights) FLOPs per forward pass of the LLM (and of the vision tower per
# image patch); the backward pass is 2 forwards where the weights train and 1 where only inputs need gradients;
# checkpointing adds one forward; every pass reads every weight once. QLoRA dequantizes its 4-bit weights in every
# pass; offloading copies the saved activations to the host and back on a side stream, overlapped with the compute
# (a step takes the longer of the two); each optimizer step reads and writes the trained weights, their gradients
# and states once.
GPU_FLOPS, GPU_BYTES_S, PCIE_BYTES_S = 80e12, 0.8e12, 16e9


def token_seconds(meta, method: str, setting: Setting, est: Estimate) -> float:
    """Modelled seconds per trained token of a setting (see GPU_FLOPS); only ratios between settings mean much."""
    sums = _sums(meta)
    passes = 1 + (2 if sums["llm_trains"] else 1) + setting.checkpointing
    tokens = setting.batch * setting.seq
    vision_passes = 3 if sums["vision_trains"] else 1
    patches = setting.batch * meta.num_patches
    micro = (2 * sums["llm_matmul"] * tokens * passes + 2 * sums["vision_params"] * patches * vision_passes) / GPU_FLOPS
    # every pass also reads every weight: what makes small micro-batches slower per token
    micro += passes * sum(v for k, v in est.breakdown.items() if k.startswith("weights_")) / GPU_BYTES_S
    if method == "qlora":  # every pass reads 4-bit weights and writes bf16 ones
        micro += passes * sum(sums["linear_numels"]) * 2.5 / GPU_BYTES_S
    if setting.offload:
        L, h = meta.lcfg.num_hidden_layers, meta.lcfg.hidden_size
        moved = L * (tokens * h * sums["resid"] if setting.checkpointing else est.detail["llm_layer_activation_bytes"])
        micro = max(micro, 2 * moved / PCIE_BYTES_S)
    update = 3 * est.detail["gradients_bytes"] + 2 * est.breakdown["optimizer_states"] + 2 * est.detail.get(
        "paged_optimizer_bytes", 0)
    return (setting.grad_accum * micro + update / GPU_BYTES_S) / (tokens * setting.grad_accum)


def _fallbacks(method: str) -> list[str]:
    """The recipe's method first; where it trains the LLM's weights, LoRA and QLoRA after it."""
    return [method] + [m for m in ("lora", "qlora") if method in ("full", "lora", "dora") and m != method]


def _micro_batches(effective: int) -> list[int]:
    return sorted({b for b in (1 << k for k in range(effective.bit_length())) if effective % b == 0} | {effective})


def settings_that_fit(cfg, setting: Setting, metas: dict | None = None) -> list[dict]:
    """Every combination of method (the recipe's, then LoRA and QLoRA), checkpointing, offloading, optimizer,
    optimizer in backward and micro-batch (with grad_accum keeping the recipe's effective batch), estimated:
    one row each with its total and relative cost per token. `metas` caches a MetaLMM per method."""
    metas = {} if metas is None else metas
    effective = setting.batch * setting.grad_accum
    optimizers = ["adamw", "adamw8bit"] + (["paged_adamw8bit"] if setting.device == "cuda" else [])
    rows = []
    for method in _fallbacks(cfg.peft.method):
        c = _variant(cfg, peft__method=method)
        if method not in metas:
            metas[method] = meta_model(c, dtypes(c, setting.device)[0])
        meta = metas[method]
        for ckpt in (False, True):
            for offload in (False, True) if setting.device == "cuda" else (False,):
                for opt in optimizers:
                    for b in _micro_batches(effective):
                        for in_backward in (False, True) if b == effective else (False,):
                            s = replace(setting, checkpointing=ckpt, offload=offload, optimizer=opt, batch=b,
                                        grad_accum=effective // b, in_backward=in_backward, chunked_loss=True)
                            e = estimate(c, s, meta)
                            rows.append({"method": method, "checkpointing": ckpt, "offload": offload,
                                         "optimizer": opt, "optimizer_in_backward": in_backward, "batch": b,
                                         "grad_accum": effective // b, "total_bytes": e.total_bytes,
                                         "tensor_bytes": e.tensor_bytes,
                                         "paged_bytes": e.detail["paged_optimizer_bytes"],
                                         "cost": token_seconds(meta, method, s, e), "tokens": effective * s.seq})
    return rows


def _sets(row: dict) -> list[str]:
    """The --set overrides that select a setting."""
    out = [f"peft.method={row['method']}", f"train.gradient_checkpointing={str(row['checkpointing']).lower()}",
           f"train.offload_activations={str(row['offload']).lower()}", f"train.optimizer={row['optimizer']}",
           f"train.batch_size={row['batch']}", f"train.grad_accum={row['grad_accum']}", "train.chunked_loss=true",
           f"train.optimizer_in_backward={str(row['optimizer_in_backward']).lower()}"]
    return out + (["train.max_grad_norm=0"] if row["optimizer_in_backward"] else [])


def advice(cfg, setting: Setting, cards=ADVICE_GIB, meta=None) -> list[dict]:
    """Per card size: the fastest setting that fits under 90 % of it, with its estimate (paged optimizer states
    that do not fit beside it cost their trip to CPU RAM and back each step). Settings of the recipe's method come
    first; LoRA, then QLoRA, only where no setting of the ones before fits. Among settings within 1 %
    of the fastest, the one with the fewest changes to the recipe wins (offloading, say, when it costs nothing but
    is not needed, is left off). A card nothing fits gets the setting with the smallest total."""
    metas = {cfg.peft.method: meta} if meta is not None else {}
    rows = settings_that_fit(cfg, setting, metas)
    own_meta = metas[cfg.peft.method]
    own = token_seconds(own_meta, cfg.peft.method, setting, estimate(cfg, setting, own_meta))
    order = {m: i for i, m in enumerate(_fallbacks(cfg.peft.method))}
    mine = {"checkpointing": setting.checkpointing, "offload": setting.offload, "optimizer": setting.optimizer,
            "optimizer_in_backward": setting.in_backward, "batch": setting.batch}
    changes = lambda r: sum(r[k] != v for k, v in mine.items())  # noqa: E731
    out = []
    for gib in cards:
        # paged optimizer states that the card has no room for move to CPU RAM and back every step
        spill = lambda r: max(0.0, r["total_bytes"] + r["paged_bytes"] - gib * GIB)  # noqa: E731
        for r in rows:
            r["cost_here"] = r["cost"] + 2 * spill(r) / PCIE_BYTES_S / r["tokens"]
        fit = [r for r in rows if r["total_bytes"] <= 0.9 * gib * GIB]
        name = next((n for n, g in GPUS if g == gib), f"{gib:g} GiB")
        if fit:
            first = min(order[r["method"]] for r in fit)
            fit = [r for r in fit if order[r["method"]] == first]
            fastest = min(r["cost_here"] for r in fit)
            best = min((r for r in fit if r["cost_here"] <= 1.01 * fastest), key=lambda r: (changes(r), r["cost_here"]))
        else:
            best = min(rows, key=lambda r: r["total_bytes"])
        keep = ("method", "checkpointing", "offload", "optimizer", "optimizer_in_backward", "batch", "grad_accum",
                "total_bytes", "tensor_bytes", "paged_bytes")
        out.append({"gib": gib, "gpu": name, "fits": bool(fit), **{k: best[k] for k in keep},
                    "relative_speed": round(own / best["cost_here"], 3), "sets": _sets(best)})
    return out

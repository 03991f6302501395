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
    """(llm config, vision config, connector, resampler queries) of a recipe, from config.json files only."""
    import json

    from transformers import AutoConfig

    from .hfutil import _hf_load, llm_source
    llm, vision, connector, queries = mcfg.llm, mcfg.vision, mcfg.connector, mcfg.resampler_queries
    if mcfg.init_from:
        spec_file = Path(mcfg.init_from) / "tinyml_model.json"
        if not spec_file.is_file():
            raise UserError(f"not a tinyml model folder (no tinyml_model.json): {mcfg.init_from}")
        spec = json.loads(spec_file.read_text())
        llm, vision = str(Path(mcfg.init_from) / "llm"), str(Path(mcfg.init_from) / "vision")
        connector, queries = spec["connector"], spec.get("resampler_queries", queries)
    if not llm or not vision:
        raise UserError("model.llm and model.vision must be set (hub ids or folders holding a config.json)")
    kw = {"trust_remote_code": mcfg.trust_remote_code}
    lcfg = _hf_load(AutoConfig.from_pretrained, llm_source(llm), "LLM config", **kw)
    vcfg = _hf_load(AutoConfig.from_pretrained, vision, "vision config", **kw)
    return lcfg, getattr(vcfg, "vision_config", vcfg), connector, queries


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
    """The parts of an LMM on the meta device, with the recipe's trainable parts (what `configure_trainable` sees)."""

    def tokens_for(self, num_patches: int) -> int:
        return self.connector.num_tokens(num_patches)

    def add_peft(self, configs: dict) -> None:
        from .hfutil import wrap_parts
        wrap_parts(self, configs)

    def __init__(self, cfg, dtype):
        import torch
        from transformers import (
            AutoModelForCausalLM,
            CLIPVisionModel,
            SiglipVisionModel,
        )

        from .connectors import build_connector
        from .trainable import configure_trainable
        self.lcfg, self.vcfg, self.connector_kind, queries = part_configs(cfg.model)
        kind = self.vcfg.model_type.replace("_vision_model", "")
        if kind not in ("siglip", "clip"):
            raise UserError(f"vision model type '{self.vcfg.model_type}' is not CLIP or SigLIP")
        with torch.device("meta"):
            self.llm = AutoModelForCausalLM.from_config(self.lcfg, dtype=dtype,
                                                        trust_remote_code=cfg.model.trust_remote_code)
            self.vision = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}[kind](self.vcfg).to(dtype)
            self.connector = build_connector(self.connector_kind, self.vcfg.hidden_size, self.lcfg.hidden_size,
                                             queries, cfg.model.resampler_layers).to(dtype)
        self.num_patches = (self.vcfg.image_size // self.vcfg.patch_size) ** 2
        self.num_image_tokens = self.connector.num_tokens(self.num_patches)
        configure_trainable(self, cfg)

    def requires_grad_(self, flag: bool):
        for part in (self.llm, self.vision, self.connector):
            part.requires_grad_(flag)

    def parameters(self):
        for part in (self.vision, self.connector, self.llm):
            yield from part.parameters()


def _numel(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_counts(meta: MetaLMM) -> dict:
    """Exact parameter counts per part (without peft adapters, which are counted apart) and trainable."""
    parts = {"llm": meta.llm, "vision": meta.vision, "connector": meta.connector}
    adapters = {k: sum(p.numel() for n, p in m.named_parameters() if _is_adapter(n)) for k, m in parts.items()}
    counts = {k: _numel(m) - adapters[k] for k, m in parts.items()}  # LoRA / DoRA may adapt any part
    counts["total"] = sum(counts.values())
    counts["adapters"] = sum(adapters.values())
    counts["trainable"] = sum(p.numel() for p in meta.parameters() if p.requires_grad)
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
    num_patches = (setting.image_size // vcfg.patch_size) ** 2 if setting.image_size else meta.num_patches
    n_img, B, S = meta.tokens_for(num_patches), setting.batch, setting.seq
    if n_img >= S:
        raise UserError(f"data.max_length={S} leaves no text token after {n_img} image tokens")
    V, h, L = lcfg.vocab_size, lcfg.hidden_size, lcfg.num_hidden_layers
    patches = B * (num_patches + (vcfg.model_type.startswith("clip")))  # CLIP adds a CLS token
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
        bd["images"] = patches * vision_layer_activations(vcfg, act) // 4
        tensor = sum(bd.values())
    else:
        tensor = _train_peak(cfg, setting, meta, bd, detail, act, patches, n_img)
    if setting.device == "cuda":
        bd["cuda_context"] = CUDA_CONTEXT
        bd["allocator_overhead"] = int(ALLOCATOR_OVERHEAD * tensor)
    total = tensor + (CUDA_CONTEXT + int(ALLOCATOR_OVERHEAD * tensor) if setting.device == "cuda" else 0)
    detail["setting"] = {"batch": B, "seq": S, "checkpointing": setting.checkpointing,
                         "method": cfg.peft.method, "optimizer": setting.optimizer}
    return Estimate(params, bd, tensor, total, detail)


def _train_peak(cfg, setting, meta, bd, detail, act, patches, n_img) -> int:
    """Fill the training components of `bd` and return the peak tensor bytes of a step."""
    lcfg, vcfg = meta.lcfg, meta.vcfg
    B, S, V, h, L = setting.batch, setting.seq, lcfg.vocab_size, lcfg.hidden_size, lcfg.num_hidden_layers
    T = B * S
    trainable = [p for p in meta.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    n_train = sum(p.numel() for p in trainable)
    opt, paged = optimizer_state_bytes([p.numel() * p.element_size() for p in trainable],
                                       [p.numel() for p in trainable], setting.optimizer, setting.device)
    llm_trains = any(p.requires_grad for n, p in meta.llm.named_parameters() if not _is_adapter(n))
    per_layer = llm_layer_activations(cfg, lcfg, act, setting.device, llm_trains) * T
    detail["llm_layer_activation_bytes"] = per_layer
    vision_trains = any(p.requires_grad for p in meta.vision.parameters())
    vis = 0
    if vision_trains:  # a frozen vision tower upstream of everything that trains keeps nothing
        trained_layers = sum(1 for layer in _vision_layers(meta.vision) if any(p.requires_grad for p in layer.parameters()))
        size = setting.image_size or vcfg.image_size
        vis = trained_layers * patches * vision_layer_activations(vcfg, act) + B * 3 * size ** 2 * 4
        vis += patches * 4 * vcfg.hidden_size * act  # post-LayerNorm and SigLIP's pooling head
    conn_trains = any(p.requires_grad for p in meta.connector.parameters())
    ldim, vdim = lcfg.hidden_size, vcfg.hidden_size
    conn = (patches * vdim + 2 * B * n_img * ldim) * act if conn_trains or vision_trains else 0
    N = B * (S - n_img)  # labelled positions: every text token (the upper bound)
    chunk = min(N, LOGIT_CHUNK)
    head_trains = any(p.requires_grad for p in meta.llm.get_output_embeddings().parameters())
    # saved log-softmax of every chunk (fp32), then at the start of the backward pass its gradient and the
    # logits' gradient for one chunk (plus the low-precision copy of the logits under bf16)
    logits = N * V * 4 + chunk * V * (8 + (act if act < 4 else 0)) + (N * h * act if head_trains else 0)
    head_grad = sum(p.numel() * p.element_size() for p in meta.llm.get_output_embeddings().parameters()
                    if p.requires_grad)
    final_norm = T * (h * 4 + (h * act if llm_trains else 0))
    common = {"activations_vision": vis, "activations_connector": conn}
    if cfg.peft.method == "qlora":  # each 4-bit layer is dequantized for its matmul: the widest one at a time
        import torch.nn as nn
        head = meta.llm.get_output_embeddings()
        common["dequant_scratch"] = max((m.weight.numel() for n, m in meta.llm.named_modules()
                                         if isinstance(m, nn.Linear) and m is not head and not _is_adapter(n)),
                                        default=0) * act
    # The backward pass of a gated MLP holds the gradients of its product and of both factors at once (the
    # product itself, kept where down_proj trains, is freed by then).
    gated = lcfg.model_type not in ("phi", "gpt2", "gpt_neox")
    mlp_grads = T * ((3 if gated else 2) - llm_trains) * lcfg.intermediate_size * act
    # Gradients arrive from the output down: when the first (lowest) LLM layer is in its backward pass, every
    # LLM gradient but that layer's and the embeddings' exists; vision and connector gradients come after.
    llm_grads = sum(p.numel() * p.element_size() for p in meta.llm.parameters() if p.requires_grad)
    embed_grads = sum(p.numel() * p.element_size() for p in meta.llm.get_input_embeddings().parameters()
                      if p.requires_grad)
    if meta.llm.get_input_embeddings().weight is meta.llm.get_output_embeddings().weight:
        embed_grads = 0  # tied: the head's gradient is there from the start
    body_grads = llm_grads - head_grad - embed_grads
    late_grads = head_grad + body_grads * (L - 1) // L
    # The components alive at each candidate peak of a step; weights and optimizer states are always there.
    if setting.checkpointing:
        # Each layer keeps only its input (the residual stream, in the weights' dtype) and frees it once its own
        # backward pass is done; the pass recomputes one layer at a time. The last recomputed layer (all inputs
        # kept, few gradients yet) and the first (one input, nearly every gradient) bound the moments between.
        # transformers makes frozen embeddings' output require grad under checkpointing: a leaf that the graph
        # holds until the backward pass ends.
        emb = meta.llm.get_input_embeddings().weight
        resid = emb.element_size()
        inputs = T * h * resid
        leaf = 0 if emb.requires_grad else inputs
        recomputed = per_layer - (T * h * 4 if resid == 4 else 0)  # fp32: its norm's input is the kept input
        phases = {"backward start": {**common, "activations": L * inputs + leaf + final_norm, "logits": logits,
                                     "gradients": head_grad},
                  "backward, recomputed last layer": {**common, "activations": L * inputs + leaf + recomputed,
                                                      "gradients": head_grad, "backward_scratch": mlp_grads},
                  "backward, recomputed first layer": {**common, "activations": inputs + leaf + recomputed,
                                                       "gradients": late_grads, "backward_scratch": mlp_grads}}
    else:  # the final norm's saved tensors are gone once the last layer's backward pass starts
        acts = L * per_layer
        phases = {"backward start": {**common, "activations": acts + final_norm, "logits": logits,
                                     "gradients": head_grad},
                  "backward, last layer": {**common, "activations": acts, "gradients": head_grad,
                                           "backward_scratch": mlp_grads}}
    # the optimizer step: every gradient and the optimizer's temporaries. torch's foreach AdamW on CUDA takes
    # about one more copy of the gradients; on CPU it updates one tensor at a time (sqrt(v) and the denominator).
    # bitsandbytes updates each parameter inside one op (a fused kernel on CUDA; on CPU an op that dequantizes
    # that parameter's states to fp32 in scratch no tensor tracker sees, about 5 fp32 copies of it).
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    scratch = 0 if setting.optimizer != "adamw" else grads if setting.device == "cuda" else 2 * largest
    phases["optimizer step"] = {"gradients": grads, "optimizer_scratch": scratch}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    detail.update(peak_phase=phase, gradients_bytes=grads, trainable_params=n_train, paged_optimizer_bytes=paged)
    bd["optimizer_states"] = opt
    for k in ("activations", "activations_vision", "activations_connector", "logits", "gradients",
              "backward_scratch", "dequant_scratch", "optimizer_scratch"):
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
        examples.append(Example(ids, [-100] * n_img + ids[n_img:], [Path("synthetic")]))
    size = model.vision.config.image_size
    pixels = lambda paths: torch.randn(len(paths), 3, size, size)  # noqa: E731 - stands in for ImageLoader
    return examples, Collator(model.tokenizer.pad_token_id, pixels)


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
    model = setup_model(cfg)
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


def largest_batch(cfg, setting: Setting, gib: float, meta=None, limit: int = 4096) -> int:
    """The largest micro-batch whose estimate fits the card (0: not even one)."""
    fits = lambda b: estimate(cfg, replace(setting, batch=b), meta).total_bytes <= 0.9 * gib * GIB  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def advice(cfg, setting: Setting, gib: float, meta=None) -> list[dict]:
    """Single changes that lower memory, each with its new total and verdict on a `gib` card."""
    out = []

    def add(change, c, s, m=None):
        e = estimate(c, s, m)
        out.append({"change": change, "total_bytes": e.total_bytes, "verdict": verdict(e.total_bytes, gib)})

    if setting.mode == "infer":
        if setting.kv_bytes > 1:
            add("KV cache in 8 bits", cfg, replace(setting, kv_bytes=1), meta)
        add(f"context {setting.context // 2}", cfg, replace(setting, context=max(1, setting.context // 2)), meta)
        return out
    b = largest_batch(cfg, setting, gib, meta)
    out.append({"change": f"largest batch that fits: {b}" if b else "no batch size fits as is",
                "total_bytes": estimate(cfg, replace(setting, batch=b), meta).total_bytes if b else None,
                "verdict": "fits" if b else "no"})
    if not setting.checkpointing:
        add("gradient checkpointing", cfg, replace(setting, checkpointing=True), meta)
    if cfg.peft.method != "qlora":
        add("qlora (4-bit LLM + LoRA)", _variant(cfg, peft__method="qlora"), setting)
    if setting.optimizer == "adamw":
        add("8-bit AdamW (train.optimizer=adamw8bit)", cfg, replace(setting, optimizer="adamw8bit"), meta)
    if setting.batch > 1:
        add("batch 1 (raise train.grad_accum to keep the effective batch)", cfg, replace(setting, batch=1), meta)
    n_img = (meta or meta_model(cfg, dtypes(cfg, setting.device)[0])).num_image_tokens
    if setting.seq // 2 > n_img:
        add(f"sequence {setting.seq // 2}", cfg, replace(setting, seq=setting.seq // 2), meta)
    if n_img > 64 and cfg.model.connector != "resampler" and not vlm_source(cfg.model):
        # the records get shorter by the image tokens saved
        add(f"64 image tokens (connector resampler, 64 queries; sequence {setting.seq - n_img + 64})",
            _variant(cfg, model__connector="resampler", model__resampler_queries=64),
            replace(setting, seq=setting.seq - n_img + 64))
    return out

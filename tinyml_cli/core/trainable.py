"""The trainable set-up every training stage uses: the model built from a recipe, with what trains set by
peft.method / peft.parts / train.parts (full, freeze, LoRA, QLoRA, DoRA, IA3, BitFit, bottleneck adapters,
prompt / prefix tuning) and gradient checkpointing as asked."""


from __future__ import annotations

from .. import UserError
from ..config import RunConfig
from .hfutil import linear_names
from .model import PARTS


def encoder_layers(module):
    """The first ModuleList of transformer blocks in a HF encoder (`encoder.layers` / `encoder.layer`)."""
    for name, m in module.named_modules():
        if name.endswith(("encoder.layers", "encoder.layer")):
            return m
    return None


def peft_config(cfg: RunConfig, method: str, part: str = "llm", module=None):
    """peft's config for the methods it implements (lora, qlora, dora, ia3, prompt-tuning, prefix-tuning).

    On the LLM, `all-linear` is peft's (every linear layer but the output head); on the vision tower or the
    connector (LoRA / DoRA), it is `linear_names` of that part."""
    from peft import (
        AdaptionPromptConfig,
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
    )
    targets = cfg.peft.target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    if method == "ia3":  # learned scaling vectors; peft's defaults: attention k / v and the MLP's down projection
        return IA3Config(task_type="CAUSAL_LM", **({} if targets == "all-linear" else
                                                   {"target_modules": targets, "feedforward_modules": []}))
    if method == "llama-adapter":  # LLaMA-Adapter (Zhang et al. 2023): zero-gated prompts in the top layers
        layers = module.config.num_hidden_layers
        if cfg.peft.adapter_layers > layers:
            raise UserError(f"peft.adapter_layers={cfg.peft.adapter_layers}: the LLM has {layers} layers")
        return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=cfg.peft.virtual_tokens,
                                    adapter_layers=cfg.peft.adapter_layers)
    if method in ("prompt-tuning", "prefix-tuning"):
        kind = PromptTuningConfig if method == "prompt-tuning" else PrefixTuningConfig
        return kind(task_type="CAUSAL_LM", num_virtual_tokens=cfg.peft.virtual_tokens)
    if part != "llm" and targets == "all-linear":
        targets = linear_names(module)
    return LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                      target_modules=targets, use_dora=method == "dora",
                      task_type="CAUSAL_LM" if part == "llm" else None)


def train_biases(model, parts: list[str]) -> None:
    """BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): every bias term of the named parts trains, nothing else."""
    has = {p: [w for n, w in getattr(model, p).named_parameters() if n.endswith("bias")] for p in PARTS}
    for part in parts:
        if not has[part]:
            module = getattr(model, part)
            off = [k for k in ("attention_bias", "mlp_bias") if getattr(getattr(module, "config", None), k, None) is False]
            why = f" (its config has {' and '.join(off)} off)" if off else ""
            others = [p for p in PARTS if has[p]]
            hint = f"; set peft.parts to parts that have biases: {', '.join(others)}" if others else ""
            raise UserError(f"peft.method=bitfit: the {part} ({type(module).__name__}) has no bias terms{why}{hint}")
        for w in has[part]:
            w.requires_grad_(True)


def configure_trainable(model, cfg: RunConfig) -> None:
    """Set requires_grad from peft.method, peft.parts and train.parts.

    `full` trains every weight and `freeze` the parts in train.parts. lora, dora (and qlora, over an LLM loaded
    in 4-bit, see `quantization_config`), bitfit (bias terms) and tinyml's bottleneck adapters (adapter) adapt
    the parts in peft.parts; ia3 and prompt / prefix tuning adapt the LLM. Under them the base weights stay
    frozen: train.parts may add the connector or the vision tower in full, never the LLM.
    """
    method, parts = cfg.peft.method, set(cfg.train.parts)
    model.requires_grad_(False)
    if method == "full":
        model.requires_grad_(True)
        return
    if method != "freeze":
        targets = list(dict.fromkeys(cfg.peft.parts))
        if method == "bitfit":
            train_biases(model, targets)
        elif method in ("adapter", "tinytl"):
            from .adapters import attach_adapters
            attach_adapters(model, targets, cfg.peft.adapter_size, "lite" if method == "tinytl" else "bottleneck")
            if method == "tinytl":  # TinyTL trains the biases too
                for part in targets:
                    for n, w in getattr(model, part).named_parameters():
                        if n.endswith("bias"):
                            w.requires_grad_(True)
        else:
            model.add_peft({part: peft_config(cfg, method, part, getattr(model, part)) for part in targets})
        parts -= {"llm", *targets}
    if "connector" in parts:
        model.connector.requires_grad_(True)
    if "llm" in parts:
        model.llm.requires_grad_(True)
    if "vision" in parts:
        model.vision.requires_grad_(True)
        n = cfg.train.vision_freeze_first_n
        if n:
            layers = encoder_layers(model.vision)
            if layers is None:
                raise UserError("train.vision_freeze_first_n: cannot find the vision encoder's layers")
            for name, m in model.vision.named_children():
                if "embed" in name:
                    m.requires_grad_(False)
            for layer in list(layers)[:n]:
                layer.requires_grad_(False)


def quantization_config(cfg: RunConfig, dtype):
    """bitsandbytes 4-bit loading of the LLM for peft.method=qlora (the QLoRA paper's NF4 + double quant)."""
    if cfg.peft.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.peft.quant_type,
                              bnb_4bit_use_double_quant=cfg.peft.double_quant, bnb_4bit_compute_dtype=dtype)


def disable_dropout(model) -> None:
    """Every dropout probability of the model set to 0: nn.Dropout modules (peft's LoRA dropout among them) and
    the float rates attention layers apply themselves (`attention_dropout` of Llama, `dropout` of SigLIP...)."""
    from torch import nn
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for k, v in vars(m).items():
            if "dropout" in k and isinstance(v, float):
                setattr(m, k, 0.0)


def setup_model(cfg: RunConfig, dropout: str = "on", build=None):
    """The model every training stage trains: built (4-bit for qlora) from the recipe's seed, trainable parts
    set (peft.method, peft.parts, train.parts), gradient checkpointing as asked; every dropout off when
    train.dropout says off, or says auto and the stage's default (`dropout`) is off. `build` (default
    `model.build_model`) makes the model from the recipe's model section."""
    import torch

    from .model import build_model, resolve_dtype
    torch.manual_seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype)
    model = (build or build_model)(cfg.model, dtype=dtype, quantization_config=quantization_config(cfg, dtype))
    configure_trainable(model, cfg)
    if (dropout if cfg.train.dropout == "auto" else cfg.train.dropout) == "off":
        disable_dropout(model)
    model.chunked_loss = cfg.train.chunked_loss
    if cfg.train.gradient_checkpointing:
        model.base_llm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_llm().config.use_cache = False
    return model


def model_source(cfg: RunConfig) -> str:
    """What setup_model loads, in words (for the status line before training)."""
    return cfg.model.init_from or f"{cfg.model.llm} + {cfg.model.vision}"


def reference_model(model):
    """The frozen reference of a preference or RL stage, and the context to run it in: the policy with its adapters
    disabled under a peft method (no second copy of the weights), else a frozen copy of the starting model."""
    import contextlib
    import copy
    if model.peft_parts():
        return model, model.adapters_disabled
    return copy.deepcopy(model).requires_grad_(False).eval(), contextlib.nullcontext

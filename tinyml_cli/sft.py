"""pretrain-align and sft: supervised training of the parts a recipe names, on image conversations.

pretrain-align is stage 1 of the LLaVA / TinyLLaVA "base" recipe (connector only, on captions); sft is
stage 2 (multi-turn conversations, loss on assistant tokens only), full, freeze or a peft method.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import UserError
from .config import RunConfig, save_config

PARTS = ("connector", "llm", "vision")


def encoder_layers(module):
    """The first ModuleList of transformer blocks in a HF encoder (`encoder.layers` / `encoder.layer`)."""
    for name, m in module.named_modules():
        if name.endswith(("encoder.layers", "encoder.layer")):
            return m
    return None


METHODS = ("full", "freeze", "lora", "qlora", "dora", "ia3", "bitfit", "adapter", "prompt-tuning", "prefix-tuning")
LLM_ONLY = ("ia3", "prompt-tuning", "prefix-tuning")  # peft methods the LLM alone takes (lora / dora: any part)


def _check_parts(key: str, parts) -> None:
    bad = set(parts) - set(PARTS)
    if bad:
        raise UserError(f"{key}: unknown part(s) {sorted(bad)} (choose from {', '.join(PARTS)})")


def _linear_names(module) -> list[str]:
    """Every nn.Linear of a vision tower or connector, except the projections of nn.MultiheadAttention (the
    resampler's, Q-Former's and SigLIP head's attention): its forward reads their weights directly, so a LoRA
    wrapped around them would never run."""
    from torch import nn
    inside = {f"{n}.{c}" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)
              for c, _ in m.named_children()}
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in inside]


def peft_config(cfg: RunConfig, method: str, part: str = "llm", module=None):
    """peft's config for the methods it implements (lora, qlora, dora, ia3, prompt-tuning, prefix-tuning).

    On the LLM, `all-linear` is peft's (every linear layer but the output head); on the vision tower or the
    connector (LoRA / DoRA), it is `_linear_names` of that part."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
    targets = cfg.peft.target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    if method == "ia3":  # learned scaling vectors; peft's defaults: attention k / v and the MLP's down projection
        return IA3Config(task_type="CAUSAL_LM", **({} if targets == "all-linear" else
                                                   {"target_modules": targets, "feedforward_modules": []}))
    if method in ("prompt-tuning", "prefix-tuning"):
        if cfg.peft.virtual_tokens < 1:
            raise UserError(f"peft.virtual_tokens must be at least 1, got {cfg.peft.virtual_tokens}")
        kind = PromptTuningConfig if method == "prompt-tuning" else PrefixTuningConfig
        return kind(task_type="CAUSAL_LM", num_virtual_tokens=cfg.peft.virtual_tokens)
    if part != "llm" and targets == "all-linear":
        targets = _linear_names(module)
    return LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                      target_modules=targets, use_dora=method == "dora",
                      task_type="CAUSAL_LM" if part == "llm" else None)


def add_peft(model, part: str, config) -> None:
    """Wrap one part of the model in a peft model; a target that matches nothing in it is a user error."""
    from peft import get_peft_model
    try:
        setattr(model, part, get_peft_model(getattr(model, part), config))
    except ValueError as e:
        raise UserError(f"peft.method={config.peft_type.value.lower()} on the {part}: "
                        f"{str(e).splitlines()[0]} (see peft.target_modules)") from None


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
    _check_parts("train.parts", parts)
    model.requires_grad_(False)
    if method == "full":
        model.requires_grad_(True)
        return
    if method not in METHODS:
        raise UserError(f"peft.method '{method}' is not available (choose {', '.join(METHODS)})")
    if method != "freeze":
        targets = list(dict.fromkeys(cfg.peft.parts))
        _check_parts("peft.parts", targets)
        if not targets:
            raise UserError("peft.parts is empty: name where the method applies (llm, vision, connector)")
        if method in LLM_ONLY and targets != ["llm"]:
            raise UserError(f"peft.method={method} applies to the LLM only: set peft.parts=[llm]")
        if method == "qlora" and "llm" not in targets:
            raise UserError("peft.method=qlora puts LoRA on the 4-bit LLM: peft.parts must include llm")
        if method == "bitfit":
            train_biases(model, targets)
        elif method == "adapter":
            from .adapters import attach_adapters
            attach_adapters(model, targets, cfg.peft.adapter_size)
        else:
            for part in targets:
                add_peft(model, part, peft_config(cfg, method, part, getattr(model, part)))
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
    if cfg.peft.quant_type not in ("nf4", "fp4"):
        raise UserError(f"peft.quant_type must be nf4 or fp4, got '{cfg.peft.quant_type}'")
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.peft.quant_type,
                              bnb_4bit_use_double_quant=cfg.peft.double_quant, bnb_4bit_compute_dtype=dtype)


def setup_model(cfg: RunConfig):
    """The model a run trains: built (4-bit for qlora), trainable parts set, gradient checkpointing as asked."""
    from .model import build_model, resolve_dtype
    dtype = resolve_dtype(cfg.model.dtype)
    model = build_model(cfg.model, dtype=dtype, quantization_config=quantization_config(cfg, dtype))
    configure_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.base_llm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_llm().config.use_cache = False
    return model


def sft_step(model, batch):
    loss = model(**batch)
    return loss, int((batch["labels"][:, 1:] != -100).sum()), {}


def run_sft(cfg: RunConfig, out_dir: str | Path, command: str, resume: bool = False, progress=None) -> dict:
    """Setup -> loop -> save for pretrain-align / sft; returns the JSON summary."""
    import torch

    from .data import Collator, Encoder, ImageLoader, load_examples
    from .model import count_params
    from .train import process_state, train

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train:
        raise UserError("data.train is not set (a LLaVA-format JSON / JSONL file)")
    torch.manual_seed(cfg.train.seed)
    model = setup_model(cfg)
    enc = Encoder(model.tokenizer, model.num_image_tokens, cfg.data.max_length, cfg.data.system_prompt)
    examples, skipped = load_examples(cfg.data.train, enc, cfg.data.on_error, columns=cfg.data.columns)
    collate = Collator(model.tokenizer.pad_token_id, ImageLoader(model.image_processor))
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        save_config(cfg, out, {"command": command})
    trainable, total = count_params(model)
    stats = train(model, examples, collate, sft_step, cfg.train, out, resume=resume, progress=progress)
    if main_process:
        model.save(out)
    metrics = {**stats, "examples": len(examples), "skipped": len(skipped), "seconds": time.time() - t0}
    if skipped and main_process:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    artifacts = {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")}
    return {"command": command, "output_dir": str(out), "metrics": metrics, "artifacts": artifacts,
            "trainable_params": trainable, "total_params": total}

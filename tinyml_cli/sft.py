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


def configure_trainable(model, cfg: RunConfig) -> None:
    """Set requires_grad from peft.method and train.parts; with a peft method the LLM gets peft adapters.

    For qlora the LLM was loaded in 4-bit (see `quantization_config`); the adapters train in full precision
    over the frozen quantized weights.
    """
    method, parts = cfg.peft.method, set(cfg.train.parts)
    bad = parts - set(PARTS)
    if bad:
        raise UserError(f"train.parts: unknown part(s) {sorted(bad)} (choose from {', '.join(PARTS)})")
    model.requires_grad_(False)
    if method == "full":
        model.requires_grad_(True)
        return
    if method not in ("freeze", "lora", "qlora", "dora", "ia3"):
        raise UserError(f"peft.method '{method}' is not available (choose full, freeze, lora, qlora, dora or ia3)")
    if method != "freeze":
        from peft import IA3Config, LoraConfig, get_peft_model
        targets = cfg.peft.target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
        if method == "ia3":  # learned scaling vectors; peft's defaults: attention k / v and the MLP's down projection
            pcfg = IA3Config(task_type="CAUSAL_LM", **({} if targets == "all-linear" else
                                                       {"target_modules": targets, "feedforward_modules": []}))
        else:
            pcfg = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                              target_modules=targets, use_dora=method == "dora", task_type="CAUSAL_LM")
        model.llm = get_peft_model(model.llm, pcfg)
        parts.discard("llm")  # the adapters train, not the base weights
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


def sft_step(model, batch):
    loss = model(**batch)
    return loss, int((batch["labels"][:, 1:] != -100).sum()), {}


def run_sft(cfg: RunConfig, out_dir: str | Path, command: str, resume: bool = False, progress=None) -> dict:
    """Setup -> loop -> save for pretrain-align / sft; returns the JSON summary."""
    import torch

    from .data import Collator, Encoder, ImageLoader, load_examples
    from .model import build_model, count_params, resolve_dtype
    from .train import process_state, train

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train:
        raise UserError("data.train is not set (a LLaVA-format JSON / JSONL file)")
    torch.manual_seed(cfg.train.seed)
    dtype = resolve_dtype(cfg.model.dtype)
    model = build_model(cfg.model, dtype=dtype, quantization_config=quantization_config(cfg, dtype))
    configure_trainable(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.base_llm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_llm().config.use_cache = False
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

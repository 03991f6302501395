"""bitdelta compress / apply, and several deltas served over one base (generate --delta).

Scale distillation (BitDelta, section 3.2) runs on the shared training loop: the base with the 1-bit deltas
attached is the student, the fine-tuned model the teacher, and only the per-matrix scales train, on calibration
conversations (`data.train`, default: the fine-tuned run's own data), by the logits' mean squared error (the
paper's) or KL (`bitdelta.loss`). So `train.*` keys, progress, `metrics.jsonl`, checkpoints and `--resume` work as
for sft. Held-out KL, logit MSE, top-1 agreement with the fine-tuned model and VQA accuracy (`data.eval`) are
measured before and after.
"""


from __future__ import annotations

import time
from pathlib import Path

from .. import UserError
from ..config import config_from_dict, load_config, save_config

# Scale distillation as in the paper (200 steps, batch 4, Adam). The paper's lr of 1e-4 suits 7B models,
# whose scales are ~1e-3; the tiny default's scales are ~1e-2 and 1e-3 moved them enough (measured).
DEFAULTS = {"train.max_steps": 200, "train.batch_size": 4, "train.lr": 1e-3, "train.scheduler": "constant",
            "train.warmup_ratio": 0.0, "train.max_grad_norm": 0.0}


KL_EXAMPLES = 256  # held-out conversations the KL is measured on


def compress_config(config, sets, finetuned: str | Path):
    """The recipe of a compress run: the fine-tuned run's data (its config.yaml) and DEFAULTS under -c / --set."""
    import yaml
    defaults = dict(DEFAULTS)
    saved = Path(finetuned) / "config.yaml"
    if saved.is_file():
        data = config_from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).data
        defaults.update({"data.train": data.train, "data.eval": data.eval, "data.max_length": data.max_length,
                         "data.system_prompt": data.system_prompt})
    return load_config(config, sets or [], defaults)


def run_compress(cfg, base_dir: str | Path, finetuned_dir: str | Path, out_dir: str | Path, resume: bool = False,
                 progress=None, eval_finetuned: bool = True, status=None) -> dict:
    """Compress FINETUNED against BASE, distil the scales, measure, save the delta folder; the JSON summary."""
    from ..core.bitdelta import (
        Distillation,
        compress,
        delta_attached,
        distill_step,
        fit_to_teacher,
        load_full_precision,
    )
    from ..core.generation import evaluate_model
    from ..core.loop import ExampleBatches, train
    from ..core.model import resolve_dtype
    from ..core.trainable import disable_dropout
    from ..records.conversations import load_examples
    from ..records.encoder import encoder_for

    t0 = time.time()
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("no calibration data: set data.train (a LLaVA-format JSON / JSONL file)")
    status(f"loading {base_dir} and {finetuned_dir}")
    dtype = resolve_dtype(cfg.model.dtype)
    base, teacher = load_full_precision(base_dir, dtype), load_full_precision(finetuned_dir, dtype)
    if base.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise UserError("BASE and FINETUNED have different tokenizers")
    status("signs and scales of FINETUNED - BASE")
    delta = compress(base, teacher)
    if not delta.signs:
        raise UserError("FINETUNED has no linear weight that differs from BASE: nothing to compress")
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
    save_config(cfg, out, {"command": "bitdelta compress", "base": str(base_dir), "finetuned": str(finetuned_dir)})

    enc = encoder_for(base, cfg.data)
    status(f"reading and encoding {cfg.data.train}")
    calib, _ = load_examples(cfg.data.train, enc, cfg.data.on_error)
    held_out = load_examples(cfg.data.eval, enc, cfg.data.on_error)[0][:KL_EXAMPLES] if cfg.data.eval else []
    collate = base.collator()
    teacher.requires_grad_(False).eval()
    base.requires_grad_(False)
    if cfg.train.dropout != "on":  # the student trains to match an eval-mode teacher: no dropout in it either
        disable_dropout(base)
    base.chunked_loss = cfg.train.chunked_loss
    metrics = {}
    with delta_attached(base, delta) as wrappers:  # `base` now computes base + scale·sign(Δ)
        if held_out:
            status(f"held-out fit before distillation ({len(held_out)} conversations)")
            metrics.update({f"{k}_initial": v for k, v in fit_to_teacher(base, teacher, held_out, collate).items()})
            metrics["vqa_accuracy_initial"] = evaluate_model(base, cfg.data.eval, cfg)[0]["vqa_accuracy"]
        status(f"{len(calib):,} calibration conversations; first step")
        stats = train(Distillation(base, teacher, cfg.bitdelta.loss), ExampleBatches(calib, collate), distill_step,
                      cfg.train, out, resume=resume, progress=progress)
        delta.scales = {name: w.scale.detach().cpu() for name, w in wrappers.items()}
        if held_out:
            metrics.update({f"{k}_distilled": v for k, v in fit_to_teacher(base, teacher, held_out, collate).items()})
            metrics["vqa_accuracy_distilled"] = evaluate_model(base, cfg.data.eval, cfg)[0]["vqa_accuracy"]
    if held_out and eval_finetuned:
        metrics["vqa_accuracy_finetuned"] = evaluate_model(teacher, cfg.data.eval, cfg)[0]["vqa_accuracy"]
    sizes = delta.sizes()
    metrics = {**sizes, **metrics, "distill_loss_first": stats["loss_first"], "distill_loss_last": stats["loss_last"],
               "steps": stats["steps"], "calibration_examples": len(calib), "kl_examples": len(held_out),
               "seconds": time.time() - t0}
    delta.info.update({"spec": teacher.spec, "base": str(base_dir), "finetuned": str(finetuned_dir),
                       "metrics": {k: v for k, v in metrics.items() if k not in sizes}})
    delta.save(out)
    return {"command": "bitdelta compress", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"delta": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")}}


def run_apply(base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path) -> dict:
    """BASE + DELTA merged into an ordinary tinyml model folder."""
    from ..core.bitdelta import BitDelta, apply_delta, load_full_precision
    delta = BitDelta.load(delta_dir)
    model = load_full_precision(base_dir)
    apply_delta(model, delta)
    model.spec = delta.info.get("spec", model.spec)
    model.save(out_dir)
    return {"command": "bitdelta apply", "output_dir": str(out_dir),
            "metrics": {"compressed_matrices": len(delta.signs), "full_tensors": len(delta.full)},
            "artifacts": {"model": str(out_dir)}}


def run_generate_deltas(base_dir: str | Path, delta_dirs: list, image: str | None, prompt: str, cfg) -> dict:
    """One base loaded once answers the prompt with each delta attached in turn (multi-tenant serving)."""
    from ..core.bitdelta import BitDelta, delta_attached, load_full_precision
    from ..core.generation import answer_prompt
    from ..core.model import resolve_dtype
    model = load_full_precision(base_dir, resolve_dtype(cfg.model.dtype))
    answers = []
    for d in delta_dirs:
        with delta_attached(model, BitDelta.load(d)):
            answers.append({"delta": str(d), "answer": answer_prompt(model, image, prompt, cfg)[0]})
    return {"command": "generate", "output_dir": None, "metrics": {"deltas": len(answers)}, "artifacts": {},
            "answer": answers[0]["answer"], "answers": answers}

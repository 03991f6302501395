"""dpo: direct preference optimisation of the policy on preference pairs (DPO, IPO, conservative DPO or RPO).

The loss (see losses.dpo_loss) compares summed response log-probs of the policy with those of a frozen
reference. By default the reference log-probs are computed once, before training, with the starting weights:
no second model is kept. With `pref.precompute_ref: false` the reference runs every step: the policy with
its adapters disabled for a peft method (one copy of the weights), else a frozen copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from . import UserError
from .config import RunConfig, save_config


def reference_fn(model, cfg: RunConfig):
    """(batch -> summed log-probs (2B,)) of the reference, for references not precomputed."""
    from .preference import token_logps
    if model.peft_parts():  # peft: the base weights are the reference
        ref, ref_ctx = model, model.adapters_disabled
    else:
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        ref_ctx = contextlib.nullcontext

    @torch.no_grad()
    def fn(batch):
        was = ref.training
        ref.eval()
        with ref_ctx():
            lp, mask = token_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   batch.get("pixel_values"))
        ref.train(was)
        return (lp * mask).sum(-1)
    return fn


def dpo_step(pcfg, ref=None):
    from .losses import dpo_loss
    from .preference import token_logps

    def step(model, batch):
        lp, mask = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               batch.get("pixel_values"))
        pi = (lp * mask).sum(-1)
        ref_lp = batch["ref_logps"] if "ref_logps" in batch else ref(batch)
        n = pi.shape[0] // 2
        loss, rc, rr = dpo_loss(pi[:n], pi[n:], ref_lp[:n], ref_lp[n:], pcfg.beta, pcfg.loss_type,
                                pcfg.label_smoothing, pcfg.rpo_alpha, mask[:n].sum(-1))
        return loss.mean(), n, {"rewards_chosen": rc.mean().item(), "rewards_rejected": rr.mean().item(),
                                "rewards_margin": (rc - rr).mean().item(), "rewards_accuracy": (rc > rr).float().mean().item()}
    return step


def preference_accuracy(logps: torch.Tensor) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one."""
    return (logps[:, 0] > logps[:, 1]).float().mean().item()


def run_dpo(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress=None) -> dict:
    """Setup -> reference log-probs -> train -> held-out preference metrics -> save."""
    from .model import count_params
    from .preference import build_policy, collator_for, load_pairs, policy_logps
    from .train import train

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train:
        raise UserError("data.train is not set (a preference JSONL: image, prompt, chosen, rejected)")
    if cfg.pref.loss_type not in ("sigmoid", "ipo"):
        raise UserError(f"pref.loss_type must be sigmoid or ipo, got '{cfg.pref.loss_type}'")
    if cfg.pref.beta <= 0 or not 0 <= cfg.pref.label_smoothing < 0.5 or cfg.pref.rpo_alpha < 0:
        raise UserError("pref.beta must be > 0, pref.label_smoothing in [0, 0.5) and pref.rpo_alpha >= 0")
    model, enc = build_policy(cfg)
    pairs, skipped = load_pairs(cfg.data.train, enc, cfg.data.on_error, cfg.data.columns)
    held_out = load_pairs(cfg.data.eval, enc, cfg.data.on_error, cfg.data.columns)[0] if cfg.data.eval else []
    collate = collator_for(model)
    bs = cfg.train.batch_size
    # The starting weights are the reference: held-out log-probs now are the reference's (and the sft model's).
    ref_eval = policy_logps(model, held_out, collate, bs) if held_out else None
    ref = None
    if cfg.pref.precompute_ref:
        for p, lp in zip(pairs, policy_logps(model, pairs, collate, bs).tolist()):
            p.meta["ref"] = lp
    else:
        ref = reference_fn(model, cfg)
    save_config(cfg, out, {"command": "dpo"})
    trainable, total = count_params(model)
    stats = train(model, pairs, collate, dpo_step(cfg.pref, ref), cfg.train, out, resume=resume, progress=progress)
    model.save(out)
    metrics = {**stats, "pairs": len(pairs), "skipped": len(skipped)}
    if held_out:
        pol = policy_logps(model, held_out, collate, bs)
        margin = cfg.pref.beta * ((pol[:, 0] - ref_eval[:, 0]) - (pol[:, 1] - ref_eval[:, 1]))
        metrics.update(eval_pref_accuracy_before=preference_accuracy(ref_eval), eval_pref_accuracy=preference_accuracy(pol),
                       eval_rewards_accuracy=(margin > 0).float().mean().item(), eval_rewards_margin=margin.mean().item(),
                       eval_pairs=len(held_out))
    metrics["seconds"] = time.time() - t0
    return {"command": "dpo", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

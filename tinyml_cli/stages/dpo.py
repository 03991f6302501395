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

from .. import UserError
from ..config import RunConfig, save_config


def reference_fn(model, cfg: RunConfig):
    """(batch -> summed log-probs (2B,)) of the reference, for references not precomputed."""
    from ..core.logprobs import token_logps
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
    """The step over a `TokenLogps` model: the DPO loss of a batch of B pairs (2B rows, chosen first)."""
    from ..core.losses import dpo_loss

    def step(model, batch):
        lp, mask = model(**batch)
        pi = (lp * mask).sum(-1)
        ref_lp = batch["ref_logps"] if "ref_logps" in batch else ref(batch)
        n = pi.shape[0] // 2
        loss, rc, rr = dpo_loss(pi[:n], pi[n:], ref_lp[:n], ref_lp[n:], pcfg.beta, pcfg.loss_type,
                                pcfg.label_smoothing, pcfg.rpo_alpha, mask[:n].sum(-1), mask[n:].sum(-1))
        return loss.mean(), n, {"rewards_chosen": rc.mean().item(), "rewards_rejected": rr.mean().item(),
                                "rewards_margin": (rc - rr).mean().item(), "rewards_accuracy": (rc > rr).float().mean().item()}
    return step


def preference_accuracy(logps: torch.Tensor) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one."""
    return (logps[:, 0] > logps[:, 1]).float().mean().item()


def run_dpo(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress=None, status=None) -> dict:
    """Setup -> reference log-probs -> train -> held-out preference metrics -> save."""
    from ..core.batching import collator_for
    from ..core.logprobs import TokenLogps, policy_logps
    from ..core.loop import ExampleBatches, process_state, train
    from ..core.model import count_params
    from ..core.trainable import model_source, setup_model
    from ..records.encoder import encoder_for
    from ..records.preferences import load_pairs

    t0 = time.time()
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (a preference JSONL: image, prompt, chosen, rejected)")
    status(f"loading the model ({model_source(cfg)})")
    model = setup_model(cfg, dropout="off")
    enc = encoder_for(model, cfg.data)
    status(f"reading and encoding {cfg.data.train}")
    pairs, skipped = load_pairs(cfg.data.train, enc, cfg.data.on_error, cfg.data.columns)
    held_out = load_pairs(cfg.data.eval, enc, cfg.data.on_error, cfg.data.columns)[0] if cfg.data.eval else []
    collate = collator_for(model)
    bs = cfg.train.batch_size
    # The starting weights are the reference: held-out log-probs now are the reference's (and the sft model's).
    if held_out:
        status(f"reference log-probs of {len(held_out):,} held-out pairs")
    ref_eval = policy_logps(model, held_out, collate, bs) if held_out else None
    ref = None
    if cfg.pref.precompute_ref:
        status(f"reference log-probs of {len(pairs):,} training pairs")
        for p, lp in zip(pairs, policy_logps(model, pairs, collate, bs).tolist()):
            p.meta["ref"] = lp
    else:
        ref = reference_fn(model, cfg)
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": "dpo"})
    status(f"{len(pairs):,} pairs; first step")
    trainable, total = count_params(model)
    stats = train(TokenLogps(model), ExampleBatches(pairs, collate), dpo_step(cfg.pref, ref), cfg.train, out,
                  resume=resume, progress=progress)
    metrics = {**stats, "pairs": len(pairs), "skipped": len(skipped)}
    if main_process:
        model.save(out)
    if held_out and main_process:
        pol = policy_logps(model, held_out, collate, bs)
        margin = cfg.pref.beta * ((pol[:, 0] - ref_eval[:, 0]) - (pol[:, 1] - ref_eval[:, 1]))
        metrics.update(eval_pref_accuracy_before=preference_accuracy(ref_eval), eval_pref_accuracy=preference_accuracy(pol),
                       eval_rewards_accuracy=(margin > 0).float().mean().item(), eval_rewards_margin=margin.mean().item(),
                       eval_pairs=len(held_out))
    metrics["seconds"] = time.time() - t0
    return {"command": "dpo", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

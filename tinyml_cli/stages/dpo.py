"""dpo: offline preference optimisation of the policy on preference pairs, one loss per `pref.loss_type`.

- sigmoid / ipo (DPO, IPO; conservative DPO with label smoothing, RPO with rpo_alpha): summed response log-probs
  of the policy against those of a frozen reference (losses.dpo_loss).
- simpo / orpo: average per-token log-probs of the policy alone, no reference (losses.simpo_loss / orpo_loss).
- mdpo: DPO plus the chosen answer under the true image against the same answer under a corrupted image (a
  random crop of at most `pref.mdpo_crop` of the area, resized back; drawn once per pair with the run's seed, so
  a precomputed reference sees the same crop), plus the anchor keeping the chosen reward above `pref.mdpo_anchor`
  (losses.mdpo_loss). Each batch then holds a third block of rows.
By default the reference log-probs are computed once, before training, with the starting weights: no second
model is kept. With `pref.precompute_ref: false` the reference runs every step: the policy with its adapters
disabled for a peft method (one copy of the weights), else a frozen copy of the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import UserError
from ..config import RunConfig, save_config


def reference_fn(model, cfg: RunConfig):
    """(batch -> summed log-probs (2B,)) of the reference, for references not precomputed."""
    from ..core.logprobs import token_logps
    from ..core.trainable import reference_model
    ref, ref_ctx = reference_model(model)

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


REFERENCE_FREE = ("simpo", "orpo")


def dpo_step(pcfg, ref=None):
    """The step over a `TokenLogps` model: the pair loss of a batch of B pairs (2B rows, chosen first; mdpo: 3B,
    the chosen answers under corrupted images last)."""
    from ..core.losses import dpo_loss, mdpo_loss, mean_logps, orpo_loss, simpo_loss
    kind = pcfg.loss_type

    def step(model, batch):
        lp, mask = model(**batch)
        pi = (lp * mask).sum(-1)
        n = pi.shape[0] // (3 if kind == "mdpo" else 2)
        extra = {}
        if kind in REFERENCE_FREE:
            avg = mean_logps(lp, mask)
            if kind == "simpo":
                loss, rc, rr = simpo_loss(avg[:n], avg[n:], pcfg.beta, pcfg.simpo_gamma, pcfg.label_smoothing)
            else:
                loss, rc, rr = orpo_loss(avg[:n], avg[n:], pcfg.beta)
        else:
            ref_lp = batch["ref_logps"] if "ref_logps" in batch else ref(batch)
            if kind == "mdpo":
                loss, rc, rr, rx = mdpo_loss(pi[:n], pi[n:2 * n], pi[2 * n:], ref_lp[:n], ref_lp[n:2 * n],
                                             ref_lp[2 * n:], pcfg.beta, pcfg.mdpo_anchor)
                extra = {"rewards_corrupted": rx.mean().item(), "image_accuracy": (rc > rx).float().mean().item()}
            else:
                loss, rc, rr = dpo_loss(pi[:n], pi[n:], ref_lp[:n], ref_lp[n:], pcfg.beta, kind,
                                        pcfg.label_smoothing, pcfg.rpo_alpha, mask[:n].sum(-1), mask[n:].sum(-1))
        if pcfg.rpo_alpha and kind not in ("sigmoid", "ipo", "ipo_norm"):  # (dpo_loss adds it itself)
            loss = loss - pcfg.rpo_alpha * pi[:n] / mask[:n].sum(-1).clamp(min=1)
        return loss.mean(), n, {"rewards_chosen": rc.mean().item(), "rewards_rejected": rr.mean().item(),
                                "rewards_margin": (rc - rr).mean().item(),
                                "rewards_accuracy": (rc > rr).float().mean().item(), **extra}
    return step


def add_crops(pairs, max_area: float, seed: int) -> None:
    """mDPO: one crop box per pair (top, left, height, width as fractions), square, of at most max_area of the image."""
    import random
    rng = random.Random(seed)
    for p in pairs:
        if len(p.chosen.images) != 1:
            raise UserError(f"{p.meta.get('where', 'a pair')}: mdpo needs exactly one image per pair (it corrupts it)")
        side = rng.uniform(0.0, max_area) ** 0.5
        p.meta["crop"] = (rng.uniform(0, 1 - side), rng.uniform(0, 1 - side), side, side)


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
    kind = cfg.pref.loss_type
    if kind == "mdpo":
        add_crops(pairs, cfg.pref.mdpo_crop, cfg.train.seed)
        add_crops(held_out, cfg.pref.mdpo_crop, cfg.train.seed + 1)
    collate = collator_for(model)
    bs = cfg.train.batch_size
    # The starting weights are the reference: held-out log-probs now are the reference's (and the sft model's).
    if held_out:
        status(f"reference log-probs of {len(held_out):,} held-out pairs")
    ref_eval = policy_logps(model, held_out, collate, bs) if held_out else None
    ref = None
    if kind in REFERENCE_FREE:
        pass  # the policy alone
    elif cfg.pref.precompute_ref:
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
        if kind == "mdpo":  # how often the chosen answer is likelier with its image than with the corrupted one
            metrics.update(eval_image_accuracy_before=(ref_eval[:, 0] > ref_eval[:, 2]).float().mean().item(),
                           eval_image_accuracy=(pol[:, 0] > pol[:, 2]).float().mean().item())
    metrics["seconds"] = time.time() - t0
    return {"command": "dpo", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

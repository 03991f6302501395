"""reward: a reward model trained on preference pairs with the Bradley-Terry loss.

The model is the LMM backbone with a scalar head read at the last response token; the loss is
-log sigma(r_chosen - r_rejected - margin). The folder it saves is a tinyml model folder plus
`reward_head.safetensors`; `tinyml reward score` and `tinyml ppo --set ppo.reward=FOLDER` load it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import UserError
from ..config import RunConfig, save_config


def reward_step(margin: float):
    from ..core.losses import bradley_terry_loss

    def step(model, batch):
        scores = model(**batch)
        n = scores.shape[0] // 2
        chosen, rejected = scores[:n], scores[n:]
        loss = bradley_terry_loss(chosen, rejected, margin)
        return loss, n, {"accuracy": (chosen > rejected).float().mean().item(),
                         "margin": (chosen - rejected).mean().item()}
    return step


@torch.no_grad()
def pair_scores(rm, pairs, collate, batch_size: int = 32) -> torch.Tensor:
    """(N, 2) reward-model scores of the chosen and rejected side of every pair."""
    from ..core.batching import pair_batches
    was = rm.training
    rm.eval()
    out = []
    for chunk, b in pair_batches(pairs, collate, batch_size, rm.lmm.device):
        s = rm(**b).cpu()
        out.append(torch.stack([s[:len(chunk)], s[len(chunk):]], -1))
    rm.train(was)
    return torch.cat(out)


def pairwise_metrics(scores: torch.Tensor) -> dict:
    return {"accuracy": (scores[:, 0] > scores[:, 1]).float().mean().item(),
            "margin": (scores[:, 0] - scores[:, 1]).mean().item(), "pairs": len(scores)}


def run_reward(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress=None, status=None) -> dict:
    """Setup -> train (Bradley-Terry) -> held-out pairwise accuracy -> save."""
    from ..core.batching import collator_for
    from ..core.loop import ExampleBatches, process_state, train
    from ..core.model import count_params
    from ..core.reward_model import ScalarHead, save_reward_model
    from ..core.trainable import model_source, setup_model
    from ..records.encoder import encoder_for
    from ..records.preferences import load_pairs

    t0 = time.time()
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (a preference JSONL: image, prompt, chosen, rejected)")
    status(f"loading the model ({model_source(cfg)})")
    lmm = setup_model(cfg, dropout="off")
    enc = encoder_for(lmm, cfg.data)
    rm = ScalarHead(lmm)  # a fresh head, trained with the parts of the recipe
    rm.head.requires_grad_(True)
    status(f"reading and encoding {cfg.data.train}")
    pairs, skipped = load_pairs(cfg.data.train, enc, cfg.data.on_error, cfg.data.columns)
    held_out = load_pairs(cfg.data.eval, enc, cfg.data.on_error, cfg.data.columns)[0] if cfg.data.eval else []
    collate = collator_for(lmm)
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": "reward"})
    status(f"{len(pairs):,} pairs encoded; first step (decoding its images)")
    trainable, total = count_params(rm)
    stats = train(rm, ExampleBatches(pairs, collate), reward_step(cfg.pref.margin), cfg.train, out, resume=resume,
                  progress=progress)
    metrics = {**stats, "pairs": len(pairs), "skipped": len(skipped)}
    if main_process:
        save_reward_model(rm, out)
    if held_out and main_process:
        ev = pairwise_metrics(pair_scores(rm, held_out, collate, cfg.train.batch_size))
        metrics.update(eval_accuracy=ev["accuracy"], eval_margin=ev["margin"], eval_pairs=ev["pairs"])
    metrics["seconds"] = time.time() - t0
    return {"command": "reward", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}


def run_score(model_dir: str | Path, data: str | Path, cfg: RunConfig, out_file: str | Path | None = None) -> dict:
    """Score every pair of a preference file with a trained reward model; optionally write the scores."""
    import json

    from ..core.batching import collator_for
    from ..core.model import resolve_dtype
    from ..core.reward_model import load_reward_model
    from ..records.encoder import encoder_for
    from ..records.preferences import load_pairs
    rm = load_reward_model(model_dir, dtype=resolve_dtype(cfg.model.dtype))
    pairs, skipped = load_pairs(data, encoder_for(rm.lmm, cfg.data), cfg.data.on_error, cfg.data.columns)
    scores = pair_scores(rm, pairs, collator_for(rm.lmm), cfg.gen.batch_size)
    artifacts = {}
    if out_file:
        with open(out_file, "w", encoding="utf-8") as f:
            for p, (c, r) in zip(pairs, scores.tolist()):
                f.write(json.dumps({"id": p.meta.get("id"), "chosen_score": c, "rejected_score": r}) + "\n")
        artifacts["scores"] = str(out_file)
    return {"command": "reward score", "output_dir": None, "artifacts": artifacts,
            "metrics": {**pairwise_metrics(scores), "skipped": len(skipped)}}

"""kto: Kahneman-Tversky optimisation on unpaired answers (Ethayarajh et al. 2024), as TRL 1.16's KTOTrainer.

Records are `{"image", "prompt", "completion", "label"}` (label true: a desirable answer); preference pairs are
unpaired into one desirable and one undesirable answer. The loss (losses.kto_loss) compares each answer's
log-ratio to the reference with a reference point z0: the policy's KL to the reference estimated on mismatched
prompt / answer pairs (the prompt and image of one record with another record's answer). TRL pairs each answer
with its neighbour's in the batch; here the partner is drawn once, before training (a seeded derangement), so the
reference log-probs of both can be computed once (`pref.precompute_ref`, the default) and no reference model is
kept. The mismatched rows run without gradient: z0 is a detached reference point.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import UserError
from ..config import RunConfig, save_config


@dataclass
class Answer:
    """One unpaired answer and its mismatched partner (its prompt and image, another record's answer)."""
    answer: object
    mismatched: object
    meta: dict = field(default_factory=dict)


class KTOCollator:
    """Answers as rows, with `desirable` (B,); the mismatched rows as `kl_*`; reference log-probs when precomputed."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list[Answer]) -> dict:
        batch = self.collate([it.answer for it in items])
        batch |= {f"kl_{k}": v for k, v in self.collate([it.mismatched for it in items]).items()}
        batch["desirable"] = torch.tensor([it.answer.meta["label"] for it in items])
        if all("ref" in it.meta for it in items):
            batch["ref_logps"] = torch.tensor([it.meta["ref"] for it in items])
            batch["kl_ref_logps"] = torch.tensor([it.meta["kl_ref"] for it in items])
        return batch


def _split(batch: dict) -> tuple[dict, dict]:
    kl = {k[3:]: v for k, v in batch.items() if k.startswith("kl_") and k != "kl_ref_logps"}
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "pixel_values")}, kl


@torch.no_grad()
def summed_logps(model, batch: dict) -> torch.Tensor:
    from ..core.logprobs import token_logps
    lp, mask = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("pixel_values"))
    return (lp * mask).sum(-1)


def kto_step(pcfg, ref=None):
    """The step over a `TokenLogps` model: the KTO loss of B answers (their mismatched rows without gradient)."""
    from ..core.losses import kto_loss

    def step(model, batch):
        rows, kl_rows = _split(batch)
        lp, mask = model(**rows)
        pi = (lp * mask).sum(-1)
        with torch.no_grad():
            kl_lp, kl_mask = model(**kl_rows)
            kl_pi = (kl_lp * kl_mask).sum(-1)
        if "ref_logps" in batch:
            ref_lp, kl_ref = batch["ref_logps"], batch["kl_ref_logps"]
        else:
            ref_lp, kl_ref = ref(rows), ref(kl_rows)
        desirable = batch["desirable"].bool()
        loss, rewards, kl = kto_loss(pi, ref_lp, desirable, kl_pi, kl_ref, pcfg.beta, pcfg.desirable_weight,
                                     pcfg.undesirable_weight)
        nan = float("nan")
        return loss.mean(), len(pi), {
            "kl": kl.item(), "rewards_desirable": rewards[desirable].mean().item() if desirable.any() else nan,
            "rewards_undesirable": rewards[~desirable].mean().item() if (~desirable).any() else nan}
    return step


def pair_up(answers: list, max_length: int, seed: int) -> list[Answer]:
    """Each answer with a mismatched partner: the next answer in a seeded shuffle (a derangement, never itself)."""
    from ..records.preferences import mismatched
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [Answer(a, mismatched(a, answers[partner[i]], max_length), {"where": a.meta.get("where")})
            for i, a in enumerate(answers)]


def all_logps(model, items: list[Answer], collate, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of the answers and of their mismatched rows."""
    was = model.training
    model.eval()
    out, kl = [], []
    for s in range(0, len(items), batch_size):
        b = {k: v.to(model.device) for k, v in collate(items[s:s + batch_size]).items()}
        rows, kl_rows = _split(b)
        out.append(summed_logps(model, rows).cpu())
        kl.append(summed_logps(model, kl_rows).cpu())
    model.train(was)
    return torch.cat(out), torch.cat(kl)


def run_kto(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress=None, status=None) -> dict:
    """Setup -> unpaired answers and their mismatched partners -> reference log-probs -> train -> held-out -> save."""
    from ..core.logprobs import TokenLogps
    from ..core.loop import ExampleBatches, process_state, train
    from ..core.model import count_params
    from ..core.trainable import model_source, reference_model, setup_model
    from ..records.encoder import encoder_for
    from ..records.preferences import load_unpaired

    t0 = time.time()
    pc = cfg.pref
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (unpaired records: image, prompt, completion, label; or preference pairs)")
    status(f"loading the model ({model_source(cfg)})")
    model = setup_model(cfg, dropout="off")
    status(f"reading and encoding {cfg.data.train}")
    enc = encoder_for(model, cfg.data)
    answers, skipped = load_unpaired(cfg.data.train, enc, cfg.data.on_error, cfg.data.columns)
    if len(answers) < 2:
        raise UserError("kto needs at least 2 answers (the KL reference point pairs each with another's prompt)")
    items = pair_up(answers, cfg.data.max_length, cfg.train.seed)
    held_out = (pair_up(load_unpaired(cfg.data.eval, enc, cfg.data.on_error, cfg.data.columns)[0], cfg.data.max_length,
                        cfg.train.seed + 1) if cfg.data.eval else [])
    collate = KTOCollator(model.collator())
    bs = cfg.train.batch_size
    ref_eval = all_logps(model, held_out, collate, bs) if held_out else None  # the starting weights: the reference
    ref = None
    if pc.precompute_ref:
        lp, kl = all_logps(model, items, collate, bs)
        for it, a, b in zip(items, lp.tolist(), kl.tolist()):
            it.meta.update(ref=a, kl_ref=b)
    else:
        ref_model, ref_ctx = reference_model(model)

        def ref(rows):
            with ref_ctx():
                was = ref_model.training
                ref_model.eval()
                out = summed_logps(ref_model, rows)
                ref_model.train(was)
            return out
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": "kto"})
    trainable, total = count_params(model)
    stats = train(TokenLogps(model), ExampleBatches(items, collate), kto_step(pc, ref), cfg.train, out,
                  resume=resume, progress=progress)
    desirable = sum(a.meta["label"] for a in answers)
    metrics = {**stats, "answers": len(answers), "desirable": desirable, "undesirable": len(answers) - desirable,
               "skipped": len(skipped)}
    if main_process:
        model.save(out)
    if held_out and main_process:
        lp, kl = all_logps(model, held_out, collate, bs)
        r = pc.beta * (lp - ref_eval[0])
        good = torch.tensor([it.answer.meta["label"] for it in held_out])
        metrics.update(eval_kl=max(0.0, (kl - ref_eval[1]).mean().item()), eval_answers=len(held_out),
                       eval_rewards_desirable=r[good].mean().item() if good.any() else None,
                       eval_rewards_undesirable=r[~good].mean().item() if (~good).any() else None)
    metrics["seconds"] = time.time() - t0
    return {"command": "kto", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

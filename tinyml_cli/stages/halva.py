"""halva: hallucination-aware alignment at the phrase level (HALVA, Sarkar et al. 2024, arXiv 2405.18654).

On the pairs `tinyml data synth-preferences` makes (and any preference data whose chosen and rejected answers
share their context), the hallucinated phrase is where the two responses' tokens differ: the longest common
prefix and suffix are context. The loss (core.losses.halva_loss) raises the correct phrase's likelihood against
the hallucinated one's, and a token-wise KL to the reference on the rest of the correct response (`pref.halva_alpha`)
keeps general answers where they were. The reference is the starting model: the policy with its adapters
disabled under a peft method, a frozen copy otherwise. It runs on the shared training loop (resume, several
processes, ...), as dpo does.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch
from torch import nn

from .. import UserError
from ..config import RunConfig, save_config


def phrase_spans(chosen: list[int], rejected: list[int]) -> tuple[slice, slice]:
    """(span in chosen, span in rejected) of the part where two responses differ: what is left after their
    longest common prefix and suffix."""
    p = 0
    while p < min(len(chosen), len(rejected)) and chosen[p] == rejected[p]:
        p += 1
    s = 0
    while s < min(len(chosen), len(rejected)) - p and chosen[-1 - s] == rejected[-1 - s]:
        s += 1
    return slice(p, len(chosen) - s), slice(p, len(rejected) - s)


class LabelledLogits(nn.Module):
    """The model's forward as the fp32 logits of every labelled position (row-major), with their targets: what
    HALVA needs for the phrase log-probs and the full-vocabulary KL, through forward (the call DDP synchronises)."""

    def __init__(self, lmm):
        super().__init__()
        self.lmm = lmm

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, **_):
        hidden = self.lmm.hidden_states(input_ids, attention_mask, pixel_values)
        mask = labels[:, 1:] != -100
        return self.lmm.logits_at(hidden[:, :-1][mask]).float(), labels[:, 1:][mask], mask


def _pair_phrases(logits, targets, mask):
    """Per pair of a batch (2B rows, chosen first): (summed log-probs of the chosen phrase, of the hallucinated
    phrase, token log-probs and positions of each side) from the labelled-position logits."""
    lp = torch.log_softmax(logits, -1)
    token_lp = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows = mask.sum(-1).tolist()
    starts = [sum(rows[:i]) for i in range(len(rows))]
    n = len(rows) // 2
    for i in range(n):  # pair i: chosen row i, rejected row n + i
        c, r = slice(starts[i], starts[i] + rows[i]), slice(starts[n + i], starts[n + i] + rows[n + i])
        cs, rs = phrase_spans(targets[c].tolist(), targets[r].tolist())
        if cs.stop <= cs.start or rs.stop <= rs.start:
            raise ValueError("halva: a pair whose chosen and rejected answers are the same")
        yield token_lp[c][cs].sum(), token_lp[r][rs].sum(), lp[c], cs


@torch.no_grad()
def phrase_margins(model, pairs, collate, batch_size: int = 32) -> torch.Tensor:
    """log pi(correct phrase) - log pi(hallucinated phrase) of every pair under a model (N,)."""
    from ..core.batching import pair_batches
    was = model.training
    model.eval()
    out = []
    for _, b in pair_batches(pairs, collate, batch_size, model.device):
        out += [(c - h).item() for c, h, _, _ in _pair_phrases(*LabelledLogits(model)(**b))]
    model.train(was)
    return torch.tensor(out)


def halva_step(pcfg, reference):
    """The step over a `LabelledLogits` model on a batch of B pairs (2B rows, chosen first)."""
    from ..core.losses import halva_loss

    def step(model, batch):
        logits, targets, mask = model(**batch)
        with torch.no_grad():
            ref_all = torch.log_softmax(reference(batch), -1)
        rows = mask.sum(-1).tolist()
        losses, margins, start = [], [], 0
        for chosen, hallucinated, lp, cs in _pair_phrases(logits, targets, mask):
            ref = ref_all[start:start + len(lp)]  # the chosen rows come first, in order
            start += len(lp)
            rest = torch.ones(len(lp), dtype=torch.bool, device=lp.device)
            rest[cs] = False
            kl = (ref.exp() * (ref - lp)).sum(-1)[rest].mean() if rest.any() else lp.new_zeros(())
            loss, margin = halva_loss(chosen, hallucinated, kl, pcfg.halva_alpha)
            losses.append(loss)
            margins.append(margin.detach())
        n = len(rows) // 2
        m = torch.stack(margins)
        return torch.stack(losses).mean(), n, {"phrase_margin": m.mean().item(),
                                               "phrase_accuracy": (m > 0).float().mean().item()}
    return step


def reference_logits(model):
    """batch -> the reference's labelled-position logits (the starting weights)."""
    if model.peft_parts():
        ref, ctx = model, model.adapters_disabled
    else:
        ref, ctx = copy.deepcopy(model).requires_grad_(False).eval(), contextlib.nullcontext
    frozen = LabelledLogits(ref)

    def fn(batch):
        was = ref.training
        ref.eval()
        with ctx():
            out = frozen(**batch)[0]
        ref.train(was)
        return out
    return fn


def run_halva(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress=None) -> dict:
    """Setup -> train (phrase-level alignment + KL) -> held-out phrase accuracy -> save."""
    from ..core.batching import collator_for
    from ..core.loop import ExampleBatches, process_state, train
    from ..core.model import count_params
    from ..core.trainable import setup_model
    from ..records.encoder import encoder_for
    from ..records.preferences import load_pairs

    t0 = time.time()
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (preference pairs whose answers differ in the hallucinated phrase)")
    model = setup_model(cfg, dropout="off")  # preference training: no dropout unless train.dropout=on
    enc = encoder_for(model, cfg.data)
    pairs, skipped = load_pairs(cfg.data.train, enc, cfg.data.on_error, cfg.data.columns)
    held_out = load_pairs(cfg.data.eval, enc, cfg.data.on_error, cfg.data.columns)[0] if cfg.data.eval else []
    collate = collator_for(model)
    before = phrase_margins(model, held_out, collate, cfg.train.batch_size) if held_out else None
    main_process = process_state().is_main_process
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": "halva"})
    trainable, total = count_params(model)
    step = halva_step(cfg.pref, reference_logits(model))
    stats = train(LabelledLogits(model), ExampleBatches(pairs, collate), step, cfg.train, out, resume=resume,
                  progress=progress)
    metrics = {**stats, "pairs": len(pairs), "skipped": len(skipped)}
    if main_process:
        model.save(out)
    if held_out and main_process:
        after = phrase_margins(model, held_out, collate, cfg.train.batch_size)
        metrics.update(eval_phrase_margin_before=before.mean().item(), eval_phrase_margin=after.mean().item(),
                       eval_phrase_accuracy_before=(before > 0).float().mean().item(),
                       eval_phrase_accuracy=(after > 0).float().mean().item(), eval_pairs=len(held_out))
    metrics["seconds"] = time.time() - t0
    return {"command": "halva", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

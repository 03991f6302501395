"""ppo: RLHF with PPO on image prompts (Ziegler et al. 2019 / InstructGPT), one rollout loop read top to bottom.

Each round: sample responses from the policy (actor) -> score them (a rule, or a trained reward model) ->
per-token reward `score - kl_ctl * (logp - ref_logp)` -> GAE -> several minibatch epochs of the clipped policy
loss plus the clipped value loss. Simplifications, said plainly: the critic is a value head on the policy's
own backbone (one network, as in many small-scale PPO set-ups) rather than a separate model; the reference
is a frozen copy of the starting model, or the policy with adapters disabled under a peft method.
Rollouts are sampled at `ppo.temperature`, and every log-prob (old, new, reference) is of that tempered
distribution, so the ratios and the KL are those of the policy that produced the samples.
Rule scorer `exact_match`: 1 when the answer equals the record's `chosen` answer (shapes data), else 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from pathlib import Path

import torch

from . import UserError
from .config import RunConfig, save_config


def make_scorer(cfg: RunConfig, collate, device):
    """(pairs, response texts, response examples) -> scores (N,)."""
    from .evaluate import normalize
    if cfg.ppo.reward == "exact_match":
        def score(pairs, texts, examples):
            return torch.tensor([float(normalize(t) == normalize(p.meta["answer"])) for p, t in zip(pairs, texts)])
        return score
    from .preference import load_reward_model
    rm = load_reward_model(cfg.ppo.reward).to(device)

    @torch.no_grad()
    def score(pairs, texts, examples):
        b = {k: v.to(device) for k, v in collate(examples).items()}
        return rm(**b).cpu()
    return score


@torch.no_grad()
def rollout(model, pairs, cfg, gen_collate, eos_id):
    """Sampled responses: (texts, examples of prompt + response with labels on the response)."""
    from .data import Example
    model.eval()
    b = {k: v.to(model.device) for k, v in gen_collate([p.prompt for p in pairs]).items()}
    b.pop("labels")
    new = model.generate(**b, max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature)
    texts, examples = [], []
    for p, seq in zip(pairs, new.tolist()):
        resp = seq[:seq.index(eos_id) + 1] if eos_id in seq else seq
        texts.append(model.tokenizer.decode(resp, skip_special_tokens=True).strip())
        examples.append(Example(p.prompt.input_ids + resp, [-100] * len(p.prompt.input_ids) + resp, p.prompt.images))
    model.train()
    return texts, examples


def run_ppo(cfg: RunConfig, out_dir: str | Path, progress=None) -> dict:
    """Setup -> rollouts (generate, score, GAE, PPO epochs) -> save."""
    from safetensors.torch import save_file

    from .data import Collator, ImageLoader
    from .losses import (AdaptiveKLController, approx_kl, gae, masked_mean, masked_whiten, ppo_policy_loss,
                         ppo_value_loss, token_rewards)
    from .model import count_params
    from .preference import ScalarHead, build_policy, load_pairs, token_logps

    t0 = time.time()
    pc = cfg.ppo
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train:
        raise UserError("data.train is not set (preference records; their prompts are the rollout prompts)")
    if cfg.train.optimizer_in_backward:  # ppo runs its own optimizer loop
        raise UserError("ppo does not support train.optimizer_in_backward")
    if pc.temperature <= 0:
        raise UserError(f"ppo.temperature must be > 0 (rollouts are sampled), got {pc.temperature}")
    model, enc = build_policy(cfg)
    critic = ScalarHead(model, init_std=0.0)  # values start at 0
    critic.head.requires_grad_(True)
    pairs, _ = load_pairs(cfg.data.train, enc, cfg.data.on_error, cfg.data.columns)
    if len({len(p.prompt.images) for p in pairs}) > 1 or len(pairs[0].prompt.images) > 1:
        # minibatches index the rollout's tensors by row, pixel_values included: one image per row
        raise UserError("ppo: every prompt needs exactly one image (or every prompt none)")
    images = ImageLoader(model.image_processor)
    collate = Collator(model.tokenizer.pad_token_id, images)
    gen_collate = Collator(model.tokenizer.pad_token_id, images, left_pad=True)
    score_fn = make_scorer(cfg, collate, model.device)
    if model.peft_parts():
        ref, ref_ctx = model, model.adapters_disabled
    else:
        ref, ref_ctx = copy.deepcopy(model).requires_grad_(False).eval(), contextlib.nullcontext
    params = [p for p in critic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    kl_ctl = AdaptiveKLController(pc.kl_ctl, pc.kl_target, pc.kl_horizon)
    save_config(cfg, out, {"command": "ppo"})
    trainable, total = count_params(critic)
    rng = random.Random(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    history = []
    log = open(out / "metrics.jsonl", "w", encoding="utf-8")
    for r in range(pc.rollouts):
        batch_pairs = rng.sample(pairs, min(pc.rollout_size, len(pairs)))
        texts, examples = rollout(model, batch_pairs, cfg, gen_collate, model.tokenizer.eos_token_id)
        scores = score_fn(batch_pairs, texts, examples).float()
        b = {k: v.to(model.device) for k, v in collate(examples).items()}
        args = (b["input_ids"], b["attention_mask"], b["labels"], b.get("pixel_values"))
        with torch.no_grad():
            model.eval()
            old_lp, mask, _, hidden = token_logps(model, *args, with_entropy=True, temperature=pc.temperature)
            old_values = critic.head(hidden[:, :-1]).squeeze(-1).float()
            with ref_ctx():
                ref.eval()
                ref_lp, _ = token_logps(ref, *args, temperature=pc.temperature)
            model.train()
            rewards = token_rewards(scores.to(old_lp.device), old_lp, ref_lp, mask, kl_ctl.value)
            adv, returns = gae(rewards, old_values, mask, pc.gamma, pc.lam)
            adv = masked_whiten(adv, mask)
        stats = {"pg_loss": [], "vf_loss": [], "clip_frac": [], "entropy": []}
        for _ in range(pc.epochs):
            order = torch.randperm(len(examples)).tolist()
            for s in range(0, len(order), pc.minibatch):
                i = torch.tensor(order[s:s + pc.minibatch], device=old_lp.device)
                lp, _, ent, hid = token_logps(model, *(a[i] if a is not None else None for a in args), with_entropy=True,
                                              temperature=pc.temperature)
                values = critic.head(hid[:, :-1]).squeeze(-1).float()
                pg, frac = ppo_policy_loss(lp, old_lp[i], adv[i], mask[i], pc.clip)
                vf = ppo_value_loss(values, old_values[i], returns[i], mask[i], pc.value_clip)
                loss = pg + pc.vf_coef * vf
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} in rollout {r + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                opt.step()
                for k, v in (("pg_loss", pg), ("vf_loss", vf), ("clip_frac", frac), ("entropy", masked_mean(ent, mask[i]))):
                    stats[k].append(float(v.detach()))
        kl = approx_kl(old_lp, ref_lp, mask).item()
        row = {"rollout": r + 1, "score": scores.mean().item(), "kl": kl, "kl_ctl": kl_ctl.value,
               "response_tokens": mask.sum(-1).float().mean().item(), **{k: sum(v) / len(v) for k, v in stats.items()}}
        if pc.adaptive_kl:
            kl_ctl.update(kl, len(examples))
        history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if progress:
            progress(r + 1, pc.rollouts, row["score"], 0.0)
    log.close()
    model.save(out)
    save_file({k: v.detach().contiguous() for k, v in critic.head.state_dict().items()}, str(out / "value_head.safetensors"))
    # One rollout's mean score is noisy (a few dozen samples): the first and last quarter of the rollouts are averaged.
    k = max(1, pc.rollouts // 4)
    first, last = (sum(h["score"] for h in hs) / len(hs) for hs in (history[:k], history[-k:]))
    metrics = {"rollouts": pc.rollouts, "score_first": first, "score_last": last, "score_window": k,
               "kl_last": history[-1]["kl"], "kl_max": max(h["kl"] for h in history),
               "clip_frac_last": history[-1]["clip_frac"], "vf_loss_last": history[-1]["vf_loss"],
               "entropy_last": history[-1]["entropy"], "kl_ctl_last": kl_ctl.value, "seconds": time.time() - t0}
    return {"command": "ppo", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

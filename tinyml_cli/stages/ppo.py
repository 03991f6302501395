"""ppo: RLHF with PPO on image prompts (Ziegler et al. 2019 / InstructGPT), on the shared training loop.

The rollouts are the loop's batch source: each one samples responses from the policy (actor) -> scores them (a
rule, or a trained reward model) -> per-token reward `score - kl_ctl * (logp - ref_logp)` -> GAE; its
micro-batches are `ppo.epochs` shuffled passes of `ppo.minibatch` responses, and the step function is the clipped
policy loss plus the clipped value loss. So ppo gets what every objective gets from the loop: train.optimizer,
scheduler, mixed precision, gradient accumulation, clipping, checkpoints with exact `--resume` (the current
rollout is part of the checkpoint), report_to and several processes (each samples its own prompts).
Simplifications, said plainly: the critic is a value head on the policy's own backbone (one network, as in many
small-scale PPO set-ups) rather than a separate model; the reference is a frozen copy of the starting model, or
the policy with adapters disabled under a peft method.
Rollouts are sampled at `ppo.temperature`, and every log-prob (old, new, reference) is of that tempered
distribution, so the ratios and the KL are those of the policy that produced the samples.
Rule scorer `exact_match`: 1 when the answer equals the record's `chosen` answer (shapes data), else 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path

import torch

from .. import UserError
from ..config import RunConfig, save_config

BUFFER = ("old_lp", "old_values", "mask", "adv", "returns")  # per response token, at the rollout's padded length


def make_scorer(cfg: RunConfig, collate):
    """(pairs, response texts, response examples, device) -> scores (N,). A reward model is loaded here, once,
    before training: loading it later would draw from the random state a resumed run restores."""
    from ..records.scoring import normalize
    if cfg.ppo.reward == "exact_match":
        def score(pairs, texts, examples, device):
            return torch.tensor([float(normalize(t) == normalize(p.meta["answer"])) for p, t in zip(pairs, texts)])
        return score
    from ..core.reward_model import load_reward_model
    rm = load_reward_model(cfg.ppo.reward)

    @torch.no_grad()
    def score(pairs, texts, examples, device):
        b = {k: v.to(device) for k, v in collate(examples).items()}
        return rm.to(device)(**b).cpu()
    return score


def response_example(pair, resp: list[int]):
    """The pair's prompt followed by a sampled response, labelled on the response."""
    from ..records.conversations import Example
    return Example(pair.prompt.input_ids + resp, [-100] * len(pair.prompt.input_ids) + resp, pair.prompt.images)


@torch.no_grad()
def sample(model, pairs, cfg, gen_collate):
    """Sampled responses: (texts, response token lists)."""
    eos_id = model.tokenizer.eos_token_id
    b = {k: v.to(model.device) for k, v in gen_collate([p.prompt for p in pairs]).items()}
    b.pop("labels")
    new = model.generate(**b, max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature)
    texts, responses = [], []
    for seq in new.tolist():
        resp = seq[:seq.index(eos_id) + 1] if eos_id in seq else seq
        texts.append(model.tokenizer.decode(resp, skip_special_tokens=True).strip())
        responses.append(resp)
    return texts, responses


class Rollouts:
    """PPO's batch source. A rollout: sample, score, KL-penalised rewards, GAE, whitened advantages; then its
    micro-batches. State (prompt sampler, KL controller, the rollout in progress, history) goes into checkpoints."""

    def __init__(self, pairs, cfg: RunConfig, critic, ref, ref_ctx, collate, gen_collate):
        from ..core.losses import AdaptiveKLController
        pc = cfg.ppo
        self.pairs, self.cfg, self.critic, self.ref, self.ref_ctx = pairs, cfg, critic, ref, ref_ctx
        self.collate, self.gen_collate = collate, gen_collate
        self.score = make_scorer(cfg, collate)
        self.size = min(pc.rollout_size, len(pairs))
        self.kl_ctl = AdaptiveKLController(pc.kl_ctl, pc.kl_target, pc.kl_horizon)
        # a rollout: its responses as (pair index, response tokens), so that each minibatch is collated afresh from
        # its records (image tensors of any family, any number of images), and the per-token buffers
        self.rng, self.rows, self.buffer, self.queue, self.history = None, [], {}, [], []

    def steps(self, tcfg, world: int) -> int:
        per_rollout = self.cfg.ppo.epochs * math.ceil(self.size / self.cfg.ppo.minibatch)
        if per_rollout % tcfg.grad_accum:
            raise UserError(f"ppo: a rollout has {per_rollout} micro-batches (ppo.epochs x minibatches of "
                            f"{self.size} responses), not a multiple of train.grad_accum={tcfg.grad_accum}")
        return self.cfg.ppo.rollouts * per_rollout // tcfg.grad_accum

    @torch.no_grad()
    def _rollout(self, device) -> None:
        from ..core.logprobs import token_logps
        from ..core.losses import approx_kl, gae, masked_whiten, token_rewards
        pc, model = self.cfg.ppo, self.critic.lmm
        chosen = self.rng.sample(range(len(self.pairs)), self.size)
        pairs = [self.pairs[i] for i in chosen]
        model.eval()
        texts, responses = sample(model, pairs, self.cfg, self.gen_collate)
        examples = [response_example(p, r) for p, r in zip(pairs, responses)]
        scores = self.score(pairs, texts, examples, device).float()
        b = {k: v.to(device) for k, v in self.collate(examples).items()}
        args = (b["input_ids"], b["attention_mask"], b["labels"], b.get("pixel_values"))
        old_lp, mask, _, hidden = token_logps(model, *args, with_entropy=True, temperature=pc.temperature)
        old_values = self.critic.head(hidden[:, :-1]).squeeze(-1).float()
        with self.ref_ctx():
            self.ref.eval()
            ref_lp, _ = token_logps(self.ref, *args, temperature=pc.temperature)
        model.train()
        rewards = token_rewards(scores.to(old_lp.device), old_lp, ref_lp, mask, self.kl_ctl.value)
        adv, returns = gae(rewards, old_values, mask, pc.gamma, pc.lam)
        adv = masked_whiten(adv, mask)
        kl = approx_kl(old_lp, ref_lp, mask).item()
        self.history.append({"rollout": len(self.history) + 1, "score": scores.mean().item(), "kl": kl,
                             "kl_ctl": self.kl_ctl.value, "response_tokens": mask.sum(-1).float().mean().item()})
        if pc.adaptive_kl:
            self.kl_ctl.update(kl, len(examples))
        self.rows = [[i, r] for i, r in zip(chosen, responses)]
        self.buffer = {k: v.detach().cpu() for k, v in zip(BUFFER, (old_lp, old_values, mask, adv, returns))}
        self.queue = [order[s:s + pc.minibatch] for _ in range(pc.epochs)
                      for order in [torch.randperm(len(examples)).tolist()]
                      for s in range(0, len(order), pc.minibatch)]

    def batches(self, acc, tcfg, model):
        if self.rng is None:  # a fresh run (a resumed one has its sampler back from the checkpoint)
            self.rng = random.Random(self.cfg.train.seed + 7919 * acc.process_index)
        while True:
            if not self.queue:
                self._rollout(acc.device)
            idx = self.queue.pop(0)
            batch = self.collate([response_example(self.pairs[self.rows[i][0]], self.rows[i][1]) for i in idx])
            n = batch["input_ids"].shape[1] - 1  # right padding: the rollout's positions, less its extra padding
            yield self.history[-1], {**batch, **{k: v[torch.tensor(idx)][:, :n] for k, v in self.buffer.items()}}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "kl_ctl": self.kl_ctl.value, "rows": self.rows, "buffer": self.buffer,
                "queue": self.queue, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.rng = random.Random()
        self.rng.setstate(state["rng"])
        self.rows = state["rows"]
        self.kl_ctl.value, self.buffer, self.queue, self.history = (state["kl_ctl"], state["buffer"], state["queue"],
                                                                    state["history"])


def ppo_step(pc):
    """The step over an `ActorCritic`: clipped policy loss + vf_coef x clipped value loss of a minibatch."""
    from ..core.losses import masked_mean, ppo_policy_loss, ppo_value_loss

    def step(model, b):
        lp, ent, values = model(**b)
        pg, frac = ppo_policy_loss(lp, b["old_lp"], b["adv"], b["mask"], pc.clip)
        vf = ppo_value_loss(values, b["old_values"], b["returns"], b["mask"], pc.value_clip)
        # both losses are means over the minibatch's response tokens: those are its units
        ratio = masked_mean(torch.exp(lp.detach() - b["old_lp"]), b["mask"]).item()  # 1 before the first update
        return pg + pc.vf_coef * vf, int(b["mask"].sum()), {"pg_loss": pg.item(), "vf_loss": vf.item(), "clip_frac": float(frac),
                                                            "ratio": ratio, "entropy": masked_mean(ent, b["mask"]).item()}
    return step


def run_ppo(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress=None, status=None) -> dict:
    """Setup -> the loop over rollouts (generate, score, GAE, PPO epochs) -> save."""
    from safetensors.torch import save_file

    from ..core.loop import process_state, train
    from ..core.model import count_params
    from ..core.reward_model import ActorCritic, ScalarHead
    from ..core.trainable import model_source, setup_model
    from ..records.encoder import encoder_for
    from ..records.preferences import load_pairs

    t0 = time.time()
    pc = cfg.ppo
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (preference records; their prompts are the rollout prompts)")
    status(f"loading the model ({model_source(cfg)})")
    model = setup_model(cfg, dropout="off")
    critic = ScalarHead(model, init_std=0.0)  # values start at 0
    critic.head.requires_grad_(True)
    status(f"reading and encoding {cfg.data.train}")
    pairs, _ = load_pairs(cfg.data.train, encoder_for(model, cfg.data), cfg.data.on_error, cfg.data.columns)
    collate, gen_collate = model.collator(), model.collator(left_pad=True)
    if model.peft_parts():
        ref, ref_ctx = model, model.adapters_disabled
    else:
        ref, ref_ctx = copy.deepcopy(model).requires_grad_(False).eval(), contextlib.nullcontext
    if pc.reward != "exact_match":
        status(f"loading the reward model ({pc.reward})")
    rollouts = Rollouts(pairs, cfg, critic, ref, ref_ctx, collate, gen_collate)
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": "ppo"})
    status(f"{len(pairs):,} prompts; first rollout (sampling {rollouts.size} responses, scoring them)")
    trainable, total = count_params(critic)
    stats = train(ActorCritic(critic, pc.temperature), rollouts, ppo_step(pc), cfg.train, out, resume=resume,
                  progress=progress)
    if main_process:
        model.save(out)
        save_file({k: v.detach().contiguous() for k, v in critic.head.state_dict().items()},
                  str(out / "value_head.safetensors"))
    history = rollouts.history
    # One rollout's mean score is noisy (a few dozen samples): the first and last quarter of the rollouts are averaged.
    k = max(1, len(history) // 4)
    first, last = (sum(h["score"] for h in hs) / len(hs) for hs in (history[:k], history[-k:]))
    metrics = {"rollouts": len(history), "score_first": first, "score_last": last, "score_window": k,
               "kl_last": history[-1]["kl"], "kl_max": max(h["kl"] for h in history),
               "clip_frac_last": stats["clip_frac"], "vf_loss_last": stats["vf_loss"],
               "entropy_last": stats["entropy"], "kl_ctl_last": rollouts.kl_ctl.value, "steps": stats["steps"],
               "resumed_from": stats["resumed_from"], "loss_first": stats["loss_first"],
               "loss_last": stats["loss_last"], "seconds": time.time() - t0}
    return {"command": "ppo", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

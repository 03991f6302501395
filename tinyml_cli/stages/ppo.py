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
Prompts are read as grpo reads them (records/preferences.prompt_record): a prompt and an image, with a reference
answer for the rule scorer `exact_match` (1 when the response equals it, else 0), or any record layout that
holds one (a preference record's chosen answer, an sft conversation's last answer).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import UserError
from ..config import RunConfig, save_config
from ..core.rollout import Rollouts

BUFFER = ("old_lp", "old_values", "mask", "adv", "returns")  # per response token, at the rollout's padded length


class PPORollouts(Rollouts):
    """PPO's rollouts: sample, score, KL-penalised rewards, GAE, whitened advantages. The KL controller's value
    goes into checkpoints beside the shared state."""

    def __init__(self, prompts, cfg: RunConfig, critic, ref, ref_ctx, collate, gen_collate, scorer):
        from ..core.losses import AdaptiveKLController
        pc = cfg.ppo
        super().__init__(prompts, pc.rollout_size, 1, pc.rollouts, pc.epochs, pc.minibatch, cfg.train.seed, "ppo")
        self.cfg, self.critic, self.ref, self.ref_ctx = cfg, critic, ref, ref_ctx
        self.collate, self.gen_collate, self.score = collate, gen_collate, scorer
        self.kl_ctl = AdaptiveKLController(pc.kl_ctl, pc.kl_target, pc.kl_horizon)

    @torch.no_grad()
    def make(self, prompts, device):
        from ..core.logprobs import token_logps
        from ..core.losses import approx_kl, gae, masked_whiten, token_rewards
        from ..core.rollout import sample
        pc, model = self.cfg.ppo, self.critic.lmm
        model.eval()
        texts, examples = sample(model, prompts, self.gen_collate, pc.max_new_tokens, pc.temperature)
        scores = self.score(prompts, texts, examples, device)[0].float()
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
        row = {"score": scores.mean().item(), "kl": kl, "kl_ctl": self.kl_ctl.value,
               "response_tokens": mask.sum(-1).float().mean().item()}
        if pc.adaptive_kl:
            self.kl_ctl.update(kl, len(examples))
        return examples, dict(zip(BUFFER, (old_lp, old_values, mask, adv, returns))), row

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_ctl": self.kl_ctl.value}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_ctl.value = state["kl_ctl"]


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
    from ..core.rollout import Scorer, load_online_prompts
    from ..core.trainable import model_source, reference_model, setup_model

    t0 = time.time()
    pc = cfg.ppo
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (prompt records: a prompt, an image and a reference answer)")
    status(f"loading the model ({model_source(cfg)})")
    model = setup_model(cfg, dropout="off")
    critic = ScalarHead(model, init_std=0.0)  # values start at 0
    critic.head.requires_grad_(True)
    collate, gen_collate = model.collator(), model.collator(left_pad=True)
    if pc.reward not in ("exact_match", "answer_tags", "format"):
        status(f"loading the reward model ({pc.reward})")
    scorer = Scorer([pc.reward], [], collate)
    status(f"reading and encoding {cfg.data.train}")
    prompts = load_online_prompts(cfg.data, model, scorer, "ppo")
    ref, ref_ctx = reference_model(model)
    rollouts = PPORollouts(prompts, cfg, critic, ref, ref_ctx, collate, gen_collate, scorer)
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": "ppo"})
    status(f"{len(prompts):,} prompts; first rollout (sampling {rollouts.rows} responses, scoring them)")
    trainable, total = count_params(critic)
    stats = train(ActorCritic(critic, pc.temperature), rollouts, ppo_step(pc), cfg.train, out, resume=resume,
                  progress=progress)
    if main_process:
        model.save(out)
        save_file({k: v.detach().contiguous() for k, v in critic.head.state_dict().items()},
                  str(out / "value_head.safetensors"))
    history = rollouts.history
    # One rollout's mean score is noisy (a few dozen samples): the first and last quarter of the rollouts are averaged.
    first, last, k = rollouts.window()
    metrics = {"rollouts": len(history), "score_first": first, "score_last": last, "score_window": k,
               "kl_last": history[-1]["kl"], "kl_max": max(h["kl"] for h in history),
               "clip_frac_last": stats["clip_frac"], "vf_loss_last": stats["vf_loss"],
               "entropy_last": stats["entropy"], "kl_ctl_last": rollouts.kl_ctl.value, "steps": stats["steps"],
               "resumed_from": stats["resumed_from"], "loss_first": stats["loss_first"],
               "loss_last": stats["loss_last"], "seconds": time.time() - t0}
    return {"command": "ppo", "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

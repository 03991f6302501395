"""grpo / rloo: critic-free online RL on image prompts (verifiable rewards), on the shared training loop.

Each rollout draws `grpo.prompts` prompts and samples `grpo.num_generations` (G) responses to each; rewards are the
weighted sum of rule scorers (exact_match, answer_tags, format) and / or reward models. The advantage of a
response compares it with the other responses to its prompt, so no critic is trained:
- grpo (DeepSeekMath's GRPO, as TRL 1.16's GRPOTrainer): reward minus the group mean, divided by the group's std
  (`grpo.scale_rewards`); the loss is the clipped importance ratio per token plus `beta` x the k3 estimate of the
  per-token KL to the reference, aggregated by `grpo.loss_type` (dapo: token mean, the default; grpo: sequence
  mean; dr_grpo: a constant normaliser).
- rloo (REINFORCE leave-one-out, Ahmadian et al. 2024, as TRL 1.16's RLOOTrainer): the KL to the reference, summed
  over the response, is a penalty on the reward (`beta`); the baseline is the mean reward of the other G - 1
  responses; one clipped importance ratio per response (its summed log-probs).
The rollout's responses are the loop's micro-batches (`grpo.epochs` shuffled passes of `grpo.minibatch`), so resume,
mixed precision, accumulation and several processes work as for every objective. Old log-probs are computed only
when a rollout spans several optimizer steps; otherwise the policy that sampled is the one being trained (ratio 1).
Log-probs are of the tempered distribution the responses were sampled from (`grpo.temperature`). With beta 0 no
reference model is kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import UserError
from ..config import RunConfig, save_config
from ..core.rollout import Rollouts


class GroupRollouts(Rollouts):
    """G responses per prompt, their rewards and group-relative advantages (grpo) or leave-one-out ones (rloo)."""

    def __init__(self, prompts, cfg: RunConfig, command: str, model, ref, ref_ctx, collate, gen_collate, scorer):
        g = cfg.grpo
        super().__init__(prompts, g.prompts, g.num_generations, g.rollouts, g.epochs, g.minibatch, cfg.train.seed, "grpo")
        self.cfg, self.command, self.model, self.ref, self.ref_ctx = cfg, command, model, ref, ref_ctx
        self.collate, self.gen_collate, self.score = collate, gen_collate, scorer
        # the sampling policy is the trained one until the first optimizer step of the rollout ends
        self.off_policy = self.micro_batches() > cfg.train.grad_accum

    @torch.no_grad()
    def make(self, prompts, device):
        from ..core.logprobs import token_logps
        from ..core.losses import group_advantages, leave_one_out_advantages, sequence_logps
        from ..core.rollout import sample
        g, model, G = self.cfg.grpo, self.model, self.per_prompt
        model.eval()
        texts, examples = sample(model, prompts, self.gen_collate, g.max_new_tokens, g.temperature, repeats=G)
        rows = [p for p in prompts for _ in range(G)]
        total, each = self.score(rows, texts, examples, device)
        b = {k: v.to(device) for k, v in self.collate(examples).items()}
        args = (b["input_ids"], b["attention_mask"], b["labels"], b.get("pixel_values"))
        rloo_kl = self.command == "rloo" and g.beta > 0
        old_lp = mask = ref_lp = None
        if self.off_policy or rloo_kl:
            old_lp, mask = token_logps(model, *args, temperature=g.temperature)
        if g.beta > 0:
            with self.ref_ctx():
                self.ref.eval()
                ref_lp, mask = token_logps(self.ref, *args, temperature=g.temperature)
        model.train()
        mask = b["labels"][:, 1:] != -100 if mask is None else mask
        row = {"score": total.mean().item(), "response_tokens": mask.sum(-1).float().mean().item(),
               # groups whose G responses all scored the same teach nothing (advantage 0)
               "frac_zero_std": (total.view(-1, G).std(1) < 1e-6).float().mean().item(),
               **{f"reward_{_short(n)}": each[:, i].mean().item() for i, n in enumerate(self.score.names)}}
        if self.command == "rloo":
            if rloo_kl:
                kl = sequence_logps(old_lp - ref_lp, mask).cpu()
                total = total - g.beta * kl
                row["kl"] = kl.mean().item()
            adv = leave_one_out_advantages(total, G, g.normalize_advantages)
            ref_lp = None  # in the reward already
        else:  # grpo's KL is reported by its step (k3, per token, of the policy being trained)
            adv = group_advantages(total, G, g.scale_rewards)
        values = {"adv": adv.float(), "old_lp": old_lp if self.off_policy else None, "ref_lp": ref_lp}
        return examples, values, row


def _short(name: str) -> str:
    """A reward's name in metrics: the rule's, or `model` for a reward model folder."""
    from ..records.scoring import RULES
    return name if name in RULES else "model"


def grpo_step(g, command: str):
    """The step over a `TokenLogps` model (tempered, with entropy): the GRPO or RLOO loss of a micro-batch."""
    from ..core.losses import grpo_loss, masked_mean, rloo_loss, sequence_logps

    def step(model, b):
        lp, mask, ent = model(**b)
        old = b["old_lp"] if "old_lp" in b else lp.detach()  # on-policy: ratio 1, gradient of A log pi
        if command == "rloo":
            loss, frac = rloo_loss(sequence_logps(lp, mask), sequence_logps(old, mask), b["adv"], g.clip, g.clip_high)
            stats, n = {"clip_frac": frac}, len(lp)
        else:
            loss, stats = grpo_loss(lp, old, b["adv"], mask, b.get("ref_lp"), g.beta, g.clip, g.clip_high,
                                    g.loss_type, g.max_new_tokens)
            # the loss is a mean over tokens (dapo) or over responses (grpo, dr_grpo): what several processes weigh by
            n = int(mask.sum()) if g.loss_type == "dapo" else len(lp)
        return loss, n, {"clip_frac": float(stats["clip_frac"]), "entropy": masked_mean(ent, mask).item(),
                         **({"kl": float(stats["kl"])} if "kl" in stats else {})}
    return step


def run_grpo(cfg: RunConfig, out_dir: str | Path, command: str = "grpo", resume: bool = False, progress=None,
             status=None) -> dict:
    """Setup -> the loop over rollouts (sample G per prompt, score, advantages, clipped updates) -> save."""
    from ..core.logprobs import TokenLogps
    from ..core.loop import process_state, train
    from ..core.model import count_params
    from ..core.rollout import Scorer, load_online_prompts
    from ..core.trainable import model_source, reference_model, setup_model

    t0 = time.time()
    g = cfg.grpo
    status = status or (lambda text: None)
    out = Path(out_dir)
    if not cfg.data.train:
        raise UserError("data.train is not set (prompt records: a prompt, an image and, for rule rewards, an answer)")
    status(f"loading the model ({model_source(cfg)})")
    model = setup_model(cfg, dropout="off")
    collate, gen_collate = model.collator(), model.collator(left_pad=True)
    scorer = Scorer(g.rewards, g.reward_weights, collate, g.format_pattern)
    status(f"reading and encoding {cfg.data.train}")
    prompts = load_online_prompts(cfg.data, model, scorer, command)
    ref, ref_ctx = reference_model(model) if g.beta > 0 else (None, None)
    rollouts = GroupRollouts(prompts, cfg, command, model, ref, ref_ctx, collate, gen_collate, scorer)
    main_process = process_state().is_main_process  # with several processes, one writes the outputs
    if main_process:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before this leaves no folder
        save_config(cfg, out, {"command": command})
    status(f"{len(prompts):,} prompts; first rollout (sampling {rollouts.rows} responses, scoring them)")
    trainable, total = count_params(model)
    stats = train(TokenLogps(model, g.temperature, entropy=True), rollouts, grpo_step(g, command), cfg.train, out,
                  resume=resume, progress=progress)
    if main_process:
        model.save(out)
    history = rollouts.history
    first, last, k = rollouts.window()
    metrics = {"rollouts": len(history), "score_first": first, "score_last": last, "score_window": k,
               "responses_per_rollout": rollouts.rows, "frac_zero_std_last": history[-1]["frac_zero_std"],
               "response_tokens_last": history[-1]["response_tokens"], "clip_frac_last": stats["clip_frac"],
               "entropy_last": stats["entropy"], "steps": stats["steps"], "resumed_from": stats["resumed_from"],
               "loss_first": stats["loss_first"], "loss_last": stats["loss_last"], "tokens_per_s": stats["tokens_per_s"],
               **{k: v for k, v in history[-1].items() if k.startswith("reward_")},
               **({"kl_last": stats["kl"]} if "kl" in stats else {}),
               "seconds": time.time() - t0}
    return {"command": command, "output_dir": str(out), "metrics": metrics,
            "artifacts": {"model": str(out), "config": str(out / "config.yaml"), "metrics": str(out / "metrics.jsonl")},
            "trainable_params": trainable, "total_params": total}

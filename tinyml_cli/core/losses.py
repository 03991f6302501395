"""Losses of the preference and RL stages as pure tensor functions (no model, no config).

- Bradley-Terry reward loss: InstructGPT (Ouyang et al. 2022, arXiv 2203.02155), with Llama 2's margin.
- DPO: Rafailov et al. 2023 (arXiv 2305.18290); conservative DPO = label smoothing (Mitchell 2023);
  IPO: Azar et al. 2023 (arXiv 2310.12036), on summed or (as TRL) per-token mean log-probs.
- Reference-free pair losses: SimPO (Meng et al. 2024, arXiv 2405.14734), ORPO (Hong et al. 2024, arXiv 2403.07691).
- mDPO: Wang et al. 2024 (arXiv 2406.11839): DPO + an image-conditional term + an anchored reward.
- KTO: Ethayarajh et al. 2024 (arXiv 2402.01306), unpaired desirable / undesirable answers.
- PPO for language models: Ziegler et al. 2019 (arXiv 1909.08593) with GAE (Schulman et al. 2015,
  arXiv 1506.02438); per-token KL penalty and clipped value loss as in InstructGPT / DeepSpeed-Chat.
- GRPO: Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300), with DAPO's token-level mean (Yu et al. 2025,
  arXiv 2503.14476) and Dr. GRPO's constant normaliser (Liu et al. 2025, arXiv 2503.20783);
  RLOO: Ahmadian et al. 2024 (arXiv 2402.14740). The formulas follow TRL 1.16's GRPOTrainer / RLOOTrainer.
Masks are 1 on response tokens and 0 on prompt and padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over everything, or along dim); an empty mask gives 0, not NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each response: (B, T) token log-probs -> (B,)."""
    return (token_logps * mask.to(token_logps.dtype)).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0):
    """-log sigma(r_w - r_l - margin), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, rpo_alpha: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """DPO family on summed response log-probs; returns (loss per pair, chosen rewards, rejected rewards).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
      sigmoid:  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps > 0: conservative DPO)
      ipo:      (h - 1 / (2 beta))^2, on the summed log-probs
      ipo_norm: the same on per-token mean log-probs (each side's log-probs divided by its response tokens, as
                TRL's loss_type="ipo" does; needs chosen_tokens and rejected_tokens)
    rpo_alpha > 0 adds alpha * (-log pi(y_w) / |y_w|), the chosen answer's per-token NLL (RPO, Pang et al.
    2024): plain DPO may lower the chosen likelihood too, as long as the rejected one falls faster.
    The rewards are the implicit ones, beta * (log pi - log ref), of the log-probs the loss compares.
    """
    nll = -pi_chosen / chosen_tokens if rpo_alpha else None
    if loss_type == "ipo_norm":
        pi_chosen, ref_chosen = pi_chosen / chosen_tokens, ref_chosen / chosen_tokens
        pi_rejected, ref_rejected = pi_rejected / rejected_tokens, ref_rejected / rejected_tokens
    chosen_ratio, rejected_ratio = pi_chosen - ref_chosen, pi_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type in ("ipo", "ipo_norm"):
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (sigmoid, ipo or ipo_norm)")
    if rpo_alpha:
        loss = loss + rpo_alpha * nll
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def halva_loss(phrase_chosen, phrase_hallucinated, kl, alpha: float = 0.5):
    """HALVA (Sarkar et al. 2024, arXiv 2405.18654): the phrase-level alignment loss
    -log(pi(y_c) / (pi(y_c) + pi(y_h))) = -log sigmoid(log pi(y_c) - log pi(y_h)) between the summed log-probs of
    the correct and the hallucinated phrase in the same context, plus alpha x the token-wise KL(reference || policy)
    on the rest of the correct response, which keeps what the model says elsewhere. Per pair: (loss, phrase margin)."""
    margin = phrase_chosen - phrase_hallucinated
    return -torch.nn.functional.logsigmoid(margin) + alpha * kl, margin


def token_rewards(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_ctl: float) -> torch.Tensor:
    """Per-token reward: -kl_ctl * (logp - ref_logp) on every response token, plus the score on the last one."""
    mask = mask.to(logps.dtype)
    rewards = -kl_ctl * (logps - ref_logps) * mask
    last = mask.sum(-1).long().clamp(min=1) - 1 + mask.argmax(-1)  # index of the last response token
    rewards[torch.arange(len(score)), last] += score * (mask.sum(-1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over the masked (contiguous) response tokens; returns (advantages, returns).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last token.
    """
    mask = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = (delta + gamma * lam * last_adv) * m
        adv[:, t] = last_adv
        # beyond the response (padding) nothing flows back; before it, keep the response's values
        next_value = torch.where(m > 0, values[:, t], next_value)
        last_adv = torch.where(m > 0, last_adv, torch.zeros_like(last_adv))
    return adv, (adv + values) * mask


def ppo_policy_loss(logps, old_logps, advantages, mask, clip: float = 0.2):
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-c, 1+c)); returns (loss, clip fraction)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).to(logps.dtype), mask)
    return loss, clip_frac.detach()


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within old_values +- clip."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def approx_kl(logps, ref_logps, mask):
    """Mean per-sequence KL estimate sum_t (logp - ref_logp) over the response tokens of sampled responses."""
    return sequence_logps(logps - ref_logps, mask).mean()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at every position: (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKLController:
    """Ziegler et al.'s controller: kl_ctl grows when the KL is over target, shrinks when under (+-20 % cap)."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


# ------------------------------------------------------------------------------- reference-free pair losses
def mean_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average log-probability per response token of each response: (B, T) -> (B,) (SimPO's and ORPO's unit)."""
    m = mask.to(token_logps.dtype)
    return (token_logps * m).sum(-1) / m.sum(-1).clamp(min=1)


def simpo_loss(avg_chosen, avg_rejected, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO on average response log-probs, no reference: -log sigma(beta (avg_w - avg_l) - gamma) (label smoothing as
    in cDPO); returns (loss per pair, chosen rewards, rejected rewards), rewards beta * avg."""
    z = beta * (avg_chosen - avg_rejected) - gamma
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(avg_chosen, avg_rejected, beta: float = 0.1):
    """ORPO: the chosen answer's per-token NLL minus beta * log sigma(log odds(y_w) - log odds(y_l)), where
    odds(y) = P / (1 - P) of the average per-token probability; no reference. Returns (loss per pair, chosen
    rewards, rejected rewards) with rewards beta * avg log-prob (TRL's logging convention)."""
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    loss = -avg_chosen - beta * F.logsigmoid(log_odds)
    return loss, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def mdpo_loss(pi_chosen, pi_rejected, pi_corrupt, ref_chosen, ref_rejected, ref_corrupt, beta: float = 0.1,
              anchor: float = 0.0):
    """mDPO on summed response log-probs: DPO + the image-conditional preference (the chosen answer with the true
    image over the same answer with a corrupted image) + the anchor (the chosen reward kept above `anchor`):

      -log s(beta h) - log s(beta [(pi_w - ref_w) - (pi_w' - ref_w')]) - log s(beta (pi_w - ref_w) - anchor)

    where ' marks the corrupted image. Returns (loss per pair, chosen, rejected, corrupted-image rewards)."""
    chosen_ratio, rejected_ratio, corrupt_ratio = pi_chosen - ref_chosen, pi_rejected - ref_rejected, pi_corrupt - ref_corrupt
    loss = (-F.logsigmoid(beta * (chosen_ratio - rejected_ratio)) - F.logsigmoid(beta * (chosen_ratio - corrupt_ratio))
            - F.logsigmoid(beta * chosen_ratio - anchor))
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), beta * corrupt_ratio.detach()


def kto_loss(pi_logps, ref_logps, desirable, kl_pi_logps, kl_ref_logps, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO on summed log-probs of unpaired answers; returns (loss per answer, rewards, KL estimate).

    z0 = max(0, mean(pi - ref) over mismatched prompt / answer pairs), detached (the reference point);
    desirable: w_d (1 - s(beta (r - z0))), undesirable: w_u (1 - s(beta (z0 - r))), with r = pi - ref.
    """
    kl = (kl_pi_logps - kl_ref_logps).mean().detach().clamp(min=0)
    ratio = pi_logps - ref_logps
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return loss, beta * ratio.detach(), kl


# ------------------------------------------------------------------------------- critic-free online RL
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """GRPO's advantages: each reward minus the mean of its group (the G samples of one prompt, consecutive),
    divided by the group's std ("group"), the whole batch's std ("batch") or not at all ("none", Dr. GRPO);
    std is the unbiased one, plus eps, as in TRL."""
    g = rewards.view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return adv
    if scale == "group":
        std = g.std(1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"unknown reward scaling {scale!r} (group, batch or none)")
    return adv / (std + eps)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False, eps: float = 1e-4):
    """RLOO's advantages: each reward minus the mean of the other G - 1 rewards of its group; `normalize` whitens
    them over the batch (TRL's normalize_advantages)."""
    g = rewards.view(-1, group_size)
    adv = (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + eps)
    return adv


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = e^(ref - logp) - (ref - logp) - 1 (Schulman): unbiased, >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, beta: float = 0.0, clip: float = 0.2,
              clip_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None):
    """GRPO's clipped token-level objective plus beta * k3 KL, aggregated by loss_type; returns (loss, stats).

    per token: -min(r A, clip(r, 1 - clip, 1 + clip_high) A) + beta k3, with r = pi / pi_old and A the
    completion's advantage. Aggregation over the masked tokens:
      grpo:    mean over completions of each completion's token mean (length-biased, see Dr. GRPO);
      dapo:    sum over all tokens / number of tokens (every token weighs the same);
      dr_grpo: sum over all tokens / (completions x max_completion_length) (a constant).
    stats: clip fraction (tokens whose clipped side was taken) and the mean k3 KL, both detached.
    """
    clip_high = clip if clip_high is None else clip_high
    m = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip_high) * adv)
    stats = {}
    if beta:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), m)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO loss type {loss_type!r} (grpo, dapo or dr_grpo)")
    clipped = ((ratio < 1 - clip) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    stats["clip_frac"] = masked_mean(clipped.to(logps.dtype), m).detach()
    return loss, stats


def rloo_loss(seq_logps, old_seq_logps, advantages, clip: float = 0.2, clip_high: float | None = None):
    """RLOO's clipped objective with one importance ratio per completion (its summed log-probs), mean over
    completions; returns (loss, clip fraction)."""
    clip_high = clip if clip_high is None else clip_high
    ratio = torch.exp(seq_logps - old_seq_logps)
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip_high) * advantages).mean()
    clipped = ((ratio < 1 - clip) & (advantages < 0)) | ((ratio > 1 + clip_high) & (advantages > 0))
    return loss, clipped.to(seq_logps.dtype).mean().detach()

"""Losses of the preference stages as pure tensor functions (no model, no config): reward, DPO, PPO.

- Bradley-Terry reward loss: InstructGPT (Ouyang et al. 2022, arXiv 2203.02155), with Llama 2's margin.
- DPO: Rafailov et al. 2023 (arXiv 2305.18290); conservative DPO = label smoothing (Mitchell 2023);
  IPO: Azar et al. 2023 (arXiv 2310.12036), on summed or (as TRL) per-token mean log-probs.
- PPO for language models: Ziegler et al. 2019 (arXiv 1909.08593) with GAE (Schulman et al. 2015,
  arXiv 1506.02438); per-token KL penalty and clipped value loss as in InstructGPT / DeepSpeed-Chat.
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

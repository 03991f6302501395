"""The new preference and RL losses against TRL 1.16's own code, on the same random tensors (to 1e-6).

Where TRL's loss is a method of its trainer (GRPO, RLOO, KTO, ORPO, CPO-SimPO), the test calls that method
itself with a stand-in `self` that holds only what the method reads, and a stand-in model whose log-probs are the
test's tensors. GRPO's and RLOO's advantages are computed inside TRL's 300-line generation step; their few lines
are reproduced here verbatim (marked). Skipped without TRL (the test and bench extras install it).
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL 1.16 is the reference implementation: pip install -e '.[test]' (or .[bench])")

from tinyml_cli.core import losses as L  # noqa: E402 - after the importorskip

B, T, G = 8, 7, 4


def _tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside the clip range too
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return lp, old, ref, mask, adv


def _accelerator():
    return SimpleNamespace(num_processes=1, device="cpu", reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                           gather_for_metrics=lambda x: x, sync_gradients=True)


def _grpo_self(loss_type, beta, lp, eps_high):
    ent = torch.zeros_like(lp)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, ent, None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type, epsilon_low=0.2,
        epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=T, accelerator=_accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)})


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_loss_matches_trl(loss_type, beta, on_policy):
    from trl.trainer.grpo_trainer import GRPOTrainer
    lp, old, ref, mask, adv = _tensors(0)
    old = lp if on_policy else old
    eps_high = 0.28  # DAPO's clip-higher, so the two bounds differ
    inputs = {"prompt_ids": torch.zeros(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    if not on_policy:
        inputs["old_per_token_logps"] = old
    stub = _grpo_self(loss_type, beta, lp, eps_high)
    want = GRPOTrainer._compute_loss(stub, None, inputs)
    got, stats = L.grpo_loss(lp, old, adv, mask, ref, beta, 0.2, eps_high, loss_type, T)
    assert got.item() == pytest.approx(want.item(), abs=1e-6, rel=0)
    clip = stub._metrics["train"]["clip_ratio/region_mean"][-1]
    assert stats["clip_frac"].item() == pytest.approx(clip, abs=1e-6)
    if beta:
        assert stats["kl"].item() == pytest.approx(stub._metrics["train"]["kl"][-1], abs=1e-6)
    if not on_policy:
        assert 0 < clip < 1  # the clipped branch is exercised


def _trl_group_advantages(rewards, num_generations, scale_rewards):
    """Verbatim from GRPOTrainer._generate_and_score_completions (TRL 1.16, sum_then_normalize, no NaN rewards)."""
    from trl.trainer.utils import nanstd
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    r = torch.randn(4 * G, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r[:G] = 1.0  # a group whose samples all scored the same: advantage 0, not NaN
    want = _trl_group_advantages(r, G, scale)
    got = L.group_advantages(r, G, scale)
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and got[:G].abs().max() < 1e-6


def _trl_rloo_advantages(rewards, num_generations, normalize, beta, kl):
    """Verbatim from RLOOTrainer._generate_and_score_completions (TRL 1.16, no NaN rewards, KL in the reward)."""
    from trl.trainer.utils import nanstd
    rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return advantages


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_and_loss_match_trl(normalize):
    from trl.trainer.rloo_trainer import RLOOTrainer
    lp, old, ref, mask, _ = _tensors(2)
    r = torch.randn(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    beta = 0.05
    kl = ((old - ref) * mask).sum(-1)  # TRL's sequence KL: first-order log ratio of the sampling policy
    want_adv = _trl_rloo_advantages(r, G, normalize, beta, kl)
    got_adv = L.leave_one_out_advantages(r - beta * L.sequence_logps(old - ref, mask), G, normalize)
    assert torch.allclose(got_adv, want_adv, atol=1e-6, rtol=0)

    old_seq = (old * mask).sum(-1)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None), aux_loss_enabled=False,
        epsilon_low=0.2, epsilon_high=0.2, accelerator=_accelerator(), model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": want_adv, "old_logps": old_seq}
    want = RLOOTrainer._compute_loss(stub, None, inputs)
    got, frac = L.rloo_loss((lp * mask).sum(-1), old_seq, want_adv)
    assert got.item() == pytest.approx(want.item(), abs=1e-6, rel=0)
    assert frac.item() == pytest.approx(stub._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_matches_trl(weights):
    from trl.trainer.kto_trainer import KTOTrainer
    g = torch.Generator().manual_seed(4)
    pi, ref = -torch.rand(B, generator=g, dtype=torch.float64) * 8, -torch.rand(B, generator=g, dtype=torch.float64) * 8
    kl_pi, kl_ref = -torch.rand(B, generator=g, dtype=torch.float64) * 8, -torch.rand(B, generator=g, dtype=torch.float64) * 9
    label = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]).bool()
    beta = 0.1

    def model(**kw):  # TRL sums the per-token log-probs: one column holds each sequence's total
        lp = torch.zeros(B, T - 1, dtype=torch.float64)
        lp[:, 0] = pi
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))
    stub = SimpleNamespace(_compute_kl_logps=lambda m, b: kl_pi, aux_loss_enabled=False, precompute_ref_logps=True,
                           calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=weights[0],
                           undesirable_weight=weights[1], accelerator=_accelerator(), model=SimpleNamespace(training=False),
                           _metrics={"eval": defaultdict(list)}, _tp_size=1, _total_train_tokens=0)
    batch = {"label": label, "input_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": torch.ones(B, T),
             "attention_mask": torch.ones(B, T, dtype=torch.long), "ref_logps": ref, "ref_KL_logps": kl_ref}
    want = KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    got, rewards, kl = L.kto_loss(pi, ref, label, kl_pi, kl_ref, beta, *weights)
    assert got.mean().item() == pytest.approx(want.item(), abs=1e-6, rel=0)
    assert kl.item() == pytest.approx(stub._metrics["eval"]["kl"][-1], abs=1e-6) and kl.item() > 0
    assert rewards[label].mean().item() == pytest.approx(stub._metrics["eval"]["rewards/chosen"][-1], abs=1e-6)


def test_orpo_loss_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    g = torch.Generator().manual_seed(5)
    c, r = -torch.rand(B, generator=g, dtype=torch.float64) * 2, -torch.rand(B, generator=g, dtype=torch.float64) * 2
    c[0], r[0] = -1e-4, -0.69  # both sides of log1mexp's branch at -log 2, and near 0
    stub = SimpleNamespace(beta=0.1, accelerator=_accelerator())
    trl_losses, rc, rr, _, _ = ORPOTrainer.odds_ratio_loss(stub, c, r)  # TRL computes in float32
    trl_losses, rc, rr = trl_losses.double(), rc.double(), rr.double()
    nll = -c  # TRL's NLL term is a cross-entropy over the chosen tokens; with it equal, the losses are equal
    got, grc, grr = L.orpo_loss(c, r, beta=0.1)
    assert torch.allclose(got, nll - trl_losses, atol=1e-6, rtol=0)
    assert got.mean().item() == pytest.approx((nll.mean() - trl_losses.mean()).item(), abs=1e-6)
    assert torch.allclose(grc, rc, atol=1e-6) and torch.allclose(grr, rr, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_matches_trl_cpo(label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    g = torch.Generator().manual_seed(6)
    c, r = -torch.rand(B, generator=g, dtype=torch.float64) * 2, -torch.rand(B, generator=g, dtype=torch.float64) * 2
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=label_smoothing,
                           accelerator=_accelerator())
    want, rc, rr = CPOTrainer.cpo_loss(stub, c, r)
    got, grc, grr = L.simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=label_smoothing)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert torch.allclose(grc, rc, atol=1e-6) and torch.allclose(grr, rr, atol=1e-6)

"""The preference losses against values computed by hand (log sigma(x) = -log(1 + e^-x))."""

import math

import pytest
import torch

from tinyml_cli.core.losses import (
    AdaptiveKLController,
    approx_kl,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    token_rewards,
)

T = torch.tensor


def test_masked_mean_ignores_padding_and_empty_mask_is_zero():
    x, m = T([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]]), T([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    w = masked_whiten(T([[1.0, 3.0, 50.0]]), T([[1, 1, 0]]))
    assert w.tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)


def test_sequence_logps_sums_response_tokens_only():
    assert sequence_logps(T([[-1.0, -2.0, -9.0]]), T([[1, 1, 0]])).tolist() == [-3.0]


def test_bradley_terry():
    # r_w - r_l = 1: -log sigma(1) = log(1 + e^-1) = 0.313262
    assert bradley_terry_loss(T([2.0]), T([1.0])).item() == pytest.approx(0.3132617, rel=1e-6)
    # equal rewards: log 2, whatever their value
    assert bradley_terry_loss(T([5.0, -3.0]), T([5.0, -3.0])).item() == pytest.approx(math.log(2))
    # a margin of 1 turns a gap of 1 into a tie
    assert bradley_terry_loss(T([2.0]), T([1.0]), margin=1.0).item() == pytest.approx(math.log(2))


def test_dpo_sigmoid_hand_computed():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; beta 0.5: -log sigma(1) = 0.313262
    loss, rc, rr = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.3132617, rel=1e-6)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_dpo_equal_logps_is_log2_and_cdpo_ipo():
    loss, rc, rr = dpo_loss(T([-4.0]), T([-4.0]), T([-4.0]), T([-4.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and rc.item() == 0 and rr.item() == 0
    # conservative DPO, eps 0.1, beta*h = 1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    loss, _, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.4132617, rel=1e-6)
    # IPO: (h - 1/(2 beta))^2 = (2 - 1)^2 = 1 with beta 0.5; with equal log-probs (0 - 5)^2 = 25 at beta 0.1
    assert dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, loss_type="ipo")[0].item() == pytest.approx(25.0)
    with pytest.raises(ValueError):
        dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), loss_type="hinge?")


def test_ipo_norm_is_ipo_on_per_token_mean_logps_as_trl():
    # chosen: 3 tokens, policy -6 -> -2 per token, reference -9 -> -3; rejected: 2 tokens, policy -8 -> -4,
    # reference -6 -> -3. Per token h = (-2 + 3) - (-4 + 3) = 2; beta 0.5: (2 - 1/(2 * 0.5))^2 = 1
    args = (T([-6.0]), T([-8.0]), T([-9.0]), T([-6.0]))
    loss, rc, rr = dpo_loss(*args, beta=0.5, loss_type="ipo_norm", chosen_tokens=T([3.0]), rejected_tokens=T([2.0]))
    assert loss.item() == pytest.approx(1.0) and rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    # tinyml's ipo on the sums: h = (-6 + 9) - (-8 + 6) = 5, (5 - 1)^2 = 16
    assert dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(16.0)
    # gradient on the chosen sum: 2 (h - 1) / |y_w| = 2 / 3, on the rejected one -2 (h - 1) / |y_l| = -1
    pc, pr = T([-6.0], requires_grad=True), T([-8.0], requires_grad=True)
    dpo_loss(pc, pr, T([-9.0]), T([-6.0]), beta=0.5, loss_type="ipo_norm", chosen_tokens=T([3.0]),
             rejected_tokens=T([2.0]))[0].sum().backward()
    assert pc.grad.item() == pytest.approx(2 / 3) and pr.grad.item() == pytest.approx(-1.0)


def test_rpo_adds_the_chosen_per_token_nll():
    # DPO part as above (0.313262); chosen log-prob -1.0 over 2 tokens: NLL 0.5, weighted by alpha 2 -> +1.0
    loss, rc, _ = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5, rpo_alpha=2.0, chosen_tokens=T([2.0]))
    assert loss.item() == pytest.approx(1.3132617, rel=1e-6) and rc.item() == pytest.approx(0.5)
    # gradient on the chosen log-prob: DPO's -0.5 at h = 0 (beta 1) plus the NLL's -alpha / |y_w| = -1 / 4
    pc, pr = T([-1.0], requires_grad=True), T([-1.0], requires_grad=True)
    dpo_loss(pc, pr, T([-1.0]), T([-1.0]), beta=1.0, rpo_alpha=1.0, chosen_tokens=T([4.0]))[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.75) and pr.grad.item() == pytest.approx(0.5)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc, pr = T([-1.0], requires_grad=True), T([-1.0], requires_grad=True)
    dpo_loss(pc, pr, T([-1.0]), T([-1.0]), beta=1.0)[0].sum().backward()
    # d/dh -log sigma(h) at h = 0 is -0.5
    assert pc.grad.item() == pytest.approx(-0.5) and pr.grad.item() == pytest.approx(0.5)


def test_token_rewards_kl_everywhere_score_on_last_token():
    lp, ref = T([[0.0, -1.0, -1.0, 0.0]]), T([[0.0, -2.0, -1.5, 0.0]])
    mask = T([[0, 1, 1, 0]])  # prompt, two response tokens, padding
    r = token_rewards(T([1.0]), lp, ref, mask, kl_ctl=0.1)
    assert r.tolist()[0] == pytest.approx([0.0, -0.1, 0.95, 0.0])
    # a single-token response gets the score and its own KL term
    r1 = token_rewards(T([2.0]), T([[-1.0, 0.0]]), T([[-1.0, 0.0]]), T([[1, 0]]), kl_ctl=0.1)
    assert r1.tolist()[0] == pytest.approx([2.0, 0.0])


def test_gae_hand_computed():
    # response of 2 tokens then padding; gamma 1, lam 0.5
    rewards, values, mask = T([[0.0, 1.0, 0.0]]), T([[0.5, 0.25, 9.0]]), T([[1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=1: delta = 1 + 0 - 0.25 = 0.75, A = 0.75; t=0: delta = 0 + 0.25 - 0.5 = -0.25, A = -0.25 + 0.5*0.75 = 0.125
    assert adv.tolist()[0] == pytest.approx([0.125, 0.75, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.625, 1.0, 0.0])
    # single token: A = r - V
    adv1, _ = gae(T([[3.0, 0.0]]), T([[1.0, 7.0]]), T([[1, 0]]), gamma=0.9, lam=0.9)
    assert adv1.tolist()[0] == pytest.approx([2.0, 0.0])
    # a prompt token before the response gets nothing
    adv2, _ = gae(T([[5.0, 1.0]]), T([[0.0, 0.0]]), T([[0, 1]]))
    assert adv2.tolist()[0] == pytest.approx([0.0, 1.0])


def test_ppo_policy_loss_clips():
    # ratio e^0.5 = 1.6487 with A = 1: min(1.6487, 1.2) -> loss -1.2, clipped; ratio 1 with A = -1: loss 1
    lp, old = T([[0.5, 0.0, 0.0]]), T([[0.0, 0.0, 0.0]])
    loss, frac = ppo_policy_loss(lp, old, T([[1.0, -1.0, 5.0]]), T([[1, 1, 0]]), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 2)
    assert frac.item() == pytest.approx(0.5)
    # equal log-probs: the loss is -mean(A), nothing clipped
    loss, frac = ppo_policy_loss(old, old, T([[1.0, 3.0, 0.0]]), T([[1, 1, 1]]))
    assert loss.item() == pytest.approx(-4 / 3) and frac.item() == 0


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    # V = 1, old 0, R = 1: unclipped 0, clipped (0.2 - 1)^2 = 0.64 -> 0.5 * 0.64
    assert ppo_value_loss(T([[1.0]]), T([[0.0]]), T([[1.0]]), T([[1]]), clip=0.2).item() == pytest.approx(0.32)
    # V = 0.1 within the clip range: 0.5 * 0.81
    assert ppo_value_loss(T([[0.1, 5.0]]), T([[0.0, 0.0]]), T([[1.0, 0.0]]), T([[1, 0]])).item() == pytest.approx(0.405)


def test_kl_entropy_and_adaptive_controller():
    assert approx_kl(T([[-1.0, -1.0]]), T([[-2.0, -9.0]]), T([[1, 0]])).item() == pytest.approx(1.0)
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    c = AdaptiveKLController(0.1, target=1.0, horizon=100)
    c.update(kl=3.0, n_steps=10)  # error capped at +0.2: 0.1 * (1 + 0.2 * 0.1)
    assert c.value == pytest.approx(0.102)
    c.update(kl=0.0, n_steps=10)
    assert c.value == pytest.approx(0.102 * 0.98)


# ------------------------------------------------------------------ mDPO, SimPO, ORPO, KTO, GRPO, RLOO by hand
def test_mdpo_hand_computed():
    from tinyml_cli.core.losses import mdpo_loss
    # pi - ref: chosen 1, rejected -1, chosen with the corrupted image -2; beta 0.5
    # DPO -log s(0.5 * 2) = 0.3132617; conditional -log s(0.5 * 3) = 0.2014133; anchor -log s(0.5) = 0.4740770
    loss, rc, rr, rx = mdpo_loss(T([-1.0]), T([-3.0]), T([-4.0]), T([-2.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.3132617 + 0.2014133 + 0.4740770, rel=1e-6)
    assert (rc.item(), rr.item(), rx.item()) == pytest.approx((0.5, -0.5, -1.0))
    # an anchor margin of 0.5 turns the anchor term into -log s(0) = log 2
    loss, *_ = mdpo_loss(T([-1.0]), T([-3.0]), T([-4.0]), T([-2.0]), T([-2.0]), T([-2.0]), beta=0.5, anchor=0.5)
    assert loss.item() == pytest.approx(0.3132617 + 0.2014133 + math.log(2), rel=1e-6)
    # at the reference every term is log 2; the gradient raises the chosen answer and lowers both rejected sides
    pc, pr, px = (T([-2.0], requires_grad=True) for _ in range(3))
    loss, *_ = mdpo_loss(pc, pr, px, T([-2.0]), T([-2.0]), T([-2.0]), beta=1.0)
    loss.sum().backward()
    assert loss.item() == pytest.approx(3 * math.log(2))
    assert (pc.grad.item(), pr.grad.item(), px.grad.item()) == pytest.approx((-1.5, 0.5, 0.5))


def test_simpo_orpo_hand_computed():
    from tinyml_cli.core.losses import mean_logps, orpo_loss, simpo_loss
    assert mean_logps(T([[-1.0, -3.0, -7.0]]), T([[1, 1, 0]])).item() == -2.0
    # SimPO: beta (avg_w - avg_l) - gamma = 2 * 1 - 0.5 = 1.5: -log s(1.5) = 0.2014133
    assert simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=0.5)[0].item() == pytest.approx(0.2014133, rel=1e-6)
    # ORPO: P_w = 1/2 (odds 1), P_l = 1/4 (odds 1/3): log s(log 3) = log 3/4; NLL log 2
    loss, rc, _ = orpo_loss(T([math.log(0.5)]), T([math.log(0.25)]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.75), rel=1e-6)
    assert rc.item() == pytest.approx(0.1 * math.log(0.5))


def test_kto_hand_computed():
    from tinyml_cli.core.losses import kto_loss
    # r = -1 - -2 = 1; reference point z0 = mean(-3 - -3.5) = 0.5; beta 1
    loss, rewards, kl = kto_loss(T([-1.0, -1.0]), T([-2.0, -2.0]), torch.tensor([True, False]), T([-3.0]), T([-3.5]),
                                 beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    s = 1 / (1 + math.exp(-0.5))
    assert kl.item() == pytest.approx(0.5) and rewards.tolist() == [1.0, 1.0]
    assert loss.tolist() == pytest.approx([1 - s, 2 * (1 - (1 - s))], rel=1e-6)  # desirable 1-s(0.5), 2 (1-s(-0.5))
    # a negative KL estimate is clamped to 0
    assert kto_loss(T([-1.0]), T([-1.0]), torch.tensor([True]), T([-5.0]), T([-1.0]))[2].item() == 0.0


def test_grpo_rloo_hand_computed():
    from tinyml_cli.core.losses import group_advantages, grpo_loss, k3_kl, leave_one_out_advantages, rloo_loss
    # groups of 2: (1, 0) and (0, 1): mean 0.5, unbiased std 0.7071: advantages +-0.5 / (0.7071 + 1e-4)
    adv = group_advantages(T([1.0, 0.0, 0.0, 1.0]), 2)
    assert adv.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4) * s for s in (1, -1, -1, 1)], rel=1e-6)
    assert group_advantages(T([1.0, 0.0, 3.0, 3.0]), 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0]
    # leave-one-out, G = 3: baselines (0 + 0) / 2, (1 + 0) / 2, (1 + 0) / 2
    assert leave_one_out_advantages(T([1.0, 0.0, 0.0]), 3).tolist() == pytest.approx([1.0, -0.5, -0.5])
    # k3 at log ratio d = ref - logp = 1: e - 1 - 1 = 0.7182818; 0 where they agree
    assert k3_kl(T([0.0, -1.0]), T([1.0, -1.0])).tolist() == pytest.approx([math.e - 2, 0.0])
    # on-policy, advantage 1, one completion of 2 tokens out of 4 columns: per-token loss -1
    lp, mask = T([[-1.0, -2.0, 0.0, 0.0]], requires_grad=True), T([[1, 1, 0, 0]])
    for kind, want in (("grpo", -1.0), ("dapo", -1.0), ("dr_grpo", -2.0 / 4)):
        loss, stats = grpo_loss(lp, lp.detach(), T([1.0]), mask, loss_type=kind, max_completion_length=4)
        assert loss.item() == pytest.approx(want) and stats["clip_frac"].item() == 0.0
    # sequence mean vs token mean: completions of 1 and 3 tokens, advantages +1 and -1
    lp2, mask2 = torch.zeros(2, 3), T([[1, 0, 0], [1, 1, 1]])
    assert grpo_loss(lp2, lp2, T([1.0, -1.0]), mask2, loss_type="grpo")[0].item() == pytest.approx(0.0)
    assert grpo_loss(lp2, lp2, T([1.0, -1.0]), mask2, loss_type="dapo")[0].item() == pytest.approx((-1 + 3) / 4)
    # a ratio of 2 with a positive advantage is clipped at 1.2: loss -1.2, gradient 0
    lp3 = T([[math.log(2.0)]], requires_grad=True)
    loss, stats = grpo_loss(lp3, T([[0.0]]), T([1.0]), T([[1]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and lp3.grad.item() == 0.0 and stats["clip_frac"].item() == 1.0
    # RLOO: sequence ratio e^(log 2) = 2 clipped to 1.2 for A > 0, unclipped (min) for A < 0: -(1.2 * 1 + 2 * -1) / 2
    loss, frac = rloo_loss(T([math.log(2.0), math.log(2.0)]), T([0.0, 0.0]), T([1.0, -1.0]))
    assert loss.item() == pytest.approx(-(1.2 - 2.0) / 2) and frac.item() == 0.5

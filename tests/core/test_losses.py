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

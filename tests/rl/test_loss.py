"""The GRPO loss pieces TRL does not have (or has differently), against hand-written formulas."""

import math

import pytest
import torch

from qwen35.rl.loss import LossConfig, group_advantages, grpo_loss, kl_penalty, token_weights


def test_group_advantages_normalise_within_each_group_with_the_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4, eps=1e-6)
    mean, std = 0.25, math.sqrt(((0.75 ** 2) + 3 * 0.25 ** 2) / 3)  # n - 1 in the std
    expected = [(r - mean) / (std + 1e-6) for r in (1.0, 0.0, 0.0, 0.0)] + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(expected))
    dr_grpo = group_advantages(rewards, group_size=4, scale="none")
    torch.testing.assert_close(dr_grpo, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, group_size=3)


def test_asymmetric_and_dual_clip_by_hand():
    # ratios e^0.5 (above 1.28), e^-0.5 (below 0.8), e^0.1 (inside): one token each per advantage sign
    log_ratio = torch.tensor([0.5, -0.5, 0.1, 0.5, -0.5, 0.1, 2.0])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -2.0])
    weights = torch.ones(7)
    r = log_ratio.exp()
    expected = [
        -1.28,  # A > 0, ratio above: clipped to 1 + eps_high
        -r[1].item(),  # A > 0, ratio below: the unclipped term is the larger loss
        -r[2].item(),
        r[3].item(),  # A < 0, ratio above: unclipped
        0.8,  # A < 0, ratio below: clipped to 1 - eps
        r[5].item(),
        2.0 * r[6].item(),
    ]
    out = grpo_loss(log_ratio, torch.zeros(7), adv, weights, LossConfig())
    torch.testing.assert_close(out.loss, torch.tensor(expected).sum())
    assert out.clip_fraction.item() == 2.0  # tokens 0 and 4
    dual = grpo_loss(log_ratio, torch.zeros(7), adv, weights, LossConfig(dual_clip=3.0))
    expected[6] = 3.0 * 2.0  # -c·A caps the A < 0 token whose ratio e^2 = 7.4 exceeds c
    torch.testing.assert_close(dual.loss, torch.tensor(expected).sum())


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.5, -1.0, -0.1])
    lr = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), lr)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), lr ** 2 / 2)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.exp(-lr) - 1 + lr)
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), torch.exp(-lr) - 1 + lr)
    far = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "low_var_kl")
    assert far.item() == 10.0  # clamped, where k3 would be e^30


def test_kl_and_entropy_terms_enter_with_their_coefficients():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref, entropy, weights = torch.tensor([-1.2, -1.0]), torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    base = grpo_loss(logp, logp.detach(), torch.zeros(2), weights, LossConfig()).loss
    cfg = LossConfig(kl_coef=0.1, kl_type="k2", entropy_coef=0.01)
    out = grpo_loss(logp, logp.detach(), torch.zeros(2), weights, cfg, ref_logp_N=ref, entropy_N=entropy)
    expected = base + 0.1 * (0.5 * 0.2 ** 2 / 2 + 0.5 * 1.0 / 2) - 0.01 * 2.5
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp.detach(), torch.zeros(2), weights, cfg)


def test_token_weights_split_over_micro_batches_add_up_to_the_step():
    lengths = [3, 1, 4, 2]
    whole = token_weights(lengths, "token_mean", step_tokens=10, step_sequences=4)
    parts = torch.cat([token_weights(lengths[:2], "token_mean", 10, 4), token_weights(lengths[2:], "token_mean", 10, 4)])
    torch.testing.assert_close(whole, parts)
    assert whole.sum().item() == pytest.approx(1.0)
    seq = token_weights(lengths, "seq_mean_token_mean", step_tokens=10, step_sequences=4)
    per_sequence = [chunk.sum().item() for chunk in seq.split(lengths)]
    assert per_sequence == pytest.approx([0.25] * 4)  # each completion counts once, whatever its length


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="kl_type"):
        LossConfig(kl_type="k4")
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="seq_mean")
    with pytest.raises(ValueError, match="dual_clip"):
        LossConfig(dual_clip=0.5)

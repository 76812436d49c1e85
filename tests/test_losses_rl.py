"""RLHF estimators in llama2_hf.losses against hand-computed values."""

import math

import pytest
import torch

from llama2_hf.losses import (
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    last_token_positions,
    logit,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    token_level_rewards,
    whiten,
)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(masked_mean(x, mask), 2.5)
    close(masked_var(x, mask), 1.25)  # population variance of 1, 2, 3, 4
    close(masked_var(torch.tensor([7.0])), 0.0)  # one value: 0, not NaN
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_whiten_hand_values():
    # mean 2.5, population variance 1.25 -> (x - 2.5) / sqrt(1.25)
    expected = [-1.341641, -0.447214, 0.447214, 1.341641]
    close(whiten(torch.tensor([1.0, 2.0, 3.0, 4.0])), expected)
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(whiten(x, mask), [[expected[0], expected[1], 0.0], [expected[2], expected[3], 0.0]])
    # shift_mean=False rescales but keeps the mean
    close(whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]), shift_mean=False), [e + 2.5 for e in expected])


def test_logit_inverts_sigmoid():
    close(logit(torch.tensor([0.5, 0.15])), [0.0, math.log(0.15 / 0.85)])  # -1.734601
    r = torch.tensor([-3.0, 0.2, 2.0])
    close(logit(torch.sigmoid(r)), r, tol=1e-4)
    assert torch.isfinite(logit(torch.tensor([0.0, 1.0]))).all()  # clamped, not +-inf


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])  # d = [0.5, -1.0]
    close(kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    close(kl_penalty(logp, ref, "k2"), [0.125, 0.5])
    close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2.0])  # 0.106531, 0.718282
    close(kl_penalty(logp, ref, "abs"), [0.5, 1.0])
    for est in ("k1", "k2", "k3", "abs"):
        close(kl_penalty(logp, logp, est), [0.0, 0.0])  # identical policies: no penalty
    with pytest.raises(ValueError, match="kl estimator"):
        kl_penalty(logp, ref, "k4")


def test_token_level_rewards_put_score_on_last_token():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.5, -1.0, 0.3], [0.2, 0.4, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(token_level_rewards(scores, kl, mask, beta=0.1), [[-0.05, 0.1, 1.97], [-0.02, -1.04, 0.0]])
    close(last_token_positions(mask), [2, 1])


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.8, 0.9]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_gae_hand_values_with_padding():
    # gamma 0.9, lambda 0.8: A2 = 2 - 0.3 = 1.7; A1 = (0.27 - 0.4) + 0.72 * 1.7 = 1.094;
    # A0 = (1 + 0.36 - 0.5) + 0.72 * 1.094 = 1.64768. The padded 4th step (value 7) must not leak back.
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[1.64768, 1.094, 1.7, 0.0]])
    close(ret, [[2.14768, 1.494, 2.0, 0.0]])


def test_ppo_policy_loss_ratio_one_and_clipping():
    old = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo_policy_loss(old.clone(), old, adv, mask, clip_range=0.2)
    close(loss, 0.0)  # -mean(A) with ratio 1
    close(stats["ratio"], 1.0)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    # ratios 1.5 (A=+1) and 0.5 (A=-1): both clipped: (-1.2 + 0.8) / 2 = -0.2
    new = old + torch.log(torch.tensor([[1.5, 0.5]]))
    loss, stats = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    close(loss, -0.2)
    close(stats["clipfrac"], 1.0)
    close(stats["approx_kl"], ((0.5 - math.log(1.5)) + (-0.5 + math.log(2.0))) / 2)  # 0.143841
    # inside the trust region nothing is clipped and the gradient is -A * ratio
    new = (old + math.log(1.1)).requires_grad_()
    loss, stats = ppo_policy_loss(new, old, torch.tensor([[1.0, 1.0]]), mask, clip_range=0.2)
    loss.backward()
    close(stats["clipfrac"], 0.0)
    close(new.grad, [[-0.55, -0.55]])


def test_clipped_value_loss_hand_values():
    loss, frac = clipped_value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]),
                                    torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), clip_range_value=0.2)
    close(loss, 0.5)  # unclipped errors (1, 1) exceed clipped ones (0.49, 0.49)
    close(frac, 0.0)
    loss, frac = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                                    torch.ones(1, 1), clip_range_value=0.2)
    close(loss, 1.62)  # V_clip = 0.2: 0.5 * 1.8^2
    close(frac, 1.0)
    loss, _ = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                                 torch.ones(1, 1), clip_range_value=None)
    close(loss, 0.5)


def test_entropy_and_logprobs_from_logits():
    close(entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 3, 6], [1, 1, 2]])
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    close(logprobs_from_logits(logits, labels), expected)

"""Reward-modelling losses (paper Eq. 1-2, Table 27) against hand-computed values."""

import math

import pytest
import torch

from llama2_hf.losses import (
    MARGIN_PRESETS,
    RATINGS,
    canonical_rating,
    margin_ranking_loss,
    margins_for,
    resolve_margins,
    safety_auxiliary_loss,
)


def test_equal_rewards_no_margin_is_ln2():
    loss = margin_ranking_loss(torch.zeros(4), torch.zeros(4), margins_for(["negligibly_better"] * 4, "large"))
    assert loss.item() == pytest.approx(0.693147, abs=1e-6)


def test_equal_rewards_margin_one():
    # -log sigmoid(-1) = log(1 + e) = 1.313262
    loss = margin_ranking_loss(torch.zeros(2), torch.zeros(2), margins_for(["significantly_better"] * 2, "small"))
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)


def test_margin_loss_hand_values_mixed_batch():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([0.5, 1.0, 1.0])
    margins = margins_for(["better", "unsure", "slightly_better"], "large")  # 2, 0, 1
    # diffs - m: 1.5 - 2 = -0.5, -1 - 0 = -1, 0 - 1 = -1
    expected = (math.log1p(math.exp(0.5)) + 2 * math.log1p(math.exp(1.0))) / 3
    assert margin_ranking_loss(chosen, rejected, margins).item() == pytest.approx(expected, abs=1e-6)


def test_margin_loss_gradient_at_equal_rewards():
    chosen = torch.zeros(4, requires_grad=True)
    margin_ranking_loss(chosen, torch.zeros(4)).backward()
    # d/dr_c mean(-log sigmoid(r_c - r_r)) = -sigmoid(0) / N = -0.125
    assert torch.allclose(chosen.grad, torch.full((4,), -0.125))


def test_table27_presets():
    assert margins_for(RATINGS, "small").tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert margins_for(RATINGS, "large").tolist() == [3.0, 2.0, 1.0, 0.0]
    assert margins_for(RATINGS, "none").tolist() == [0.0] * 4
    assert set(MARGIN_PRESETS) == {"none", "small", "large"}


def test_unsure_and_unrated():
    assert canonical_rating("unsure") == "negligibly_better"
    assert canonical_rating(None) is None
    assert margins_for(["unsure", None], "large").tolist() == [0.0, 0.0]


def test_custom_margin_map():
    custom = {"significantly_better": 5, "better": 4, "slightly_better": 2.5, "unsure": 0.5}
    assert margins_for(["better", "negligibly_better"], custom).tolist() == [4.0, 0.5]
    assert resolve_margins(custom)["negligibly_better"] == 0.5


@pytest.mark.parametrize("bad, match", [
    ("medium", "unknown margin preset 'medium'"),
    ({"significantly_better": 1.0, "better": 0.5}, "lacks ratings"),
    ({"significantly_better": 1, "better": 1, "slightly_better": 1, "negligibly_better": float("nan")}, "finite"),
])
def test_bad_margin_specs(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_margins(bad)


def test_unknown_rating():
    with pytest.raises(ValueError, match="unknown rating 'much_better'"):
        margins_for(["much_better"], "small")


def test_safety_auxiliary_loss_hand_values():
    assert safety_auxiliary_loss(torch.zeros(3), torch.tensor([1, 0, 1])).item() == pytest.approx(math.log(2))
    rewards = torch.tensor([2.0, -1.0, 7.0])
    labels = torch.tensor([1, 0, -1])  # safe, unsafe, unknown (ignored)
    # (-log sigmoid(2) - log sigmoid(1)) / 2
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert safety_auxiliary_loss(rewards, labels).item() == pytest.approx(expected, abs=1e-6)


def test_safety_auxiliary_loss_without_labels_is_a_connected_zero():
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = safety_auxiliary_loss(rewards, torch.tensor([-1, -1]))
    loss.backward()
    assert loss.item() == 0.0 and rewards.grad.tolist() == [0.0, 0.0]

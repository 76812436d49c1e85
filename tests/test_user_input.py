"""What a user brings is checked or quiet: reward columns that would gate nothing, data files that mix the schemas
the README allows, and the console noise a command prints before its answer."""

from __future__ import annotations

import logging

import pytest
import torch

from llama2_hf.rewards import SafetyGatedReward

# ------------------------------------------------------------------------------- the safety tag of the gated reward

# Fixed logits per response: sigmoid(1.0) = 0.73 and sigmoid(3.0) = 0.95 clear the 0.15 gate, so only a tag sends a
# prompt to the safety RM.
SAFETY_LOGITS = {"tagged": 1.0, "safe": 3.0}
HELPFULNESS_LOGITS = {"tagged": 10.0, "safe": 50.0}


def table_reward() -> SafetyGatedReward:
    def scorer(table):
        return lambda prompts, responses: [table[r] for r in responses]

    return SafetyGatedReward(scorer(HELPFULNESS_LOGITS), scorer(SAFETY_LOGITS), whiten="none")


def test_the_safety_tag_gates_the_tagged_prompt():
    out = table_reward().score(["p", "p"], ["tagged", "safe"], is_safety_prompt=[True, False])
    torch.testing.assert_close(out.raw, torch.tensor([1.0, 50.0]))  # R_s for the tagged prompt, R_h for the other


@pytest.mark.parametrize("column", ["is_safety", "is_safty_prompt", "safety", "is_adversarial", "unsafe"])
def test_a_column_that_looks_like_a_safety_tag_is_an_error(column):
    with pytest.raises(ValueError, match=rf"unknown column '{column}': the safety tag of a prompt is "
                                         "'is_safety_prompt'"):
        table_reward().score(["p", "p"], ["tagged", "safe"], **{column: [True, False]})
    # the TRL reward-function form refuses it too
    with pytest.raises(ValueError, match=f"unknown column '{column}'"):
        table_reward()(["p"], ["tagged"], **{column: [True]})


def test_a_call_without_a_safety_tag_warns_once(caplog):
    reward = table_reward()
    with caplog.at_level(logging.WARNING, logger="llama2_hf.rewards"):
        first = reward.score(["p", "p"], ["tagged", "safe"])
        reward.score(["p"], ["safe"], prompt_id=["a"])  # other dataset columns pass through
    warnings = [r.getMessage() for r in caplog.records if "called without 'is_safety_prompt'" in r.getMessage()]
    assert len(warnings) == 1
    torch.testing.assert_close(first.raw, torch.tensor([10.0, 50.0]))  # untagged: both clear the gate -> R_h

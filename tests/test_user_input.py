"""What a user brings is checked or quiet: reward columns that would gate nothing, data files that mix the schemas
the README allows, and the console noise a command prints before its answer."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import llama2_hf, one_step, record, write_jsonl

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


# ------------------------------------------------------------------------------------------ through the command line

def test_sft_trains_on_a_file_mixing_both_schemas(stage_inputs, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                      {"role": "assistant", "content": "1 plus 2 equals 3."}]},
        {"prompt": "What is 2 plus 2?", "answer": "2 plus 2 equals 4."},
        {"prompt": [{"role": "user", "content": "What is 3 plus 2?"}], "answer": "3 plus 2 equals 5."}])
    proc = llama2_hf("sft", "--train_file", data, *one_step(stage_inputs, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert record(tmp_path / "out")["metrics"]["data"]["train"] == {"total": 3, "kept": 3, "truncated": 0,
                                                                     "dropped": {}}


def test_train_rm_trains_on_text_and_message_prompts(stage_inputs, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5", "rating": "better"},
        {"prompt": [{"role": "user", "content": "What is 3 plus 2?"}], "chosen": "5", "rejected": "6",
         "rating": "significantly_better"}])
    proc = llama2_hf("train-rm", "--train_file", data, *one_step(stage_inputs, tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert record(tmp_path / "out")["metrics"]["loaded"]["train"] == {"total": 2, "kept": 2, "dropped": {}}


def test_help_prints_nothing_on_stderr():
    proc = llama2_hf("sft", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: llama2-hf sft")
    assert proc.stderr == ""


@pytest.mark.parametrize("args, field", [(["--use_cpu", "true", "--bf16", "false", "--max_lenght", "5"], "max_lenght"),
                                         (["--config", "no_such_recipe.yaml"], "no_such_recipe.yaml")])
def test_an_argument_error_is_the_first_and_only_line(tmp_path, args, field):
    proc = llama2_hf("sft", *args, cwd=tmp_path)
    assert proc.returncode == 2
    first, hint = proc.stderr.splitlines()  # exactly the error and the --debug hint
    assert first.startswith("llama2-hf sft: error: ") and field in first
    assert hint == "(run with --debug for the traceback)"
    assert proc.stdout == ""


def test_a_one_step_run_prints_only_our_lines(stage_inputs, tmp_path):
    """No library notice, deprecation warning or library progress bar: every stderr line is one of our log lines
    (`HH:MM:SS LEVEL llama2_hf...`), and stdout holds the Trainer's metrics line only."""
    for stage, data in (("sft", stage_inputs["sft"]), ("train-rm", stage_inputs["prefs"])):
        proc = llama2_hf(stage, "--train_file", data, *one_step(stage_inputs, tmp_path / stage))
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines(), "our INFO lines (rows kept) are expected"
        for line in proc.stderr.splitlines():
            assert re.fullmatch(r"\d\d:\d\d:\d\d INFO llama2_hf\.[\w.]+: .*", line), line
        assert [line[:16] for line in proc.stdout.splitlines()] == ["{'train_runtime'"]


def test_push_dry_run_lists_the_files_and_writes_the_card(stage_inputs, tmp_path):
    proc = llama2_hf("push", "--model_name_or_path", stage_inputs["policy"], "--repo_id", "me/tiny", "--dry_run",
                     "true", "--stage", "sft", "--output_dir", tmp_path / "card")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].endswith("INFO llama2_hf.stages.push: would upload to me/tiny:")
    files = sorted(p.name for p in stage_inputs["policy"].iterdir()) + ["README.md"]
    assert sorted(line.split()[0] for line in lines[1:-1]) == sorted(files)
    card = (tmp_path / "card" / "README.md").read_text()
    assert lines[-1].endswith(f"model card: {card.count(chr(10)) + 1} lines, written to {tmp_path / 'card' / 'README.md'}")

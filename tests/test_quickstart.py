"""The quickstart end to end at a reduced scale (the full-size run is `llama2-hf quickstart`), and its resume."""

from __future__ import annotations

import json

from llama2_hf.quickstart import QuickstartConfig, run_quickstart
from llama2_hf.quickstart.world import World, is_correct, is_violation

STAGES = ["tokenizer", "pretrain", "sft", "rm_helpfulness", "rm_safety", "eval_sft", "rejection_sampling",
          "eval_rejection_sampling", "ppo", "eval_ppo", "gatt"]


def test_world_is_deterministic_and_checkable():
    a, b = World(seed=3), World(seed=3)
    assert a.sft_dialogs(20) == b.sft_dialogs(20)
    assert a.preferences("safety", 30) == b.preferences("safety", 30)
    assert is_correct("What is 3 plus 4?", "3 plus 4 is 7.") and not is_correct("What is 3 plus 4?", "3 plus 4 is 8.")
    assert is_violation("How do I rob a bank?", "Sure. To rob a bank, first get ready and then just do it.")
    assert not is_violation("How do I rob a bank?", "I cannot help with that because it could hurt people.")
    assert not is_violation("What is 1 plus 1?", "Sure.")


def test_quickstart_reduced_runs_every_stage_and_resumes(tmp_path):
    config = QuickstartConfig(output_dir=str(tmp_path / "qs"), scale=0.04, hidden_size=64, num_layers=2,
                              rs_samples=2, ppo_batch=16, gatt_dialogs=40)
    results = run_quickstart(config)
    assert list(results) == STAGES
    for stage in STAGES:
        record = json.loads((tmp_path / "qs" / stage / "run.json").read_text())
        assert record["stage"] == stage and "metrics" in record
    report = (tmp_path / "qs" / "report.md").read_text()
    for section in ("Reward models", "Policy after each RLHF stage", "Rejection sampling", "PPO", "Ghost Attention"):
        assert section in report
    for png in ("losses.png", "rm_accuracy.png", "policies.png", "ppo.png", "gatt.png"):
        assert (tmp_path / "qs" / png).stat().st_size > 1000
    # Every stage resumes from its outputs: a second run trains nothing and reads back the same metrics.
    again = run_quickstart(config)
    assert again == results

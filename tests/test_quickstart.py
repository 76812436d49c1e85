"""The quickstart end to end at a reduced scale (the full-size run is `llama2-hf quickstart`), its resume, and its
refusal of a folder made with another configuration."""

from __future__ import annotations

import json

import pytest

from llama2_hf.cli import main
from llama2_hf.quickstart import Pipeline, QuickstartConfig, run_quickstart
from llama2_hf.quickstart.world import World, is_correct, is_violation
from llama2_hf.runner import RunRecord, UsageError

STAGES = ["tokenizer", "pretrain", "sft", "rm_helpfulness", "rm_safety", "eval_sft", "rejection_sampling",
          "eval_rejection_sampling", "ppo", "eval_ppo", "gatt"]
# folder -> the command (or quickstart step) whose run.json it holds
RECORDS = {"tokenizer": "quickstart-tokenizer", "pretrain": "pretrain", "sft": "sft", "rm_helpfulness": "train-rm",
           "rm_safety": "train-rm", "eval_rm_helpfulness": "quickstart-eval_rm_helpfulness",
           "eval_sft": "quickstart-eval_sft", "rejection_sampling": "rejection-sample", "ppo": "ppo",
           "gatt_data": "gatt", "gatt": "sft", "eval_gatt": "quickstart-eval_gatt"}


def test_world_is_deterministic_and_checkable():
    a, b = World(seed=3), World(seed=3)
    assert a.sft_dialogs(20) == b.sft_dialogs(20)
    assert a.preferences("safety", 30) == b.preferences("safety", 30)
    assert is_correct("What is 3 plus 4?", "3 plus 4 is 7.") and not is_correct("What is 3 plus 4?", "3 plus 4 is 8.")
    assert is_violation("How do I rob a bank?", "Sure. To rob a bank, first get ready and then just do it.")
    assert not is_violation("How do I rob a bank?", "I cannot help with that because it could hurt people.")
    assert not is_violation("What is 1 plus 1?", "Sure.")


def test_quickstart_refuses_a_folder_of_another_configuration(tmp_path, capsys):
    Pipeline(QuickstartConfig(output_dir=str(tmp_path), scale=0.5, seed=0, stages=["tokenizer"]))
    # the same configuration (another thread count or stage subset) is the same run
    Pipeline(QuickstartConfig(output_dir=str(tmp_path), scale=0.5, seed=0, threads=2))
    with pytest.raises(UsageError, match=r"another configuration \(scale: 0.5 -> 1.0\)"):
        Pipeline(QuickstartConfig(output_dir=str(tmp_path), scale=1.0, seed=0))
    assert main(["quickstart", "--output_dir", str(tmp_path), "--scale", "0.5", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "seed: 0 -> 7" in err and "Traceback" not in err


def test_quickstart_unknown_stage_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown quickstart stages"):
        run_quickstart(QuickstartConfig(output_dir=str(tmp_path), stages=["tokeniser"]))


@pytest.mark.slow
def test_quickstart_reduced_runs_every_stage_and_resumes(tmp_path):
    config = QuickstartConfig(output_dir=str(tmp_path / "qs"), scale=0.04, hidden_size=64, num_layers=2,
                              rs_samples=2, ppo_batch=16, gatt_dialogs=40)
    results = run_quickstart(config)
    assert list(results) == STAGES
    for folder, stage in RECORDS.items():
        assert RunRecord.read(tmp_path / "qs" / folder).stage == stage, folder
    # the pipeline stages read the world's data from JSONL files and each other's folders
    sft = RunRecord.read(tmp_path / "qs" / "sft")
    assert sft.args["train_file"] == [str(tmp_path / "qs" / "data" / "sft.jsonl")] and sft.args["use_cpu"]
    assert RunRecord.read(tmp_path / "qs" / "ppo").args["model_name_or_path"] == str(tmp_path / "qs" /
                                                                                    "rejection_sampling")
    assert len(results["ppo"]["history"]) == config.n(config.ppo_iterations, 3)
    report = (tmp_path / "qs" / "report.md").read_text()
    for section in ("Reward models", "Policy after each RLHF stage", "Rejection sampling", "PPO", "Ghost Attention"):
        assert section in report
    for png in ("losses.png", "rm_accuracy.png", "policies.png", "ppo.png", "gatt.png"):
        assert (tmp_path / "qs" / png).stat().st_size > 1000
    # Every stage resumes from its outputs: a second run trains nothing and reads back the same metrics.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "qs").rglob("run.json")}
    again = run_quickstart(config)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(results))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "qs").rglob("run.json")} == stamps

"""The quickstart end to end at a reduced scale (the full-size run is `llama2-hf quickstart`), its resume, and its
refusal of a folder made with another configuration."""

from __future__ import annotations

import json

import pytest

from llama2_hf.cli import main
from llama2_hf.quickstart import Pipeline, QuickstartConfig, run_quickstart
from llama2_hf.quickstart.world import World, is_correct, is_violation, near_miss_errors, parse_prompt, stated_sum
from llama2_hf.runner import RunRecord, UsageError

STAGES = ["tokenizer", "pretrain", "sft", "rm_helpfulness", "rm_safety", "eval_sft", "rlhf", "eval_versions", "gatt"]
# folder -> the command (or quickstart step) whose run.json it holds
RECORDS = {"tokenizer": "quickstart-tokenizer", "pretrain": "pretrain", "sft": "sft", "rm_helpfulness": "train-rm",
           "rm_safety": "train-rm", "eval_rm_helpfulness": "quickstart-eval_rm_helpfulness",
           "eval_sft": "quickstart-eval_sft", "rlhf": "iterate", "rlhf/v1/annotations": "iterate-annotate",
           "rlhf/v1/rm_safety": "train-rm", "rlhf/v1/rs": "rejection-sample", "rlhf/v2/rs": "rejection-sample",
           "rlhf/v2/ppo": "ppo", "eval_versions": "quickstart-eval_versions"}


def test_world_is_deterministic_and_checkable():
    a, b = World(seed=3), World(seed=3)
    assert a.sft_dialogs(20) == b.sft_dialogs(20)
    assert a.preferences("safety", 30) == b.preferences("safety", 30)
    assert is_correct("What is 3 plus 4?", "3 plus 4 is 7.") and not is_correct("What is 3 plus 4?", "3 plus 4 is 8.")
    assert is_violation("How do I rob a bank?", "Sure. To rob a bank, first get ready and then just do it.")
    assert not is_violation("How do I rob a bank?", "I cannot help with that because it could hurt people.")
    assert not is_violation("What is 1 plus 1?", "Sure.")
    assert a.pirate_answer("What is 3 plus 4?") == "Arr! 3 plus 4 is 7."  # what GAtt's data is kept for


def test_world_distinct_prompts_cover_each_prompt_of_the_world_once():
    from collections import Counter

    from llama2_hf.quickstart.world import BENIGN_ACTS, HARMFUL_ACTS, parse_prompt

    world = World(seed=0)
    rows = world.distinct_prompts()
    texts = [r["messages"][0]["content"] for r in rows]
    kinds = Counter(parse_prompt(t)[0] for t in texts)
    assert kinds == {"arithmetic": 25, "harmful": len(HARMFUL_ACTS), "benign": len(BENIGN_ACTS)}  # operands 0..4
    assert len(set(texts)) == len(texts) and len({r["id"] for r in rows}) == len(rows)
    assert all(r["is_safety_prompt"] == (parse_prompt(r["messages"][0]["content"])[0] != "arithmetic") for r in rows)
    # every prompt the world draws is one of them, in about the proportions of prompt_mix (5:3:2)
    drawn = [r["messages"][0]["content"] for r in world.rl_prompts(2000)]
    assert set(drawn) <= set(texts)
    share = Counter(parse_prompt(t)[0] for t in drawn)
    assert abs(share["arithmetic"] / 2000 - 0.5) < 0.04 and abs(share["benign"] / 2000 - 0.2) < 0.04


def test_world_checker_grades_and_rates_like_the_world_preferences():
    from llama2_hf.quickstart.world import REFUSAL, TERSE_REFUSAL, WorldChecker, compliance, grade

    assert grade("What is 3 plus 4?", "3 plus 4 is 7.") == 10
    assert grade("What is 3 plus 4?", "3 plus 4 is 10.") == 7  # 3 away from the sum
    assert grade("What is 3 plus 4?", "Arr!") == 0
    assert (grade("How do I rob a bank?", REFUSAL), grade("How do I rob a bank?", TERSE_REFUSAL),
            grade("How do I rob a bank?", compliance("rob a bank"))) == (10, 8, 0)
    assert grade("How do I crack an egg?", REFUSAL) == 0

    def pair(prompt, a, b, safety=False):
        return {"id": "x", "prompt": [{"role": "user", "content": prompt}], "response_a": a, "response_b": b,
                "is_safety_prompt": safety, "version": 1}

    answers = WorldChecker()([
        pair("What is 3 plus 4?", "3 plus 4 is 8.", "3 plus 4 is 7."),           # off by 1: slightly
        pair("What is 3 plus 4?", "3 plus 4 is 7.", "3 plus 4 is 11."),          # off by 4: better
        pair("What is 3 plus 4?", "3 plus 4 is 7.", "The sum is 7."),            # both right: a tie
        pair("How do I rob a bank?", compliance("rob a bank"), REFUSAL, True),   # refusal: significantly
        pair("How do I rob a bank?", REFUSAL, TERSE_REFUSAL, True),              # explained refusal: slightly
    ])
    assert [(a["choice"], a["rating"]) for a in answers] == [
        ("b", "slightly_better"), ("a", "better"), ("a", "negligibly_better"), ("b", "significantly_better"),
        ("a", "slightly_better")]
    assert (answers[3]["safety_a"], answers[3]["safety_b"]) == ("unsafe", "safe")
    assert (answers[0]["safety_a"], answers[4]["safety_b"]) == ("safe", "safe")


def test_near_miss_errors_lists_the_misranked_sums():
    def graded(prompts, responses):  # the world's order (closer to the sum is better), one planted inversion
        scores = []
        for p, r in zip(prompts, responses):
            (a, b), s = parse_prompt(p)[1], stated_sum(r)
            scores.append(5.0 if (a, b, s) == (1, 2, 4) else -abs(s - a - b))
        return scores

    assert near_miss_errors(graded, max_operand=4) == [(1, 2, 4)]
    # a constant score ties every near miss with the right answer: with operands 0..1, sums 0, 1, 1, 2 have
    # 2, 3, 3 and 4 non-negative answers off by 1 or 2
    assert len(near_miss_errors(lambda p, r: [0.0] * len(p), max_operand=1)) == 12
    assert near_miss_errors(lambda p, r: [0.0] * len(p), max_operand=0) == [(0, 0, 1), (0, 0, 2)]
    with pytest.raises(ValueError, match="returned 1 values for 3 answers"):
        near_miss_errors(lambda p, r: [0.0], max_operand=0)


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
def test_quickstart_reduced_runs_every_stage_and_resumes(tmp_path, capsys):
    # Every stage but GAtt: at this scale the final policy answers the GAtt dialogues with EOS, and the GAtt stage
    # refuses to fine-tune on no rows (GAtt itself is tested in test_gatt.py and runs in the full-size quickstart).
    config = QuickstartConfig(output_dir=str(tmp_path / "qs"), scale=0.04, hidden_size=64, num_layers=2,
                              pretrain_steps=2500, sft_dialogs=6000, versions=2, rs_samples=2,
                              stages=STAGES[:-1])
    results = run_quickstart(config)
    assert list(results) == STAGES[:-1]
    for folder, stage in RECORDS.items():
        assert RunRecord.read(tmp_path / "qs" / folder).stage == stage, folder
    # the pipeline stages read the world's data from JSONL files and each other's folders
    out = tmp_path / "qs"
    sft = RunRecord.read(out / "sft")
    assert sft.args["train_file"] == [str(out / "data" / "sft.jsonl")] and sft.args["use_cpu"]
    loop = RunRecord.read(out / "rlhf")
    assert loop.args["annotator"] == "world checker" and loop.args["versions"] == 2
    ppo = RunRecord.read(out / "rlhf" / "v2" / "ppo")
    assert ppo.args["model_name_or_path"] == str(out / "rlhf" / "v2" / "rs")
    assert ppo.args["temperature"] == config.ppo_temperature == 1.3  # rollouts past the RS policy's near-greedy mode
    assert RunRecord.read(out / "rlhf" / "v2" / "rs").args["pool_dirs"] == [str(out / "rlhf" / "v1" / "rs")]
    # V1's reward models start from the ones trained on the world's preference data
    assert RunRecord.read(out / "rlhf" / "v1" / "rm_helpfulness").args["model_name_or_path"] == str(
        out / "rm_helpfulness")
    assert RunRecord.read(out / "rlhf" / "v1" / "rm_safety").args["safety_aux_loss_coef"] == 1.0
    assert len(results["rlhf"]["ppo_history"]) == config.n(config.ppo_iterations, 3)
    assert set(results["eval_versions"]) >= {"v1", "v2"}
    report = (out / "report.md").read_text()
    for section in ("Initial reward models", "RLHF versions side by side", "Fig. 11", "Table 7/8", "PPO (last version)",
                    "Targets (final version against SFT)"):
        assert section in report, section
    record = json.loads((out / "results.json").read_text())  # the report's figures for scripts
    assert record["config"]["seed"] == 0 and {t["measurement"] for t in record["targets"]} >= {"safety violations"}
    for png in ("losses.png", "rm_accuracy.png", "versions.png", "ppo.png"):
        assert (out / png).stat().st_size > 1000
    # the console: one bar per stage (the loop's versions included), no trainer dicts, the summary and the report path
    console = capsys.readouterr()
    bars = [line for line in console.err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in bars if line.endswith("...")] == [f"[{k}/9" for k in range(1, 10)]
    assert "'loss'" not in console.err + console.out
    assert "win vs SFT: checker / RM (Fig. 11)" in console.out and f"report: {out / 'report.md'}" in console.out
    assert " WARNING " in (out / "quickstart.log").read_text()  # the logs went to the file, not the console
    # Every stage resumes from its outputs: a second run trains nothing and reads back the same metrics.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    again = run_quickstart(config)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(results))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run.json")} == stamps

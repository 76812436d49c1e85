"""`llama2-hf ppo`: the stage runner (record, rerun, resume, refusals, errors) and its launches: DDP and FSDP2 on two
CPU processes under `accelerate launch`, against a one-process run with the same global batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama2_hf.cli import main as cli
from llama2_hf.runner import RunRecord, UsageError, write_json_atomic
from llama2_hf.stages import run_stage

from conftest import REPO_ROOT, accelerate_launch, write_jsonl

# Tiny PPO: 8 rollouts per iteration in one mini-batch (one optimizer step), 4 new tokens, both reward models
# unwhitened (batch whitening uses each rank's own rollouts, the only statistic that depends on the world size).
TINY_PPO = {"use_cpu": True, "batch_size": 8, "mini_batch_size": 8, "prompt_batch_size": 4,
            "max_new_tokens": 4, "learning_rate": 1e-3, "save_steps": 1, "save_total_limit": None,
            "value_model_init": "reward_model", "reward_whitening": "none", "disable_tqdm": True}
# Metrics of an iteration that a 2-process run must reproduce (the rest are timings and counts).
COMPARED = ("reward/mean", "reward/raw_mean", "objective/kl", "objective/entropy", "policy/loss", "value/loss",
            "policy/clipfrac", "policy/grad_norm", "value/grad_norm", "response/length_mean")


def ppo_args(stage_inputs, out, **overrides) -> dict:
    return {"model_name_or_path": str(stage_inputs["policy"]), "prompts_file": [str(stage_inputs["prompts"])],
            "helpfulness_reward_model": str(stage_inputs["helpfulness_rm"]),
            "safety_reward_model": str(stage_inputs["safety_rm"]), "output_dir": str(out),
            "num_iterations": 2, **TINY_PPO, **overrides}


def as_argv(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        argv.append(f"--{key}")
        argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return argv


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def interrupt(out: Path, iteration: int) -> None:
    """Make a finished run look killed while saving `checkpoint-{iteration}`: no run.json, its run_args.json back,
    that checkpoint without its trainer state (written last, so a cut save lacks it)."""
    record = RunRecord.read(out)
    (out / "run.json").unlink()
    write_json_atomic(out / "run_args.json", {"stage": "ppo", "args": {**record.args, "output_dir": str(out)}})
    (out / f"checkpoint-{iteration}" / "trainer_state.pt").unlink()


@pytest.fixture(scope="module")
def single_run(stage_inputs, tmp_path_factory):
    """The reference: one process, the same global batch, two iterations."""
    out = tmp_path_factory.mktemp("ppo") / "one"
    record = run_stage("ppo", **ppo_args(stage_inputs, out))
    return out, record, metrics_rows(out)


def test_stage_writes_policy_metrics_and_record(single_run, stage_inputs):
    out, record, rows = single_run
    assert record.stage == "ppo" and record.world_size == 1
    assert record.outputs == {"model": ".", "value_model": "value_model", "metrics": "metrics.jsonl"}
    assert [r["iteration"] for r in rows] == [1, 2]
    # pi == pi_0 only before the update (the sampling steps' log-probabilities differ from pi_0's pass by rounding)
    assert abs(rows[0]["objective/kl"]) < 1e-5 and abs(rows[1]["objective/kl"]) > 1e-3, rows
    assert rows[0]["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert {"reward/helpfulness", "reward/safety", "reward/used_safety"} <= set(rows[0])
    saved = RunRecord.read(out)
    assert saved.args["reward_whitening"] == "none" and saved.args["safety_threshold"] == 0.15
    assert saved.args["kl_coef"] == 0.01 and saved.args["adam_beta2"] == 0.95  # paper defaults, one definition
    assert saved.metrics["distributed"]["sharding"] == "none"
    assert len(saved.inputs["helpfulness_reward_model"]["sha256"]) == 64
    from llama2_hf import Llama2ForCausalLM

    policy = Llama2ForCausalLM.from_pretrained(out)  # the policy at the folder's root, float32, trained
    start = Llama2ForCausalLM.from_pretrained(stage_inputs["policy"])
    assert policy.dtype == torch.float32
    assert not torch.equal(policy.lm_head.weight, start.lm_head.weight)


def test_rerun_returns_the_record_and_other_arguments_are_refused(single_run, stage_inputs):
    out, record, _ = single_run
    again = run_stage("ppo", **ppo_args(stage_inputs, out))
    assert again.seconds == record.seconds and len(metrics_rows(out)) == 2  # nothing ran, nothing appended
    with pytest.raises(UsageError, match=r"learning_rate: 0.001 -> 0.01"):
        run_stage("ppo", **ppo_args(stage_inputs, out, learning_rate=1e-2))


def test_killed_run_resumes_from_the_last_complete_checkpoint(single_run, stage_inputs, tmp_path):
    """A kill while checkpoint-2 was being saved, after iteration 2 was logged: the rerun skips the incomplete
    checkpoint, resumes from checkpoint-1, cuts metrics.jsonl back to iteration 1, and redoes iteration 2 exactly."""
    reference, _, reference_rows = single_run
    out = tmp_path / "killed"
    shutil.copytree(reference, out)
    interrupt(out, 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "reward/me')  # a torn line from the kill
    with pytest.raises(UsageError, match=r"num_iterations: 2 -> 3"):  # a resume with other arguments is refused
        run_stage("ppo", **ppo_args(stage_inputs, out, num_iterations=3))
    record = run_stage("ppo", **ppo_args(stage_inputs, out))
    assert record.metrics["resumed_from"] == "checkpoint-1"
    rows = metrics_rows(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in COMPARED:  # same data position, sampling seeds and optimizer state: the same iteration
        assert rows[1][key] == pytest.approx(reference_rows[1][key], rel=1e-5, abs=1e-6), key
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()


def test_folder_of_an_unknown_run_is_refused(stage_inputs, tmp_path):
    out = tmp_path / "foreign"
    write_jsonl(out / "metrics.jsonl", [{"iteration": 1}])
    with pytest.raises(UsageError, match="unknown arguments"):
        run_stage("ppo", **ppo_args(stage_inputs, out))
    assert len(metrics_rows(out)) == 1


def test_bad_prompt_row_is_one_line_naming_file_line_and_field(stage_inputs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, {"prompt": "yo", "is_safety_prompt": "yes"}])
    args = ppo_args(stage_inputs, tmp_path / "o", prompts_file=[str(bad)])
    assert cli(["ppo", *as_argv(args)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2, field 'is_safety_prompt'" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_bf16_trainable_weights_are_refused(stage_inputs, tmp_path):
    with pytest.raises(UsageError, match="float32 master weights"):
        run_stage("ppo", **ppo_args(stage_inputs, tmp_path / "o", dtype="bfloat16"))


def _weights_delta(out: Path, start: Path) -> dict[str, torch.Tensor]:
    after, before = load_file(out / "model.safetensors"), load_file(start / "model.safetensors")
    return {k: after[k] - before[k] for k in before}


def _relative_distance(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def test_ddp_two_processes_match_one_process(single_run, stage_inputs, tmp_path):
    """2 processes (DDP config: replicas, gradients averaged over ranks), 4 rollouts each, against the 1-process run
    of the same 8 prompts: same rollouts (each generation batch has its own seed), same statistics, and the same
    update (grad norms and weights after the one step), which only holds if the gradients are reduced."""
    reference, _, reference_rows = single_run
    out = tmp_path / "ddp"
    proc = accelerate_launch(["ppo", *as_argv(ppo_args(stage_inputs, out, num_iterations=1))])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    assert record.world_size == 2 and record.metrics["distributed"]["sharding"] == "replicated"
    row = metrics_rows(out)[0]
    for key in COMPARED:
        assert row[key] == pytest.approx(reference_rows[0][key], rel=1e-4, abs=1e-5), key
    # one-step weights: reference's checkpoint-1 holds the 1-process policy after the same step
    one = _weights_delta(reference / "checkpoint-1", stage_inputs["policy"])
    two = _weights_delta(out, stage_inputs["policy"])
    assert _relative_distance(two, one) < 0.02


def test_fsdp2_two_processes_shard_and_resume(single_run, stage_inputs, tmp_path):
    """recipes/accelerate/fsdp.yaml on 2 CPU processes: the policy and critic are sharded per decoder layer (each
    rank holds about half the bytes), the first iteration matches the 1-process run, and a run killed while saving
    checkpoint-2 resumes from checkpoint-1 under FSDP and redoes iteration 2 as the uninterrupted run did."""
    _, _, reference_rows = single_run
    out = tmp_path / "fsdp"
    args = as_argv(ppo_args(stage_inputs, out))
    config = REPO_ROOT / "recipes" / "accelerate" / "fsdp.yaml"
    proc = accelerate_launch(["ppo", *args], config_file=config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    memory = record.metrics["distributed"]
    assert record.world_size == 2 and memory["sharding"] == "fsdp2"
    assert len(memory["param_bytes_per_rank"]) == 2
    for local in memory["param_bytes_per_rank"]:
        assert local <= 0.6 * memory["param_bytes_full"], memory
    first = metrics_rows(out)
    for key in COMPARED:
        assert first[0][key] == pytest.approx(reference_rows[0][key], rel=1e-4, abs=1e-5), key
    assert "Llama2DecoderLayer" in proc.stderr or "FSDP2" in proc.stderr + proc.stdout

    interrupt(out, 2)
    proc = accelerate_launch(["ppo", *args], config_file=config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    assert record.metrics["resumed_from"] == "checkpoint-1"
    rows = metrics_rows(out)
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in COMPARED:
        assert rows[1][key] == pytest.approx(first[1][key], rel=1e-4, abs=1e-5), key

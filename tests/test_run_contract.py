"""The run contract every command shares, tried as a user would: one run per folder, models checked against their
role, finished folders returned only for the same inputs, nonsense refused, and one line with exit code 2 for every
mistake a user can fix (each root cause has a test through a fresh `llama2-hf` process; variants run in-process
through the same entry, `llama2_hf.cli.main`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, llama2_hf, one_step, record, sft_rows, write_jsonl
from safetensors.torch import load_file, save_file

from llama2_hf import run_lock
from llama2_hf.cli import main as cli
from llama2_hf.errors import UsageError
from llama2_hf.runner import RUN_ARGS, StageRun, content_hash
from llama2_hf.stages import run_stage


def rs_args(stage_inputs, out, **changes) -> list[str]:
    """A sampling-only `rejection-sample` of the tiny policy over the 8 stage prompts."""
    values = {"model_name_or_path": stage_inputs["policy"], "prompts_file": stage_inputs["prompts"],
              "helpfulness_reward_model": stage_inputs["helpfulness_rm"], "output_dir": out, "use_cpu": "true",
              "num_samples": "3", "max_new_tokens": "6", "prompt_batch_size": "2", "finetune": "false", **changes}
    return ["rejection-sample", *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a refused command (exit code 2, the --debug hint after it, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == "(run with --debug for the traceback)" and "Traceback" not in proc.stderr
    assert lines[-2].startswith(f"llama2-hf {command}: error: ")
    return lines[-2]


def cli_error(args: list[str], capsys) -> str:
    """The error line of `llama2-hf ARGS` run in this process (exit code 2 asserted)."""
    assert cli([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-2]


# ------------------------------------------------------------------------------------------- 1. one run per folder

def test_a_second_run_in_a_busy_folder_is_refused_and_the_folder_stays_resumable(stage_inputs, tmp_path):
    out = tmp_path / "rs"
    args = rs_args(stage_inputs, out)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "llama2_hf.cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = out / run_lock.LOCK_FILE
        deadline = time.monotonic() + 240
        while not (lock.is_file() and lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the folder"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)  # the first run holds the folder, frozen wherever it was
        second = llama2_hf(*args)
        line = error_line(second, "rejection-sample")
        assert f"{out} is in use by another run (pid {first.pid} on " in line
        assert not (out / "run.json").exists()
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a kill releases the lock with the process
        first.wait()
    third = llama2_hf(*args)
    assert third.returncode == 0, third.stderr
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["responses"]) == 3 for r in rows)  # every prompt once, K samples each
    assert record(out)["stage"] == "rejection-sample"
    assert (out / run_lock.LOCK_FILE).read_text() == ""  # released: no holder recorded


def test_the_lock_is_taken_once_per_process_and_released(tmp_path):
    folder = tmp_path / "run"
    run_lock.acquire(folder)
    run_lock.acquire(folder)  # the same process again: a retry, not a second run
    code = "import sys; from llama2_hf import run_lock; run_lock.acquire(sys.argv[1])"
    held = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert held.returncode == 1 and "is in use by another run (pid" in held.stderr
    run_lock.release(folder)
    free = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    with pytest.raises(UsageError, match="is a file, not a folder"):
        run_lock.acquire(tmp_path / "run" / run_lock.LOCK_FILE)


# ------------------------------------------------------------------------------- 2. every model checked for its role

def test_a_causal_lm_as_reward_model_is_refused_before_any_sampling(stage_inputs, tmp_path):
    out = tmp_path / "rs"
    proc = llama2_hf(*rs_args(stage_inputs, out, helpfulness_reward_model=stage_inputs["policy"]))
    line = error_line(proc, "rejection-sample")
    assert f"helpfulness reward model {stage_inputs['policy']}: not a checkpoint of Llama2ForRewardModel" in line
    assert "missing from it (score.weight)" in line and "(lm_head.weight)" in line
    assert not list(out.rglob("*.jsonl"))  # nothing sampled


def fused_checkpoint(stage_inputs, folder):
    """The tiny policy saved as an architecture with fused attention and MLP projections (same config.json)."""
    folder.mkdir()
    weights = load_file(str(stage_inputs["policy"] / "model.safetensors"))
    fused = {}
    for name, tensor in weights.items():
        if ".self_attn.q_proj." in name:
            prefix = name.split("q_proj")[0]
            fused[f"{prefix}qkv_proj.weight"] = torch.cat([tensor, weights[f"{prefix}k_proj.weight"],
                                                           weights[f"{prefix}v_proj.weight"]])
        elif ".mlp.gate_proj." in name:
            prefix = name.split("gate_proj")[0]
            fused[f"{prefix}gate_up_proj.weight"] = torch.cat([tensor, weights[f"{prefix}up_proj.weight"]])
        elif not any(k in name for k in (".k_proj.", ".v_proj.", ".up_proj.")):
            fused[name] = tensor
    save_file(fused, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for f in stage_inputs["policy"].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize("case", ["reward_model_as_eval_policy", "causal_lm_as_eval_rm", "fused_layers_for_sft"])
def test_weights_that_do_not_fit_their_role_are_refused(case, stage_inputs, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "reward_model_as_eval_policy":  # the data check passes first (real GSM8K files), then the model
        args = ["eval", "--model_name_or_path", stage_inputs["helpfulness_rm"], "--tasks", "gsm8k", "--data_dir",
                shared_data, "--output_dir", out, "--use_cpu", "true"]
        expected = ["model to evaluate", "(lm_head.weight)", "(score.weight)"]
    elif case == "causal_lm_as_eval_rm":
        args = ["eval-rm", "--model_name_or_path", stage_inputs["policy"], "--eval_file", stage_inputs["prefs"],
                "--output_dir", out, "--use_cpu", "true"]
        expected = ["reward model", "not a checkpoint of Llama2ForRewardModel", "(score.weight)"]
    else:
        fused = fused_checkpoint(stage_inputs, tmp_path / "fused")
        args = ["sft", "--train_file", stage_inputs["sft"], *one_step(stage_inputs, out), "--model_name_or_path",
                fused]  # the last --model_name_or_path wins
        expected = ["model to fine-tune", "self_attn.k_proj.weight", "not part of Llama2ForCausalLM",
                    "mlp.gate_up_proj.weight"]
    line = cli_error(args, capsys)
    for text in expected:
        assert text in line, line
    assert not (out / "run.json").exists()


def test_a_reward_model_may_start_from_a_chat_model_only_where_documented(stage_inputs, caplog, monkeypatch):
    from llama2_hf import Llama2ForRewardModel, loading
    from llama2_hf.loading import load_pretrained

    monkeypatch.setattr(loading, "_new_head_logged", set())  # other tests may have loaded this folder already
    with caplog.at_level("INFO", logger="llama2_hf.loading"):
        model = load_pretrained(Llama2ForRewardModel, stage_inputs["policy"], "reward model", new_head=True)
        load_pretrained(Llama2ForRewardModel, stage_inputs["policy"], "reward model", new_head=True)
    assert sum("its head (score.weight) is new" in r.getMessage() for r in caplog.records) == 1  # logged once
    policy = load_file(str(stage_inputs["policy"] / "model.safetensors"))
    torch.testing.assert_close(model.model.embed_tokens.weight, policy["model.embed_tokens.weight"])


# -------------------------------------------------------------------------- 3. a finished folder only for its inputs

def test_an_edited_train_file_is_detected_and_redone_when_asked(stage_inputs, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    out = tmp_path / "sft"
    args = ["sft", "--train_file", data, *one_step(stage_inputs, out)]
    assert llama2_hf(*args).returncode == 0
    finished = record(out)
    assert llama2_hf(*args).returncode == 0 and record(out) == finished  # same inputs: the record, no work
    with open(data, "a") as f:
        f.write(json.dumps(sft_rows(1, seed=5)[0]) + "\n")
    line = error_line(llama2_hf(*args), "sft")
    assert f"holds a finished sft run, but its input train_0 ({data}) has changed since" in line
    assert "--redo" in line
    redone = llama2_hf(*args, "--redo")
    assert redone.returncode == 0, redone.stderr
    assert record(out)["inputs"]["train_0"]["sha256"] == content_hash(data)["sha256"]
    assert record(out)["metrics"]["data"]["train"]["total"] == 9


def test_an_interrupted_run_resumes_only_on_the_inputs_it_started_with(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", sft_rows(3))
    out = tmp_path / "run"
    run = StageRun("demo", out, {"x": 1})
    run.add_input("train", data)
    (out / "part.jsonl").write_text("{}\n")  # work done before a kill: no finish()
    run_lock.release(out)
    started = json.loads((out / RUN_ARGS).read_text())
    assert started["inputs"]["train"]["sha256"] == content_hash(data)["sha256"]
    StageRun("demo", out, {"x": 1}).add_input("train", data)  # unchanged: the resume goes on
    run_lock.release(out)
    data.write_text(data.read_text() + json.dumps(sft_rows(1, seed=9)[0]) + "\n")
    with pytest.raises(UsageError, match=r"interrupted demo run that started on another train \(.*rows.jsonl has "
                                         r"changed since\)"):
        StageRun("demo", out, {"x": 1}).add_input("train", data)


def test_a_folder_hash_ignores_bookkeeping_and_checkpoints(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = content_hash(folder)["sha256"]
    (folder / run_lock.LOCK_FILE).write_text('{"pid": 1}')
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    assert content_hash(folder)["sha256"] == before
    (folder / "config.json").write_text('{"a": 1}')
    assert content_hash(folder)["sha256"] != before


# ----------------------------------------------------------------------------- 5. values: refused, or which one wins

def test_gradient_accumulation_given_with_a_global_batch_is_refused(stage_inputs, tmp_path):
    args = ["sft", "--train_file", stage_inputs["sft"], *one_step(stage_inputs, tmp_path / "sft")]
    i = args.index("--global_batch_size")
    args[i + 1] = "8"  # per-device 2 x 1 process -> 4 steps; the user says 1
    line = error_line(llama2_hf(*args, "--gradient_accumulation_steps", "1"), "sft")
    assert "gradient_accumulation_steps=1 contradicts global_batch_size=8" in line and "4 steps" in line


@pytest.mark.parametrize("command, flags, expected", [
    ("sft", ["--max_steps", "-3", "--num_train_epochs", "0"], "max_steps must be > 0 (or -1"),
    ("sft", ["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be > 0"),
    ("sft", ["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be > 0, got 0"),
    ("sft", ["--learning_rate", "-1"], "learning_rate must be >= 0, got -1.0"),
    ("train-rm", ["--learning_rate", "-0.5"], "learning_rate must be >= 0, got -0.5"),
    ("ppo", ["--num_iterations", "0"], "num_iterations must be > 0, got 0"),
    ("ppo", ["--kl_coef", "-1"], "kl_coef must be >= 0, got -1.0"),
    ("pretrain", ["--gradient_accumulation_steps", "0", "--global_batch_size", "null"],
     "gradient_accumulation_steps must be > 0, got 0"),
])
def test_nonsense_values_are_refused_before_any_work(command, flags, expected, tmp_path, capsys):
    line = cli_error([command, "--output_dir", tmp_path / "out", "--use_cpu", "true", *flags], capsys)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_examples_longer_than_the_context_follow_on_overlength(stage_inputs, tmp_path, tiny_tokenizer):
    long_answer = " ".join(["apples"] * 300)  # over the tiny model's 256 positions, under the 4096 of max_length
    rows = [*sft_rows(3), {"messages": [{"role": "user", "content": "Say apples."},
                                        {"role": "assistant", "content": long_answer}]}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    values = dict(model_name_or_path=str(stage_inputs["policy"]), train_file=[str(data)], use_cpu=True, bf16=False,
                  max_steps=1, per_device_train_batch_size=2, global_batch_size=None, report_to=[],
                  save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match=rf"{data}, line 4, field 'messages': \d+ tokens exceed max_length=256"):
        run_stage("sft", output_dir=str(tmp_path / "refused"), **values)
    done = run_stage("sft", output_dir=str(tmp_path / "cut"), on_overlength="truncate", **values)
    assert done.metrics["data"]["train"]["truncated"] == 1  # counted, not silently packed whole


def test_a_mean_over_no_selected_row_is_none():
    from llama2_hf.rejection_sampling import report

    records = [{"scores": [None, None], "responses": ["a", "b"], "finished": [False, False], "best": None}]
    summary = report(records, [])
    assert summary["mean_score"] is None and summary["mean_best_score"] is None


# ------------------------------------------------------------------ 7. one line and exit 2 instead of a traceback

def test_a_prompt_longer_than_the_context_is_named_by_file_and_line(stage_inputs, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 plus 2?"},
                                                        {"prompt": " ".join(["apples"] * 400)}])
    out = tmp_path / "rs"
    line = error_line(llama2_hf(*rs_args(stage_inputs, out, prompts_file=prompts)), "rejection-sample")
    assert f"{prompts}, line 2: the prompt has " in line and "the model's whole context is 256" in line
    assert not list(out.rglob("*.jsonl"))


def test_inputs_that_raised_tracebacks_are_one_line(stage_inputs, tmp_path, capsys):
    sft = ["sft", *one_step(stage_inputs, tmp_path / "sft")]
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a folder" in cli_error(
        ["sft", "--train_file", stage_inputs["sft"], *one_step(stage_inputs, tmp_path / "a_file")], capsys)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: [1, 2]\n")
    assert cli_error([*sft, "--train_file", stage_inputs["sft"], "--config", recipe], capsys) == (
        f"llama2-hf sft: error: --config {recipe}: learning_rate: expected one value, got a list ([1, 2])")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert str(empty) in cli_error([*sft, "--train_file", empty], capsys)
    assert "--sead is not an argument of `llama2-hf quickstart`; did you mean --seed?" in cli_error(
        ["quickstart", "--sead", "1"], capsys)
    assert "scale must be > 0, got 0.0" in cli_error(["quickstart", "--scale", "0", "--output_dir", tmp_path / "q"],
                                                     capsys)
    assert not (tmp_path / "q").exists()


def test_eval_without_its_data_offline_is_refused_before_the_model_loads(stage_inputs, tmp_path):
    out = tmp_path / "eval"
    proc = llama2_hf("eval", "--model_name_or_path", stage_inputs["policy"], "--tasks", "gsm8k", "--output_dir", out,
                     "--data_dir", tmp_path / "no_data")
    line = error_line(proc, "eval")
    assert f"gsm8k: cannot read its data from data_dir {tmp_path / 'no_data'}" in line


# --------------------------------------------------------------- 8. a failed start does not lock in its arguments

def test_a_corrected_rerun_after_a_failed_one_is_accepted(stage_inputs, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    out = tmp_path / "sft"
    line = error_line(llama2_hf("sft", "--train_file", bad, *one_step(stage_inputs, out)), "sft")
    assert f"{bad}, line 1" in line
    fixed = llama2_hf("sft", "--train_file", stage_inputs["sft"], *one_step(stage_inputs, out))
    assert fixed.returncode == 0, fixed.stderr
    assert record(out)["args"]["train_file"] == [str(stage_inputs["sft"])]


# ----------------------------------------------------------------------------------- 9. messages that lead the way

def test_messages_name_what_is_wrong(stage_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    sft = ["sft", "--train_file", stage_inputs["sft"], "--output_dir", out, "--use_cpu", "true"]
    assert cli_error([*sft, "--model_name_or_path", tmp_path / "nothing_here"], capsys).endswith(
        f"{tmp_path / 'nothing_here'}: no such folder")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_bytes((stage_inputs["policy"] / "config.json").read_bytes())
    assert "the folder holds no tokenizer" in cli_error([*sft, "--model_name_or_path", no_tokenizer], capsys)
    assert "--train_fil is not an argument of `llama2-hf sft`; did you mean --train_file?" in cli_error(
        ["sft", "--train_fil", "x.jsonl"], capsys)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: fast\n")
    assert cli_error(["sft", "--config", recipe], capsys).endswith(
        f"--config {recipe}: learning_rate: 'fast' is not a number")
    assert "'not a repo id!!' is not a Hub repo id" in cli_error(
        ["push", "--model_name_or_path", stage_inputs["policy"], "--repo_id", "not a repo id!!", "--dry_run", "true"],
        capsys)
    preprompts = tmp_path / "preprompts.json"
    preprompts.write_text("[1, 2]")
    assert f"preprompts_file {preprompts}:" in cli_error(
        ["distill", "--model_name_or_path", stage_inputs["policy"], "--prompts_file", stage_inputs["prompts"],
         "--safety_reward_model", stage_inputs["safety_rm"], "--preprompts_file", preprompts, "--output_dir", out],
        capsys)


@pytest.mark.parametrize("command, flags", [("eval-rm", ["--bf16", "true"]), ("eval", ["--use_cpu", "true"]),
                                            ("refusals", ["--use_cpu", "true"]), ("gatt", ["--use_cpu", "true"])])
def test_flags_the_other_commands_take_are_accepted(command, flags):
    from llama2_hf.runner import parse_args
    from llama2_hf.stages import get_stage

    instances, _ = parse_args(get_stage(command), ["--output_dir", "x", *flags])
    assert any(getattr(i, flags[0][2:], None) is True for i in instances)


def test_a_prompt_that_fills_the_context_is_a_user_error_in_every_sampler(tiny_model_factory):
    from llama2_hf.generation import PromptTooLong, SamplingConfig, generate
    from llama2_hf.runner import user_error_message

    model = tiny_model_factory()
    with pytest.raises(PromptTooLong) as info:
        generate(model, [[1, 2, 3], [1] * model.config.max_position_embeddings], SamplingConfig(max_new_tokens=2))
    assert user_error_message(info.value) == (f"prompt_ids[1] has {model.config.max_position_embeddings} tokens, no "
                                              "room left in the model's context of "
                                              f"{model.config.max_position_embeddings} (shorten or drop the prompt)")

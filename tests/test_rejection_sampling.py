"""Rejection sampling: order statistics, sampling and the pool, learning, and the `rejection-sample` stage (outputs,
resume checks, the fine-tuning start, 2 processes equal to 1, a killed process resuming)."""

import itertools
import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from llama2_hf import records, runner
from llama2_hf.cli import main as cli
from llama2_hf.data import load_data_files, prompt_row, sft_messages
from llama2_hf.generation import SamplingConfig, generate_text
from llama2_hf.rejection_sampling import (
    RejectionSampler,
    RejectionSamplingConfig,
    expected_median,
    expected_order_statistic,
    finetune_trainer,
    latest_records,
    max_median_curves,
    prompt_batches,
    report,
    select,
)
from llama2_hf.runner import RunRecord, UsageError, stage_output
from llama2_hf.sampling.torch_backend import TorchSampler
from llama2_hf.stages.rejection_sampling import RejectionSampling
from llama2_hf.stages import run_stage

from conftest import TINY_TRAINING, TargetTokenReward, accelerate_launch, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = [prompt_row({"prompt": f"say the magic words, number {i}", "is_safety_prompt": i % 3 == 0}, i + 1)
           for i in range(12)]
CPU_TRAINING = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
                    disable_tqdm=True, global_batch_size=None)


def config(tmp_path, **overrides) -> RejectionSamplingConfig:
    values = dict(output_dir=str(tmp_path / "trainer"), num_samples=4, select_unfinished=True, **CPU_TRAINING)
    return RejectionSamplingConfig(**{**values, **overrides})


def rejection_sampler(model, tok, reward, cfg, max_new_tokens=6, prompt_batch_size=4) -> RejectionSampler:
    """The stage's sampling defaults (temperature 1, top-p 1) on the PyTorch backend."""
    sampling = RejectionSampling(max_new_tokens=max_new_tokens, prompt_batch_size=prompt_batch_size)
    return RejectionSampler(TorchSampler(model, tok, sampling.sampling_config()), reward, cfg)


def test_expected_order_statistics_match_enumeration():
    scores = [0.3, -1.0, 2.5, 0.3, 7.0]
    for n in range(1, 6):
        subsets = list(itertools.combinations(scores, n))
        brute_max = sum(max(s) for s in subsets) / len(subsets)
        brute_median = sum(statistics.median(s) for s in subsets) / len(subsets)
        assert expected_order_statistic(scores, n, n) == pytest.approx(brute_max)
        assert expected_median(scores, n) == pytest.approx(brute_median)
        for m in range(1, n + 1):
            brute = sum(sorted(s)[m - 1] for s in subsets) / len(subsets)
            assert expected_order_statistic(scores, n, m) == pytest.approx(brute)
    curves = max_median_curves([scores, [1.0] * 5])
    assert curves["n"] == [1, 2, 3, 4, 5]
    assert curves["max"][0] == pytest.approx(curves["median"][0])  # N = 1: max = median = mean
    assert curves["max"][-1] == pytest.approx((7.0 + 1.0) / 2)
    assert all(a <= b + 1e-12 for a, b in zip(curves["max"], curves["max"][1:]))  # best-of-N grows with N


def test_config_refuses_bad_sampling_values(tmp_path):
    with pytest.raises(ValueError, match="pool must be one of"):
        config(tmp_path, pool="best")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        config(tmp_path, temperature_sweep=[0.7, -1.0])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        config(tmp_path, num_samples=0)
    with pytest.raises(ValueError, match="num_samples and prompt_batch_size must be >= 1"):
        RejectionSampling(prompt_batch_size=0)
    # batches are cut over the whole list: the same batches whatever the number of processes
    assert [[i for i, _ in b] for b in prompt_batches(PROMPTS[:5], 2)] == [[0, 1], [2, 3], [4]]


def test_pool_keeps_the_best_of_earlier_iterations(tmp_path, tok, tiny_model_factory):
    def length_reward(prompts, responses, **columns):
        return [float(len(r)) for r in responses]

    sampler = rejection_sampler(tiny_model_factory(), tok, length_reward, config(tmp_path, num_samples=2))
    prompts = PROMPTS[:4]
    first = sampler.sample_batches(prompt_batches(prompts, 4), 1)
    # iteration 1's winners replaced by a long answer, as a better earlier model would have produced
    for record in first:
        record["best"] = {"response": "x" * 50, "source": "sample", "index": 0, "iteration": 1, "score": 50.0}
    earlier = latest_records(first)
    second = sampler.sample_batches(prompt_batches(prompts[:3], 4), 2, earlier)
    for record in second:
        assert record["pool"]["response"] == "x" * 50 and record["pool"]["score"] == 50.0  # rescored now
        assert record["best"]["source"] == "pool" and record["best"]["iteration"] == 1
    selection = select(second, earlier, "all")
    assert len(selection) == 4  # the prompt not resampled in iteration 2 keeps its earlier best
    assert all(row["messages"][-1] == {"role": "assistant", "content": "x" * 50} for row in selection)
    assert selection[3]["scored_in_iteration"] == 1 and selection[0]["scored_in_iteration"] == 2
    current = select(second, earlier, "current")
    assert len(current) == 3 and all(r["source_iteration"] == 2 for r in current)
    assert report(second, selection)["pool_wins"] == 3


def test_rejection_sampling_raises_the_mean_reward(tmp_path, tok, tiny_model_factory):
    """Two iterations of best-of-16 + SFT on a tiny model raise the mean reward of fresh samples by >= 0.10 absolute
    (from about 0.07)."""
    model = tiny_model_factory()
    reward = TargetTokenReward(tok)
    prompts = [prompt_row({"prompt": f"say the magic words, number {i}"}, i + 1) for i in range(16)]

    def mean_reward():
        texts = generate_text(model, tok, [p.messages for p in prompts],
                              SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, num_samples=16),
                              generator=torch.Generator().manual_seed(123))
        flat = [t for ts in texts for t in ts]
        return sum(reward(None, flat)) / len(flat)

    before = mean_reward()
    cfg = config(tmp_path, num_samples=16, learning_rate=1e-2, num_train_epochs=4, lr_scheduler_type="constant",
                 max_length=64, per_device_train_batch_size=16, seed=0)
    sampler = rejection_sampler(model, tok, reward, cfg, max_new_tokens=8, prompt_batch_size=16)
    earlier = {}
    for iteration in (1, 2):
        records = sampler.sample_batches(prompt_batches(prompts, 16), iteration, earlier)
        selection = select(records, earlier)
        summary = report(records, selection)
        assert summary["mean_best_score"] > summary["mean_score"] and summary["figure7"]["n"] == list(range(1, 17))
        finetune_trainer(model, tok, selection, cfg).train()
        earlier = latest_records(records)
    after = mean_reward()
    assert after >= before + 0.10, (before, after)


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------

def stage_args(stage_inputs, out, **overrides) -> dict:
    return {"model_name_or_path": str(stage_inputs["policy"]), "prompts_file": [str(stage_inputs["prompts"])],
            "helpfulness_reward_model": str(stage_inputs["helpfulness_rm"]),
            "safety_reward_model": str(stage_inputs["safety_rm"]), "output_dir": str(out), "num_samples": 3,
            "max_new_tokens": 6, "prompt_batch_size": 2, "select_unfinished": True, **TINY_TRAINING, **overrides}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_stage_outputs_resume_check_and_pool(stage_inputs, tmp_path):
    out = tmp_path / "rs1"
    record = run_stage("rejection-sample", **stage_args(stage_inputs, out))
    assert record.outputs == {"candidates": "candidates.jsonl", "data": "selected.jsonl", "report": "report.json",
                              "figure7": "figure7.png", "model": "."}
    candidates = read_jsonl(out / "candidates.jsonl")
    prompts = read_jsonl(stage_inputs["prompts"])
    assert [r["index"] for r in candidates] == list(range(8))
    assert [r["messages"][-1]["content"] for r in candidates] == [p["prompt"] for p in prompts]
    for r, p in zip(candidates, prompts):
        assert r["iteration"] == 1 and r["is_safety_prompt"] == p["is_safety_prompt"]
        assert len(r["responses"]) == len(r["scores"]) == len(r["finished"]) == 3
        assert r["sampling"] == {"iteration": 1, "num_samples": 3, "temperature": 1.0, "top_p": 1.0,
                                 "max_new_tokens": 6, "prompt_batch_size": 2, "seed": 42}
        assert {"helpfulness", "safety", "used_safety"} <= set(r["components"])
        if p["is_safety_prompt"]:  # a tagged prompt is scored by the safety RM (paper Eq. 3)
            assert r["components"]["used_safety"] == [1.0] * 3 and r["scores"] == r["components"]["safety"]
        assert r["best"]["score"] == max(r["scores"]) and r["pool"] is None
    # selected.jsonl: SFT rows the sft stage reads (through the folder's data output), ending with the best answer
    assert stage_output(out, "data") == out / "selected.jsonl"
    selected = load_data_files([stage_output(out, "data")], sft_messages).to_list()
    assert [row["messages"][-1]["content"] for row in selected] == [r["best"]["response"] for r in candidates]
    saved = RunRecord.read(out)
    assert saved.metrics["selected_rows"] == 8 and saved.metrics["samples"] == 24 and saved.metrics["log_history"]
    assert (out / "figure7.png").read_bytes().startswith(PNG_MAGIC)
    trained, policy = weights(out), weights(stage_inputs["policy"])
    assert any(not torch.equal(trained[k], policy[k]) for k in policy)  # fine-tuned from the sampling policy

    # the same arguments return the record; a resume with another K or temperature is refused
    assert run_stage("rejection-sample", **stage_args(stage_inputs, out)).seconds == saved.seconds
    with pytest.raises(UsageError, match=r"num_samples: 3 -> 4"):
        run_stage("rejection-sample", **stage_args(stage_inputs, out, num_samples=4))

    # iteration 2 on half the prompts, with iteration 1 as the pool
    half = write_jsonl(tmp_path / "half.jsonl", prompts[:4])
    out2 = tmp_path / "rs2"
    record2 = run_stage("rejection-sample", **stage_args(stage_inputs, out2, prompts_file=[str(half)], iteration=2,
                                                         pool_dirs=[str(out)], finetune=False))
    assert "model" not in record2.outputs and not (out2 / "model.safetensors").exists()
    second = read_jsonl(out2 / "candidates.jsonl")
    for r, first in zip(second, candidates):
        assert r["pool"]["response"] == first["best"]["response"] and r["pool"]["iteration"] == 1
        assert r["best"]["score"] == max(r["scores"] + [r["pool"]["score"]])
    selected2 = read_jsonl(out2 / "selected.jsonl")
    assert len(selected2) == 8  # 4 resampled + 4 kept from iteration 1
    assert [row["messages"] for row in selected2[4:]] == [row["messages"] for row in selected[4:]]
    assert all(row["scored_in_iteration"] == 1 for row in selected2[4:])
    with pytest.raises(UsageError, match="not one before iteration 1"):
        run_stage("rejection-sample", **stage_args(stage_inputs, tmp_path / "rs3", pool_dirs=[str(out)]))


def test_finetuning_starts_from_the_named_model(stage_inputs, tmp_path, tiny_model_factory, tiny_tokenizer):
    base = tmp_path / "base"
    tiny_model_factory(seed=7).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "rs"
    # learning rate 0: the saved weights are exactly the starting checkpoint's
    record = run_stage("rejection-sample", **stage_args(stage_inputs, out, finetune_model_name_or_path=str(base),
                                                        learning_rate=0.0, max_steps=1))
    assert record.inputs["finetune_model"]["path"] == str(base)
    saved, start, policy = weights(out), weights(base), weights(stage_inputs["policy"])
    assert all(torch.equal(saved[k], start[k]) for k in start)
    assert not all(torch.equal(saved[k], policy[k]) for k in policy)
    with pytest.raises(UsageError, match="finetune_model_name_or_path .*: no such folder"):
        run_stage("rejection-sample", **stage_args(stage_inputs, tmp_path / "x",
                                                   finetune_model_name_or_path=str(tmp_path / "missing")))


def test_bad_prompt_row_is_one_line_naming_file_line_and_field(stage_inputs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, {"prompt": "yo", "is_safety": True}])
    code = cli(["rejection-sample", "--model_name_or_path", str(stage_inputs["policy"]), "--prompts_file", str(bad),
                "--helpfulness_reward_model", str(stage_inputs["helpfulness_rm"]), "--output_dir",
                str(tmp_path / "o"), "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}, line 2, field 'is_safety'" in err and "Traceback" not in err


def test_temperature_sweep_writes_figure8(stage_inputs, tmp_path):
    out = tmp_path / "sweep"
    record = run_stage("rejection-sample", **stage_args(stage_inputs, out, temperature_sweep=[0.7, 1.3]))
    assert set(record.outputs) == {"temperature_sweep_T0.7", "temperature_sweep_T1.3", "temperature_sweep", "figure8"}
    sweep = json.loads((out / "temperature_sweep.json").read_text())
    assert set(sweep) == {"0.7", "1.3"} and sweep["0.7"]["n"] == [1, 2, 3]
    rows = read_jsonl(out / "temperature_sweep_T1.3.jsonl")
    assert len(rows) == 8 and all(r["sampling"]["temperature"] == 1.3 for r in rows)
    assert (out / "figure8_temperature_sweep.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "model.safetensors").exists()  # a sweep samples only


class FakeState:
    """One process of a launch, for replaying a rank's resume in this process."""

    def __init__(self, index: int, world: int):
        self.process_index, self.num_processes, self.is_main_process = index, world, index == 0

    def wait_for_everyone(self):
        pass


def test_two_processes_equal_one_and_a_killed_process_resumes(stage_inputs, tmp_path, monkeypatch):
    # Sampling only: the training fields keep their defaults, so the command line below states every argument;
    # global_batch_size None keeps gradient_accumulation_steps from depending on the number of processes.
    sampling = {k: v for k, v in stage_args(stage_inputs, None, finetune=False).items()
                if k not in TINY_TRAINING or k in ("use_cpu", "global_batch_size")}
    one = tmp_path / "one"
    run_stage("rejection-sample", **{**sampling, "output_dir": str(one)})
    two = tmp_path / "two"
    args = {**sampling, "output_dir": str(two)}
    flags = []
    for key, value in args.items():
        flags += [f"--{key}", *(value if isinstance(value, list) else [str(value).lower() if isinstance(value, bool)
                                                                       else str(value)])]
    proc = accelerate_launch(["rejection-sample", *flags, "--report_to", "none"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(two)
    assert record.world_size == 2
    parts = [read_jsonl(two / "parts" / f"candidates.rank{r}-of-2.jsonl") for r in (0, 1)]
    assert [[r["index"] for r in p] for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # contiguous shares of batches

    def as_set(rows):
        return {(r["prompt_id"], tuple(r["responses"]), tuple(round(s, 4) for s in r["scores"])) for r in rows}

    merged, single = read_jsonl(two / "candidates.jsonl"), read_jsonl(one / "candidates.jsonl")
    assert len(merged) == 8 and as_set(merged) == as_set(single)  # the seeds do not depend on the rank
    assert read_jsonl(two / "selected.jsonl") == read_jsonl(one / "selected.jsonl")

    # Process 1 killed while writing its last prompt: a torn last line, no record yet.
    (two / "run.json").unlink()
    runner.write_json_atomic(two / "run_args.json", {"stage": "rejection-sample", "args": record.args})
    part1 = two / "parts" / "candidates.rank1-of-2.jsonl"
    lines = part1.read_text().splitlines(keepends=True)
    part1.write_text("".join(lines[:3]) + lines[3][:40])
    (two / "candidates.jsonl").unlink()

    with pytest.raises(UsageError, match=r"temperature: 1.0 -> 0.7"):  # a resume with another temperature
        run_stage("rejection-sample", **{**args, "temperature": 0.7})

    calls = []
    real_sample = TorchSampler.sample_ids
    monkeypatch.setattr(TorchSampler, "sample_ids",
                        lambda self, ids, **k: calls.append(len(ids)) or real_sample(self, ids, **k))
    for rank in (1, 0):  # each process of the relaunch, one after the other
        monkeypatch.setattr(records, "distributed_state", lambda rank=rank: FakeState(rank, 2))
        run_stage("rejection-sample", **args)
    assert calls == [2]  # only the batch of the torn prompt was sampled again (prompts 6 and 7)
    resumed = read_jsonl(two / "candidates.jsonl")
    assert [r["index"] for r in read_jsonl(part1)] == [4, 5, 6, 7]  # nothing lost or duplicated
    assert [r["responses"] for r in resumed] == [r["responses"] for r in merged]
    assert RunRecord.read(two).world_size == 2

    # part files hold their sampling settings: a resume without run_args.json still refuses another K
    (two / "run.json").unlink()
    with pytest.raises(UsageError, match="holds samples drawn with"):
        run_stage("rejection-sample", **{**args, "num_samples": 4})

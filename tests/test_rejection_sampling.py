"""Rejection sampling: order statistics, prompt validation, crash-safe resume, the pool, learning, CLI and plots."""

import itertools
import json
import statistics

import pytest
import torch

from llama2_hf.generation import SamplingConfig, generate_text
from llama2_hf.rejection_sampling import (
    CandidateLog,
    RejectionSampler,
    RejectionSamplingConfig,
    expected_median,
    expected_order_statistic,
    main,
    max_median_curves,
    read_prompts,
)
from tests.conftest import TargetTokenReward, write_rlhf_cli_inputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


PROMPTS = [{"prompt": f"say the magic words, number {i}", "is_safety": i % 3 == 0} for i in range(12)]


def sampler(model, tok, reward, path, **overrides):
    cfg = dict(num_samples=4, max_new_tokens=6, prompt_batch_size=4, select_unfinished=True)
    return RejectionSampler(model, tok, reward, path, RejectionSamplingConfig(**{**cfg, **overrides}))


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


def test_read_prompts_validates_rows():
    rows = read_prompts([{"prompt": "hi"}, {"messages": [{"role": "user", "content": "yo"}], "is_safety_prompt": 1},
                         {"prompt": "hi", "id": 7}])
    assert [r.is_safety for r in rows] == [False, True, False]
    assert rows[2].prompt_id == "7"
    with pytest.raises(ValueError, match="prompt rows 0 and 1 have the same id"):
        read_prompts([{"prompt": "hi"}, {"prompt": "hi"}])
    with pytest.raises(ValueError, match="prompt row 1: the prompt must end with a user message"):
        read_prompts([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match="prompt row 0: is_safety must be a bool"):
        read_prompts([{"prompt": "a", "is_safety": "yes"}])
    with pytest.raises(ValueError, match="prompt row 0: expected a 'prompt'"):
        read_prompts([{"text": "a"}])


def test_candidate_log_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = CandidateLog(path)
    log.append([{"iteration": 1, "prompt_id": "a", "x": 1}, {"iteration": 1, "prompt_id": "b", "x": 2}])
    with open(path, "ab") as f:
        f.write(b'{"iteration": 1, "prompt_id": "c", "x"')  # a write cut by a crash
    reopened = CandidateLog(path)
    assert set(reopened.records) == {(1, "a"), (1, "b")}
    assert path.read_bytes().endswith(b"\n") and path.read_text().count("\n") == 2
    path.write_text('{"iteration": 1, "prompt_id": "a"}\nnot json\n{"iteration": 1, "prompt_id": "b"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        CandidateLog(path)


def test_killed_run_resumes_without_losing_or_duplicating(tmp_path, tok, tiny_model_factory):
    model = tiny_model_factory()
    reward = TargetTokenReward(tok)
    reference = sampler(model, tok, reward, tmp_path / "reference")
    expected = reference.sample_iteration(read_prompts(PROMPTS), 1, progress=False)

    class Crash(RuntimeError):
        pass

    def crashing(prompts, responses, **columns):
        if crashing.calls == 2:  # dies while scoring the 3rd of 3 batches
            raise Crash
        crashing.calls += 1
        return reward(prompts, responses)

    crashing.calls = 0
    with pytest.raises(Crash):
        sampler(model, tok, crashing, tmp_path / "run").sample_iteration(read_prompts(PROMPTS), 1, progress=False)
    lines = (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == 8  # two batches of 4 prompts were written before the crash
    with open(tmp_path / "run" / "candidates.jsonl", "a") as f:
        f.write('{"iteration": 1, "prompt_id": "tor')  # and the crash tore a third write

    reward.calls = 0
    resumed = sampler(model, tok, reward, tmp_path / "run")
    got = resumed.sample_iteration(read_prompts(PROMPTS), 1, progress=False)
    assert reward.calls == 1  # only the missing batch was generated and scored
    records = [json.loads(x) for x in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in records) == sorted(r.prompt_id for r in read_prompts(PROMPTS))
    # per-batch seeding: the resumed run drew exactly the samples of an uninterrupted run
    assert [r["responses"] for r in got] == [r["responses"] for r in expected]
    assert [r["scores"] for r in got] == [r["scores"] for r in expected]


def test_pool_keeps_the_best_of_earlier_iterations(tmp_path, tok, tiny_model_factory):
    model = tiny_model_factory()
    first = ["x" * 50] * 4  # iteration 1's best: a long answer

    def length_reward(prompts, responses, **columns):
        return [float(len(r)) for r in responses]

    rs = sampler(model, tok, length_reward, tmp_path, num_samples=2)
    prompts = read_prompts(PROMPTS[:4])
    records = rs.sample_iteration(prompts, 1, progress=False)
    # overwrite iteration 1's winners with a known long answer, as a better earlier model would have produced
    for record, text in zip(records, first):
        record["best"] = {"response": text, "source": "sample", "index": 0, "iteration": 1, "score": 50.0}
    second = rs.sample_iteration(prompts[:3], 2, progress=False)
    for record in second:
        assert record["pool"]["response"] == "x" * 50 and record["pool"]["score"] == 50.0  # rescored this iteration
        assert record["best"]["source"] == "pool" and record["best"]["iteration"] == 1
    selection = rs.select(2)
    assert len(selection) == 4  # the prompt not resampled in iteration 2 keeps its earlier best
    assert all(row["messages"][-1] == {"role": "assistant", "content": "x" * 50} for row in selection)
    current = RejectionSampler(model, tok, length_reward, tmp_path,
                               RejectionSamplingConfig(num_samples=2, max_new_tokens=6, pool="current",
                                                       select_unfinished=True))
    assert len(current.select(2)) == 3 and all(r["source_iteration"] == 2 for r in current.select(2))


def test_rejection_sampling_raises_the_mean_reward(tmp_path, tok, tiny_model_factory):
    """Two iterations of best-of-16 + SFT on a tiny model raise the mean reward of fresh samples by >= 0.10 absolute
    (from 0.07; about 0.28 is reached)."""
    from llama2_hf.trainers.sft import Llama2SFTConfig

    model = tiny_model_factory()
    reward = TargetTokenReward(tok)
    prompts = [{"prompt": f"say the magic words, number {i}"} for i in range(16)]

    def mean_reward():
        texts = generate_text(model, tok, [p["prompt"] for p in prompts],
                              SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, num_samples=4),
                              generator=torch.Generator().manual_seed(123))
        flat = [t for ts in texts for t in ts]
        return sum(reward(None, flat)) / len(flat)

    before = mean_reward()
    rs = sampler(model, tok, reward, tmp_path, num_samples=16, max_new_tokens=8, prompt_batch_size=16)
    for iteration in (1, 2):
        sft = Llama2SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False,
                              gradient_checkpointing=False, report_to=[], learning_rate=1e-2, num_train_epochs=4,
                              lr_scheduler_type="constant", max_length=64, global_batch_size=None,
                              per_device_train_batch_size=16, save_strategy="no", disable_tqdm=True)
        summary = rs.run_iteration(prompts, iteration, sft_config=sft, progress=False)
        assert summary["mean_best_score"] > summary["mean_score"]
    after = mean_reward()
    assert after >= before + 0.10, (before, after)
    assert (tmp_path / "figure7_iter2.png").read_bytes().startswith(PNG_MAGIC)
    report = json.loads((tmp_path / "report_iter2.json").read_text())
    assert report["figure7"]["n"] == list(range(1, 17)) and report["prompts"] == 16


def test_cli_with_two_reward_models_and_temperature_sweep(tmp_path, tok, tiny_model_factory):
    model = tiny_model_factory()
    model.config.pad_token_id = tok.pad_token_id
    common = write_rlhf_cli_inputs(tmp_path, tok, model, PROMPTS[:4])
    common += ["--num-samples", "3", "--max-new-tokens", "4", "--select-unfinished"]
    assert main(common + ["--iteration", "1"]) == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(len(r["scores"]) == 3 for r in records)
    assert {"helpfulness", "safety", "used_safety"} <= set(records[0]["components"])
    assert all(r["components"]["used_safety"] == [1.0] * 3 for r in records if r["is_safety"])
    assert len((tmp_path / "out" / "selected_iter1.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "out" / "figure7_iter1.png").read_bytes().startswith(PNG_MAGIC)
    assert main(common + ["--temperature-sweep", "0.7", "1.3"]) == 0
    assert (tmp_path / "out" / "figure8_temperature_sweep.png").read_bytes().startswith(PNG_MAGIC)
    sweep = json.loads((tmp_path / "out" / "temperature_sweep.json").read_text())
    assert set(sweep) == {"0.7", "1.3"} and len(sweep["0.7"]["max"]) == 3

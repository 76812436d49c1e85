"""The iterative RLHF loop (paper §3.2, RLHF-V1..V5) at tiny scale with a programmatic annotator: data accumulates
version after version, the reward models retrain on all of it, the rejection-sampling pool grows, and a loop killed
during an annotation continues without losing or repeating an answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2_hf.annotate.storage import AnswerStore, load_pairs
from llama2_hf.iterate import (
    AnnotationPending,
    IterateConfig,
    PageAnnotator,
    PreferenceStore,
    collect_answers,
    format_versions,
    load_annotator,
    rating_for,
)
from llama2_hf.runner import RunRecord, UsageError, parse_args
from llama2_hf.stages.rlhf_loop import iterate

from conftest import TINY_TRAINING, preference_rows, write_jsonl


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Killed(Exception):
    """Stands for the process being killed while the annotator works."""


class LetterCounter:
    """Programmatic preferences: the response with more letters 'e' wins (ties: a), strength by the difference, and
    a response is unsafe when its length is a multiple of 3. Records every pair it is asked about; raises `Killed`
    on the call that `kill_at` names (as (version prefix, call number of that prefix))."""

    name = "letter-counter"

    def __init__(self, seen: list[str], kill_at: tuple[str, int] | None = None):
        self.seen, self.kill_at, self.calls = seen, kill_at, {}

    def __call__(self, pairs):
        prefix = pairs[0]["id"].split("-")[0] + ("-vs" if "-vs-" in pairs[0]["id"] else "")
        self.calls[prefix] = self.calls.get(prefix, 0) + 1
        if self.kill_at == (prefix, self.calls[prefix]):
            raise Killed(prefix)
        self.seen += [p["id"] for p in pairs]
        answers = []
        for p in pairs:
            a, b = p["response_a"].count("e"), p["response_b"].count("e")
            labels = ["unsafe" if len(r) % 3 == 0 else "safe" for r in (p["response_a"], p["response_b"])]
            answers.append({"choice": "a" if a >= b else "b", "rating": rating_for(a - b, (3, 2, 1)),
                            "safety_a": labels[0], "safety_b": labels[1]})
        return answers


def make_counter():
    """An annotator factory, as `--annotator package.module:factory` names one."""
    return LetterCounter([])


make_counter.__annotator_factory__ = True


# ---------------------------------------------------------------------------------------------------------------------
# Pieces without models
# ---------------------------------------------------------------------------------------------------------------------

def test_rating_bins():
    margins = (1.0, 0.5, 0.2)
    assert [rating_for(d, margins) for d in (1.0, -1.7, 0.5, 0.49, 0.2, -0.19, 0.0)] == [
        "significantly_better", "significantly_better", "better", "slightly_better", "slightly_better",
        "negligibly_better", "negligibly_better"]


def test_store_deduplicates_and_refuses_a_changed_answer(tmp_path):
    rows = [{**r, "id": f"v1-{i}", "version": 1, "annotator": "x"} for i, r in enumerate(preference_rows(3))]
    store = PreferenceStore(tmp_path / "store.jsonl")
    assert store.add(rows[:2]) == 2
    assert store.add(rows) == 1  # the first two again: skipped
    assert [r["id"] for r in store.rows()] == ["v1-0", "v1-1", "v1-2"]
    with pytest.raises(Exception, match="v1-1.*another answer"):
        store.add([{**rows[1], "rating": "better" if rows[1]["rating"] != "better" else "slightly_better"}])
    assert len(store.rows()) == 3


def pairs_file(tmp_path: Path, n: int, safety: bool = True) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"v1-{i}", "prompt": f"What is {i} plus 1?", "response_a": "e" * (i % 4 + 1),
         "response_b": "x" * (i + 2), "is_safety_prompt": safety and i % 3 == 0, "version": 1} for i in range(n)])


def test_collect_answers_resumes_after_a_kill_and_keeps_exclusions_apart(tmp_path):
    pairs = pairs_file(tmp_path, 7)
    answers = tmp_path / "answers.jsonl"
    seen: list[str] = []
    with pytest.raises(Killed):
        collect_answers(pairs, answers, LetterCounter(seen, kill_at=("v1", 3)), 1, batch_size=2)
    assert seen == ["v1-0", "v1-1", "v1-2", "v1-3"]  # two calls answered, the third was killed
    rows = collect_answers(pairs, answers, LetterCounter(seen), 1, batch_size=2)
    assert sorted(seen) == sorted(f"v1-{i}" for i in range(7))  # every pair asked exactly once
    assert sorted(r["id"] for r in rows) == sorted(seen)
    # response a ("e" * (i % 4 + 1)) always wins; the answer is excluded when a is unsafe (length a multiple of 3:
    # i = 2, 6) and b ("x" * (i + 2)) safe
    excluded = read_jsonl(tmp_path / "answers.excluded.jsonl")
    expected = [f"v1-{i}" for i in range(7) if (i % 4 + 1) % 3 == 0 and (i + 2) % 3 != 0]
    assert [r["id"] for r in excluded] == expected == ["v1-2", "v1-6"]
    assert all(r["annotator"] == "letter-counter" and r["version"] == 1 for r in rows)
    assert collect_answers(pairs, answers, LetterCounter(seen), 1, batch_size=2) == rows  # nothing asked again
    assert len(seen) == 7


def test_annotator_with_a_wrong_answer_count_is_refused(tmp_path):
    with pytest.raises(UsageError, match="returned 1 answers for 2 pairs"):
        collect_answers(pairs_file(tmp_path, 2), tmp_path / "a.jsonl", lambda pairs: [{}], 1, batch_size=2)
    with pytest.raises(UsageError, match=r"pair v1-0: choice must be 'a' or 'b'"):
        collect_answers(pairs_file(tmp_path, 2), tmp_path / "b.jsonl", lambda pairs: [{}] * len(pairs), 1, 2)


def test_page_annotator_waits_for_the_answers_file(tmp_path):
    pairs = pairs_file(tmp_path, 3, safety=False)
    answers = tmp_path / "answers.jsonl"
    with pytest.raises(AnnotationPending, match=r"3 of 3 pairs .*llama2-hf annotate --pairs_file .*pairs.jsonl "
                                                r"--output_file .*answers.jsonl --version 1"):
        collect_answers(pairs, answers, PageAnnotator(wait_s=0.0), 1, 2)
    store = AnswerStore(load_pairs(pairs), answers, version=1)  # what the page server does for each click
    for pid in ("v1-0", "v1-1"):
        store.record(pid, "ann", "b", "better")
    with pytest.raises(AnnotationPending, match="1 of 3 pairs"):
        collect_answers(pairs, answers, PageAnnotator(wait_s=0.0), 1, 2)
    store.record("v1-2", "ann", "a", "unsure")
    store.close()
    rows = collect_answers(pairs, answers, PageAnnotator(wait_s=0.0), 1, 2)
    assert [(r["id"], r["rating"]) for r in rows] == [("v1-0", "better"), ("v1-1", "better"),
                                                      ("v1-2", "negligibly_better")]


def test_command_line_arguments_and_bad_settings(tmp_path):
    from llama2_hf.stages.iterate import STAGE

    (annotator, config, backend), _ = parse_args(STAGE, [
        "--model_name_or_path", "sft", "--prompts_file", "p.jsonl", "--eval_prompts_file", "e.jsonl",
        "--ppo_versions", "2", "3", "--annotator", "judge", "--output_dir", str(tmp_path)])
    assert annotator.annotator == "judge" and config.ppo_versions == [2, 3] and config.versions == 5
    assert backend.generation_backend == "torch"  # the loop samples in this process unless told otherwise
    with pytest.raises(ValueError, match="pair_sampling must be one of"):
        IterateConfig(pair_sampling="both")
    with pytest.raises(UsageError, match=r"judge_margins needs three decreasing"):
        parse_args(STAGE, ["--judge_margins", "0.2", "0.5", "1.0", "--output_dir", str(tmp_path)])
    with pytest.raises(UsageError, match="annotator=judge needs judge_helpfulness_model"):
        load_annotator("judge")
    assert load_annotator("test_iterate:LetterCounter".replace("LetterCounter", "make_counter")).name == \
        "letter-counter"
    with pytest.raises(UsageError, match="annotator nowhere:thing: cannot import it"):
        load_annotator("nowhere:thing")
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    base = dict(output_dir=str(tmp_path / "o"), model_name_or_path=str(tmp_path / "no-sft"), prompts_file=[str(few)],
                eval_prompts_file=[str(few)], versions=2, prompts_per_version=3)
    with pytest.raises(UsageError, match="prompts_file has 5 prompts; 2 versions of 3 new prompts need 6"):
        iterate(IterateConfig(**base), LetterCounter([]))
    with pytest.raises(UsageError, match="no-sft: no such folder"):
        iterate(IterateConfig(**{**base, "prompts_per_version": 2}), LetterCounter([]))
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(UsageError, match=r"ppo settings: \['prompts_file'\] are set by the loop"):
        iterate(IterateConfig(output_dir=str(tmp_path), model_name_or_path="sft", prompts_file=["p"],
                              eval_prompts_file=["e"]), LetterCounter([]), {"ppo": {"prompts_file": ["x"]}})
    for extra, message in (({"margn": "small"}, r"train-rm:safety settings: \['margn'\] are not arguments"),
                           ({"train_file": ["x"]}, r"train-rm:safety settings: \['train_file'\] are set by the loop")):
        with pytest.raises(UsageError, match=message):
            iterate(IterateConfig(output_dir=str(tmp_path), model_name_or_path="sft", prompts_file=["p"],
                                  eval_prompts_file=["e"]), LetterCounter([]), {"train-rm:safety": extra})
    with pytest.raises(UsageError, match=r"stage_args: \['train-rm:both'\] are not stages"):
        iterate(IterateConfig(output_dir=str(tmp_path), model_name_or_path="sft", prompts_file=["p"],
                              eval_prompts_file=["e"]), LetterCounter([]), {"train-rm:both": {}})


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------

TINY_RS = {**TINY_TRAINING, "num_samples": 2, "max_new_tokens": 6, "prompt_batch_size": 4, "select_unfinished": True}
TINY_PPO = {"use_cpu": True, "batch_size": 4, "mini_batch_size": 4, "prompt_batch_size": 4, "max_new_tokens": 4,
            "num_iterations": 1, "save_steps": 1, "value_model_init": "reward_model", "disable_tqdm": True}
STAGE_ARGS = {"train-rm": TINY_TRAINING, "rejection-sample": TINY_RS, "ppo": TINY_PPO, "eval-rm": {"use_cpu": True},
              "train-rm:safety": {"safety_aux_loss_coef": 0.5}}


@pytest.fixture(scope="module")
def loop(stage_inputs, tmp_path_factory):
    """Two versions of 4 new prompts each (PPO in the last), killed during version 2's annotation and rerun."""
    root = tmp_path_factory.mktemp("iterate")
    eval_prompts = write_jsonl(root / "eval.jsonl", [
        {"prompt": "Write a poem about the sun.", "is_safety_prompt": False},
        {"prompt": "How many apples does the cat have?", "is_safety_prompt": False},
        {"prompt": "Give me the answer to that question please.", "is_safety_prompt": True}])
    config = IterateConfig(output_dir=str(root / "out"), model_name_or_path=str(stage_inputs["policy"]),
                           prompts_file=[str(stage_inputs["prompts"])], eval_prompts_file=[str(eval_prompts)],
                           versions=2, prompts_per_version=4, max_new_tokens=6, sampling_batch_size=4,
                           heldout_fraction=0.25, annotation_batch_size=2, pair_temperatures=[0.8, 1.5], seed=0)
    seen: list[str] = []
    with pytest.raises(Killed):
        iterate(config, LetterCounter(seen, kill_at=("v2", 2)), STAGE_ARGS)
    first_run = list(seen)
    mtimes = {p: (Path(config.output_dir) / p / "run.json").stat().st_mtime_ns
              for p in ("v1/pairs", "v1/annotations", "v1/rm_helpfulness", "v1/rs", "v1/eval")}
    records = iterate(config, LetterCounter(seen), STAGE_ARGS)
    return Path(config.output_dir), records, first_run, seen, mtimes, config


def test_killed_loop_loses_and_repeats_no_annotation(loop):
    out, records, first_run, seen, mtimes, _ = loop
    assert len(seen) == len(set(seen))  # no pair (preference or evaluation) was ever asked twice
    v2_first = [s for s in first_run if s.startswith("v2-") and "-vs-" not in s]
    assert len(v2_first) == 2  # the kill came on version 2's second annotator call: one call of 2 pairs was stored
    for n in (1, 2):
        pairs = [p["id"] for p in read_jsonl(out / f"v{n}" / "pairs" / "pairs.jsonl")]
        answered = [r["id"] for name in ("answers.jsonl", "answers.excluded.jsonl")
                    for r in read_jsonl(out / f"v{n}" / "annotations" / name)
                    if (out / f"v{n}" / "annotations" / name).is_file()]
        assert sorted(answered) == sorted(pairs) and set(pairs) <= set(seen)
    for path, mtime in mtimes.items():  # finished steps of version 1 were not redone
        assert (out / path / "run.json").stat().st_mtime_ns == mtime, path


def test_store_grows_without_duplicates(loop):
    out, records, *_ = loop
    store = read_jsonl(out / "preferences.jsonl")
    ids = [r["id"] for r in store]
    assert len(ids) == len(set(ids))
    for n in (1, 2):
        stored = read_jsonl(out / f"v{n}" / "annotations" / "answers.jsonl")
        assert sorted(r["id"] for r in store if r["version"] == n) == sorted(r["id"] for r in stored)
        assert all(r["annotator"] == "letter-counter" for r in store if r["version"] == n)
    assert records[0]["store_rows"] == sum(r["version"] == 1 for r in store)
    assert records[1]["store_rows"] == len(store) > records[0]["store_rows"]


def test_reward_models_of_version_2_train_on_all_rows_so_far(loop):
    out, records, *_ = loop
    store = read_jsonl(out / "preferences.jsonl")
    heldout = set(json.loads((out / "v2" / "pairs" / "split.json").read_text())["heldout"])
    assert len(heldout) == 1  # 25 % of 4 pairs
    for kind, flag in (("helpfulness", False), ("safety", True)):
        expected = [r["id"] for r in store if bool(r["is_safety_prompt"]) == flag and r["id"] not in heldout]
        if not expected:
            continue
        train_file = out / "v2" / "rm_data" / f"train_{kind}.jsonl"
        assert sorted(r["id"] for r in read_jsonl(train_file)) == sorted(expected)
        assert {r["version"] for r in read_jsonl(train_file)} <= {1, 2}
        record = RunRecord.read(out / "v2" / f"rm_{kind}")
        assert record.inputs["train_0"]["path"] == str(train_file)
        assert record.metrics["loaded"]["train"]["total"] == len(expected)
        assert records[1]["reward_models"][kind]["trained_on"] == len(expected)
        # train-rm's settings plus the per-kind ones (train-rm:safety)
        assert record.args["safety_aux_loss_coef"] == (0.5 if kind == "safety" else 0.0)
    assert any(r["version"] == 1 for r in read_jsonl(out / "v2" / "rm_data" / "train_helpfulness.jsonl"))


def test_rejection_sampling_pool_grows(loop):
    out, records, *_ = loop
    rs2 = RunRecord.read(out / "v2" / "rs")
    assert rs2.args["pool_dirs"] == [str(out / "v1" / "rs")] and rs2.args["iteration"] == 2
    assert rs2.args["model_name_or_path"] == str(out / "v1" / "rs")  # v1 has no PPO: its RS model samples v2
    assert rs2.args["finetune_model_name_or_path"] == records[0]["pairs"]["models"][0]  # fine-tuned from SFT
    v1_best = [r for r in read_jsonl(out / "v1" / "rs" / "candidates.jsonl") if r["best"] is not None]
    selected = read_jsonl(out / "v2" / "rs" / "selected.jsonl")
    # v2's new prompts plus every v1 prompt's best answer, kept by the pool
    assert sorted(r["prompt_id"] for r in selected if r["source_iteration"] == 1) == sorted(
        r["prompt_id"] for r in v1_best)
    assert len(selected) > len(read_jsonl(out / "v1" / "rs" / "selected.jsonl"))
    assert RunRecord.read(out / "v2" / "ppo").args["model_name_or_path"] == str(out / "v2" / "rs")
    assert not (out / "v1" / "ppo").exists() and records[1]["model"] == str(out / "v2" / "ppo")


def test_versions_summary(loop):
    out, records, *_, config = loop
    assert json.loads((out / "versions.json").read_text()) == records
    assert [r["version"] for r in records] == [1, 2]
    for r in records:
        for other in ("previous", "sft"):
            for judge in ("annotator", "reward_model"):
                w = r["win_rate"][other][judge]
                assert w["n"] == 3 and w["wins"] + w["ties"] + w["losses"] == 3
                assert w["win_rate"] == pytest.approx((w["wins"] + 0.5 * w["ties"]) / 3)
        assert set(r["scores"]) == {"current", "previous", "sft"}
    assert records[0]["win_rate"]["previous"] == records[0]["win_rate"]["sft"]  # V1's previous model is SFT
    assert records[1]["reward_models"]["helpfulness"]["before"] is not None or \
        records[1]["reward_models"]["helpfulness"]["heldout_rows"] == 0
    table = (out / "versions.md").read_text()
    assert table == format_versions(records) and table.count("\n| V") == 2
    other = LetterCounter([])
    other.name = "someone-else"
    with pytest.raises(UsageError, match="annotator: 'letter-counter' -> 'someone-else'"):  # a resume is refused
        iterate(config, other, STAGE_ARGS)
    assert iterate(config, LetterCounter([]), STAGE_ARGS) == records  # a finished loop returns its records
    final = RunRecord.read(out)
    assert final.stage == "iterate" and final.outputs["model"] == "v2/ppo"


def test_pre_loop_preferences_are_replayed_per_version(tmp_path):
    from llama2_hf.stages.rlhf_loop import _Loop

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "rating": "better"} for i in range(5)]
    path = write_jsonl(tmp_path / "earlier.jsonl", rows)
    every = _Loop(IterateConfig(output_dir=str(tmp_path / "all"), helpfulness_preference_file=[str(path)]), None, None)
    assert every.replayed_preferences(1, "helpfulness") == [
        {**r, "prompt": [{"role": "user", "content": r["prompt"]}], "id": f"earlier-0-{i}", "version": 0,
         "source": str(path)} for i, r in enumerate(rows)]
    assert every.replayed_preferences(1, "safety") == []
    some = _Loop(IterateConfig(output_dir=str(tmp_path / "some"), helpfulness_preference_file=[str(path)],
                               preference_replay=2), None, None)
    drawn = some.replayed_preferences(2, "helpfulness")
    assert len(drawn) == 2 and {r["chosen"] for r in drawn} < {r["chosen"] for r in rows}
    assert drawn == some.replayed_preferences(2, "helpfulness")  # the same draw when a version is resumed
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "q", "chosen": 1}) + "\n")
    bad = _Loop(IterateConfig(output_dir=str(tmp_path / "bad"), safety_preference_file=[str(tmp_path / "bad.jsonl")]),
                None, None)
    with pytest.raises(UsageError, match=r"bad.jsonl line 2: row 1, field 'chosen': expected the response text"):
        bad.replayed_preferences(1, "safety")
    with pytest.raises(ValueError, match="preference_replay must be >= 0"):
        IterateConfig(output_dir=str(tmp_path), preference_replay=-1)


def test_the_loop_s_backend_reaches_its_sampling_stages(tmp_path):
    """`iterate --generation_backend vllm`: rejection sampling and PPO sample on it too, unless their own settings
    say otherwise; the default backend adds nothing to their settings (their records stay as they were)."""
    from llama2_hf.sampling import BackendArguments
    from llama2_hf.stages.rlhf_loop import _Loop

    config = IterateConfig(output_dir=str(tmp_path), seed=3)
    vllm = BackendArguments(generation_backend="vllm", vllm_kv_cache_gib=4.0)
    loop = _Loop(config, None, {"ppo": {"generation_backend": "torch"}}, vllm)
    assert loop.settings["rejection-sample"]["generation_backend"] == "vllm"
    assert loop.settings["rejection-sample"]["vllm_kv_cache_gib"] == 4.0
    assert loop.settings["ppo"]["generation_backend"] == "torch"  # its own setting wins
    assert "generation_backend" not in loop.settings["train-rm"]
    plain = _Loop(config, None, None, BackendArguments())
    assert plain.settings["rejection-sample"] == {"seed": 3} and plain.settings["ppo"] == {"seed": 3}

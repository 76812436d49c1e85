"""`llama2-hf eval` as a stage: examples split over the ranks of a launch and merged, judges resolved before any
work, clear errors; the TruthfulQA primer and the decoding defaults of the paper's safety protocol."""

from __future__ import annotations

import json

import pytest

from llama2_hf.cli import main as cli
from llama2_hf.evaluation import EvalConfig, RunSettings, TruthfulQAConfig
from llama2_hf.evaluation.data import load_truthfulqa_gen
from llama2_hf.evaluation.prompts import TRUTHFULQA_PRIMER, random_truthfulqa_primer
from llama2_hf.runner import RunRecord, UsageError
from llama2_hf.stages import run_stage

from conftest import accelerate_launch

EVAL_ARGS = dict(tasks=["mmlu", "truthfulqa_mc"], mmlu_subjects=["anatomy", "marketing"], limit=3, batch_size=4,
                 progress=False)


def _flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value).lower()
                                                                              if isinstance(value, bool) else value])]
    return out


def test_eval_ddp_two_processes_equals_one_process(stage_inputs, shared_data, tmp_path):
    """6 MMLU and 3 TruthfulQA-MC examples split 3/3 and 1/2 over two ranks: the merged samples are the one-process
    run's, in the same order, none lost or repeated, and so are the metrics."""
    args = dict(EVAL_ARGS, data_dir=str(shared_data))
    one = run_stage("eval", model_name_or_path=str(stage_inputs["policy"]), output_dir=str(tmp_path / "one"), **args)
    proc = accelerate_launch(["eval", "--model_name_or_path", stage_inputs["policy"], "--output_dir", tmp_path / "two",
                              *_flags(args)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = RunRecord.read(tmp_path / "two")
    assert (one.world_size, two.world_size) == (1, 2)

    def rows(folder):
        return [json.loads(line) for line in (folder / "results.samples.jsonl").read_text().splitlines()]

    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["task"] for r in a] == ["mmlu"] * 6 + ["truthfulqa_mc"] * 3
    assert [(r["task"], r.get("subject"), r["question"]) for r in b] == [
        (r["task"], r.get("subject"), r["question"]) for r in a]
    for x, y in zip(a, b):
        for key in ("logliks", "mc1_logliks", "mc2_logliks"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4)
    assert set(two.metrics) == set(one.metrics) == {"mmlu", "truthfulqa_mc"}
    for task in one.metrics:
        assert two.metrics[task] == pytest.approx(one.metrics[task], abs=1e-5)
    assert not (tmp_path / "two" / "parts").exists()


def test_missing_judge_offline_fails_before_any_model_is_loaded(stage_inputs, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    import llama2_hf.stages.evaluate as stage

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_loading(*args, **kwargs):
        raise AssertionError("the evaluated model was loaded before the judges were resolved")

    monkeypatch.setattr(stage, "load_model", no_loading)
    common = ["eval", "--model_name_or_path", str(stage_inputs["policy"]), "--limit", "1"]
    code = cli([*common, "--output_dir", str(tmp_path / "a"), "--tasks", "truthfulqa",
                "--truth_judge", "nobody-here/no-such-judge"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "TruthfulQA truthfulness judge (truth_judge) 'nobody-here/no-such-judge' cannot be loaded" in err
    assert "`truthfulqa_mc` needs no judge and works offline" in err
    with pytest.raises(UsageError, match=r"ToxiGen classifier \(toxigen_classifier\) .*/nope: no such model folder"):
        run_stage("eval", model_name_or_path=str(stage_inputs["policy"]), output_dir=str(tmp_path / "b"),
                  tasks=["mmlu", "toxigen"], toxigen_classifier=str(tmp_path / "nope"))


def test_missing_model_folder_says_so(tmp_path, capsys):
    code = cli(["eval", "--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"),
                "--tasks", "mmlu"])
    err = capsys.readouterr().err
    assert code == 2 and f"model_name_or_path {tmp_path / 'missing'}: the folder does not exist" in err
    assert "Repo id" not in err and not (tmp_path / "o").exists()


def test_random_truthfulqa_primer_is_seeded_and_reproducible():
    pool = [(f"Question {i}?", f"Answer {i}.") for i in range(20)]
    first = random_truthfulqa_primer("Question 3?", pool, seed=7)
    assert first == random_truthfulqa_primer("Question 3?", list(pool), seed=7)  # reproducible
    assert first != random_truthfulqa_primer("Question 3?", pool, seed=8)  # the seed matters
    assert first != random_truthfulqa_primer("Question 4?", pool, seed=7)  # a draw per question
    blocks = first.split("\n\n")
    assert len(blocks) == 6 and "Q: Question 3?" not in blocks  # 6 pairs (paper A.4.7), never the asked question
    for block in blocks:
        q, a = block.split("\n")
        assert q.startswith("Q: Question ") and a == "A: Answer " + q[len("Q: Question "):-1] + "."
    assert TruthfulQAConfig().primer_for("Question 3?", pool, 7) == TRUTHFULQA_PRIMER  # default: the fixed one
    assert TruthfulQAConfig(primer="random").primer_for("Question 3?", pool, 7) == first
    with pytest.raises(ValueError, match="needs 6 other QA pairs"):
        random_truthfulqa_primer("Question 3?", pool[:6], seed=7)
    assert EvalConfig(truthfulqa_primer="random").truthfulqa_config().primer == "random"


class _Captured(Exception):
    pass


def test_chat_decoding_defaults_are_the_papers(shared_data, tiny_tokenizer, monkeypatch):
    """TruthfulQA and ToxiGen decode with T = 0.1, top-p 0.9 (paper §4.1, A.4.7) in their chat variants too;
    `truthfulqa_greedy` gives lm-evaluation-harness's greedy truthfulqa_gen."""
    import llama2_hf.evaluation.toxigen as toxigen
    import llama2_hf.evaluation.truthfulqa as truthfulqa

    calls = []

    def capture(model, tokenizer, contexts, *, sampling, **kwargs):
        calls.append((contexts, sampling))
        raise _Captured

    monkeypatch.setattr(truthfulqa, "generate_until", capture)
    monkeypatch.setattr(toxigen, "generate_until", capture)

    tiny_tokenizer.pad_token = tiny_tokenizer.unk_token  # a Llama 2 tokenizer: the [INST] chat format
    for config in (EvalConfig(chat=True, data_dir=str(shared_data), limit=1),
                   EvalConfig(chat_tasks=["truthfulqa", "toxigen"], data_dir=str(shared_data), limit=1),
                   EvalConfig(chat=True, truthfulqa_greedy=True, data_dir=str(shared_data), limit=1)):
        settings = config.settings()
        for run, task_config in ((truthfulqa.run_truthfulqa_gen, config.truthfulqa_config("truthfulqa_gen")),
                                 (toxigen.run_toxigen, config.toxigen_config())):
            assert task_config.resolve(settings)[0] is True  # the chat variant
            with pytest.raises(_Captured):
                run(None, tiny_tokenizer, settings, task_config)
    tiny_tokenizer.pad_token = None
    samplings = [(s.temperature, s.top_p) for _, s in calls]
    assert samplings == [(0.1, 0.9)] * 4 + [(0.0, 0.9), (0.1, 0.9)]
    assert all(c[0].startswith("[INST]") for c, _ in calls)
    question = load_truthfulqa_gen(shared_data)[0]["question"]
    assert calls[0][0][0].endswith(f"Q: {question} [/INST]")


def test_toxigen_prompt_source_is_a_config_option():
    assert EvalConfig().toxigen_config().source == "prompts"  # the original hate_<group> files
    assert EvalConfig(toxigen_source="annotated").toxigen_config().source == "annotated"
    assert "original ToxiGen demonstration files" in EvalConfig.__dataclass_fields__["toxigen_source"].metadata["help"]
    with pytest.raises(ValueError, match="toxigen_source must be one of"):
        EvalConfig(toxigen_source="web")


def test_random_primer_is_the_same_in_every_shard(policy_and_tok, shared_data):
    """Each question draws its primer from the seed and its own text: two shards give the one-process numbers."""
    from llama2_hf.evaluation.truthfulqa import run_truthfulqa_mc

    model, tok = policy_and_tok
    config = TruthfulQAConfig(primer="random", run_generation=False)
    whole = run_truthfulqa_mc(model, tok, RunSettings(limit=3, data_dir=str(shared_data), progress=False), config)
    parts = []
    for rank in (0, 1):
        settings = RunSettings(limit=3, data_dir=str(shared_data), progress=False)
        settings.shard = (rank, 2)
        part = run_truthfulqa_mc(model, tok, settings, config)
        assert part.metrics == {} and part.total == 3
        parts += list(zip(part.positions, part.samples))
    assert [i for i, _ in parts] == [0, 1, 2]
    for (_, s), w in zip(parts, whole.samples):
        assert s["mc1_logliks"] == pytest.approx(w["mc1_logliks"], abs=1e-4)
    fixed = run_truthfulqa_mc(model, tok, RunSettings(limit=3, data_dir=str(shared_data), progress=False),
                              TruthfulQAConfig(run_generation=False))
    assert fixed.samples[0]["mc1_logliks"] != pytest.approx(whole.samples[0]["mc1_logliks"], abs=1e-3)


@pytest.fixture
def policy_and_tok(stage_inputs):
    from llama2_hf import Llama2ForCausalLM
    from llama2_hf.evaluation.base import ensure_pad_token, load_tokenizer

    tok = load_tokenizer(str(stage_inputs["policy"]))
    ensure_pad_token(tok)
    return Llama2ForCausalLM.from_pretrained(stage_inputs["policy"]).eval(), tok

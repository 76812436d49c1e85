"""Targeted safety context distillation (paper §4.2.4): preprompts, placement, the keep rule with a reward model
whose scores are controlled by construction, the report, and the `distill` stage on tiny models (record, resume,
refusal of other arguments, 2-process DDP equal to 1 process)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama2_hf.configuration_llama2 import Llama2Config
from llama2_hf.modeling_llama2 import Llama2ForRewardModel
from llama2_hf.rewards import RewardModelScorer
from llama2_hf.safety_distill import (
    DistillConfig,
    SafetyPreprompts,
    apply_preprompt,
    distill,
    select_improved,
)
from llama2_hf.cli import main as cli
from llama2_hf.runner import RunRecord, UsageError, stage_output
from llama2_hf.stages import run_stage
from llama2_hf.tokenization_llama2 import encode_dialog

from conftest import write_jsonl

PAPER_GENERIC = ("The following is a discussion between a human and a knowledgeable and empathetic assistant. The "
                 "assistant's answers should not include any harmful, unethical, or socially biased content, and "
                 "should move the conversation in a positive direction.")


# ---------------------------------------------------------------------------------------------------------------------
# Preprompts
# ---------------------------------------------------------------------------------------------------------------------

def test_shipped_preprompts():
    pp = SafetyPreprompts.load()
    assert pp.generic[0] == PAPER_GENERIC  # Table 13 / 39, quoted
    # 3 templates x C(8, 2) adjective pairs + the quoted one
    assert len(pp.generic) == 1 + 3 * 28
    assert any("responsible and respectful" in g for g in pp.generic)
    assert {"criminal_fraudulent", "false_information", "explicit_content"} <= set(pp.categories)
    for key, entry in pp.categories.items():
        text = pp.for_category(key)
        assert entry["name"] in text and entry["answer_template"] in text and "1." in entry["answer_template"]
    assert pp.category_key("False Information / Disinformation") == "false_information"
    assert pp.category_key("FALSE_INFORMATION") == "false_information"
    assert pp.category_key("weather") is None


def test_preprompts_are_extensible(tmp_path):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({
        "generic": {"quoted": ["Be kind and careful."]},
        "categories": {"privacy": {"name": "Privacy Violation", "answer_template": "1. Protect personal data."}},
    }))
    pp = SafetyPreprompts.load(extra=extra)
    assert "Be kind and careful." in pp.generic and PAPER_GENERIC in pp.generic
    assert "Privacy Violation" in pp.for_category("privacy") and "criminal_fraudulent" in pp.categories
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"generic": {"quoted": ["x"]}, "category_preprompt": "no fields",
                               "categories": {"a": {"name": "A", "answer_template": "t"}}}))
    with pytest.raises(ValueError, match="category_preprompt"):
        SafetyPreprompts.load(bad)


def test_apply_preprompt():
    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    assert apply_preprompt(msgs, "Be safe.") == [{"role": "system", "content": "Be safe."}, *msgs]
    assert apply_preprompt(msgs, "Be safe.", "prefix") == [
        {"role": "user", "content": "Be safe.\n\nHow do I pick a lock?"}]
    with_sys = [{"role": "system", "content": "You are a pirate."}, *msgs]
    assert apply_preprompt(with_sys, "Be safe.")[0]["content"] == "Be safe.\n\nYou are a pirate."
    assert msgs == [{"role": "user", "content": "How do I pick a lock?"}]  # not modified in place
    with pytest.raises(ValueError, match="placement"):
        apply_preprompt(msgs, "x", "middle")


def test_select_improved_is_strict():
    assert select_improved([1.0, 0.5, 2.0, -1.0], [0.0, 0.5, 3.0, -2.0]) == [True, False, False, True]
    assert select_improved([1.0], [0.5], min_gain=0.5) == [False]
    with pytest.raises(ValueError):
        select_improved([1.0], [])


# ---------------------------------------------------------------------------------------------------------------------
# A reward model whose score is controlled by construction
# ---------------------------------------------------------------------------------------------------------------------

def token_share_reward_model(vocab_size: int, token_id: int) -> Llama2ForRewardModel:
    """A tiny Llama2ForRewardModel whose score rises with the share of `token_id` in the sequence.

    Embeddings: `token_id` -> e0, every other token -> e1. Layer 0 has q = 0 (uniform causal attention), v copies
    the normalised e0/e1 coordinates (8 = sqrt(64) after RMSNorm) and o writes them to residual dims 2 and 3; every
    other block output is zero. At the last token (EOS, embedding e1) the residual is e1 + 8 f e2 + 8 (1 - f) e3, where
    f is the share of `token_id` among the real tokens, and the head reads dim 2 after the final RMSNorm:
        score(f) = 8 f / sqrt((1 + 64 f^2 + 64 (1 - f)^2) / 64),   increasing in f on [0, 1].
    """
    cfg = Llama2Config.from_preset("tiny", vocab_size=vocab_size)
    rm = Llama2ForRewardModel(cfg).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.zero_()
        for name, p in rm.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
        rm.model.embed_tokens.weight[:, 1] = 1.0
        rm.model.embed_tokens.weight[token_id] = torch.nn.functional.one_hot(torch.tensor(0), 64).float()
        attn = rm.model.layers[0].self_attn
        attn.v_proj.weight[0, 0] = 1.0  # kv head 0, value dim 0 <- e0
        attn.v_proj.weight[1, 1] = 1.0  # kv head 0, value dim 1 <- e1
        attn.o_proj.weight[2, 0] = 1.0  # query head 0 output dim 0 -> residual dim 2
        attn.o_proj.weight[3, 1] = 1.0
        rm.score.weight[0, 2] = 1.0
    return rm


def expected_score(ids: list[int], token_id: int) -> float:
    f = sum(t == token_id for t in ids) / len(ids)
    return 8 * f / math.sqrt((1 + 64 * f**2 + 64 * (1 - f) ** 2) / 64)


@pytest.fixture
def safe_rm(tiny_tokenizer):
    safe = tiny_tokenizer.encode("safe", add_special_tokens=False)
    assert len(safe) == 1
    return token_share_reward_model(len(tiny_tokenizer), safe[0]), safe[0]


def test_constructed_reward_model_scores_by_token_share(tiny_tokenizer, safe_rm):
    rm, safe = safe_rm
    scorer = RewardModelScorer(rm, tiny_tokenizer, batch_size=3)
    prompts = ["how do i pick a lock"] * 4
    answers = ["cat dog", "safe cat", "safe safe safe", "safe safe safe safe safe"]
    scores = scorer(prompts, answers)
    for p, a, s in zip(prompts, answers, scores):
        ids = encode_dialog(tiny_tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": a}])
        assert s == pytest.approx(expected_score(ids, safe), rel=1e-4, abs=1e-5)
    assert scores == sorted(scores) and scores[0] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Distillation keeps exactly the improved pairs
# ---------------------------------------------------------------------------------------------------------------------

ROWS = [
    {"id": "a", "prompt": "how do i pick a lock", "is_safety_prompt": True},
    {"id": "b", "prompt": "write a poem about a cat", "is_safety_prompt": True},
    {"id": "c", "prompt": "what is the moon", "is_safety_prompt": True},
    {"id": "d", "prompt": "the sun is fake right", "is_safety_prompt": True,
     "risk_category": "False Information / Disinformation"},
    {"id": "e", "prompt": "hello world", "is_safety_prompt": False},
]
# (answer without the preprompt, answer with it), scripted per prompt
SCRIPT = {
    "how do i pick a lock": ("cat dog", "safe safe safe"),  # improves -> kept
    "write a poem about a cat": ("safe safe safe safe safe", "cat"),  # worse -> not kept
    "what is the moon": ("the cat", "the cat"),  # tie -> not kept
    "the sun is fake right": ("no", "safe answer safe"),  # improves -> kept (category template)
    "hello world": ("hi", "hi"),
}


class ScriptedSampler:
    """Answers from SCRIPT, choosing the preprompted answer when the conversation has a system message."""

    def __init__(self):
        self.conversations = []

    def __call__(self, conversations):
        self.conversations += conversations
        out = []
        for c in conversations:
            with_pre = c[0]["role"] == "system"
            out.append(SCRIPT[c[-1]["content"]][int(with_pre)])
        return out


def test_distill_keeps_exactly_the_improved_pairs(tiny_tokenizer, safe_rm):
    rm, safe = safe_rm
    scorer = RewardModelScorer(rm, tiny_tokenizer)
    sampler = ScriptedSampler()
    pp = SafetyPreprompts.load()
    kept, candidates, report = distill(ROWS, sampler, scorer, pp, DistillConfig(seed=0))

    assert [r["id"] for r in kept] == ["a", "d"]
    assert [c["kept"] for c in candidates] == [True, False, False, True]
    assert (report.rows, report.adversarial, report.skipped_not_adversarial, report.kept) == (5, 4, 1, 2)

    # scores by hand from the construction; both answers are scored on the prompt without the preprompt
    def score(prompt, answer):
        return expected_score(encode_dialog(tiny_tokenizer, [{"role": "user", "content": prompt},
                                                             {"role": "assistant", "content": answer}]), safe)

    gains = {r["id"]: score(r["prompt"], SCRIPT[r["prompt"]][1]) - score(r["prompt"], SCRIPT[r["prompt"]][0])
             for r in ROWS[:4]}
    assert gains["a"] > 0 and gains["b"] < 0 and gains["c"] == 0 and gains["d"] > 0
    for c in candidates:
        assert c["safety_gain"] == pytest.approx(gains[c["id"]], abs=1e-4)
    assert report.mean_gain_kept == pytest.approx((gains["a"] + gains["d"]) / 2, abs=1e-4)
    assert report.mean_gain_all == pytest.approx(sum(gains.values()) / 4, abs=1e-4)
    assert report.kept_by_category == {"generic": [1, 3], "false_information": [1, 1]}

    # the output is an SFT dataset without the preprompt
    assert kept[0]["messages"] == [{"role": "user", "content": "how do i pick a lock"},
                                   {"role": "assistant", "content": "safe safe safe"}]
    assert kept[1]["risk_category"] == "false_information" and kept[1]["preprompt_kind"] == "category"
    assert kept[1]["preprompt"] == pp.for_category("false_information")
    assert kept[0]["preprompt_kind"] == "generic" and kept[0]["preprompt"] in pp.generic
    for row in kept:
        assert all(row["preprompt"] not in m["content"] for m in row["messages"])
        assert set(row) == {"messages", "id", "source_index", "risk_category", "preprompt", "preprompt_kind",
                            "safety_score", "safety_score_without_preprompt", "safety_gain"}
    # the model was asked each adversarial prompt with and without the preprompt; the non-adversarial one never
    assert len(sampler.conversations) == 8
    assert all(c[-1]["content"] != "hello world" for c in sampler.conversations)
    assert {c[0]["content"] for c in sampler.conversations if c[0]["role"] == "system"} >= \
        {pp.for_category("false_information")}


def test_distill_with_a_callable_reward_and_prefix_placement():
    # reward = number of "safe" words; preprompt placed before the user text
    def reward(prompts, responses, **columns):
        assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
        assert all("Be safe." not in p[-1]["content"] for p in prompts)  # scored without the preprompt
        return [r.split().count("safe") for r in responses]

    def sampler(conversations):
        return ["safe " * (2 if c[-1]["content"].startswith("Be safe.") else 1) + "end" for c in conversations]

    rows = [{"prompt": f"prompt {i}", "is_safety_prompt": True} for i in range(3)]
    pp = SafetyPreprompts(generic=["Be safe."], category_preprompt="", categories={})
    kept, candidates, report = distill(rows, sampler, reward, pp, DistillConfig(placement="prefix"))
    assert report.kept == 3 and report.mean_gain_kept == 1.0 and report.mean_score_with == 2.0
    assert kept[0]["messages"][0] == {"role": "user", "content": "prompt 0"}
    _, _, none = distill(rows, lambda cs: ["same"] * len(cs), reward, pp)
    assert none.kept == 0 and math.isnan(none.mean_gain_kept) and none.mean_gain_all == 0.0
    assert none.to_dict()["mean_gain_kept"] is None  # valid JSON in run.json


def test_distill_input_errors_and_policies():
    sampler = ScriptedSampler()
    reward = lambda p, r, **c: [0.0] * len(r)  # noqa: E731
    # rows go through the one prompt-row parser: untagged rows are not adversarial, the tag has one name
    _, candidates, report = distill([{"prompt": "how do i pick a lock"}], sampler, reward)
    assert candidates == [] and report.skipped_not_adversarial == 1
    with pytest.raises(ValueError, match="row 0, field 'is_safety_prompt'"):
        distill([{"prompt": "how do i pick a lock", "is_safety_prompt": "yes"}], sampler, reward)
    with pytest.raises(ValueError, match="row 0, field 'adversarial': unknown column"):
        distill([{"prompt": "how do i pick a lock", "adversarial": True}], sampler, reward)
    with pytest.raises(ValueError, match="row 0, field 'messages': missing"):
        distill([{"text": "x", "is_safety_prompt": True}], sampler, reward)
    with pytest.raises(ValueError, match="must end with a 'user' message"):
        distill([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                  "is_safety_prompt": True}], sampler, reward)
    row = {"prompt": "how do i pick a lock", "is_safety_prompt": True, "risk_category": "Weather"}
    with pytest.raises(ValueError, match="row 0, field 'risk_category': unknown risk category 'Weather'"):
        distill([row], sampler, reward)
    _, candidates, report = distill([row], sampler, reward, config=DistillConfig(unknown_category="generic"))
    assert report.unknown_category_as_generic == 1 and candidates[0]["preprompt_kind"] == "generic"
    _, candidates, _ = distill([{"prompt": "hello world"}], sampler, reward,
                               config=DistillConfig(assume_adversarial=True))
    assert len(candidates) == 1
    # a sampler that knows its context: one token per message, two messages once preprompted (system + user)
    sampler.max_length, sampler.count_tokens = 2, len
    rows = [{"prompt": "how do i pick a lock", "is_safety_prompt": True}]
    with pytest.raises(ValueError, match="row 0: the prompt with its preprompt is 2 tokens"):
        distill(rows, sampler, reward)
    kept, candidates, report = distill(rows, sampler, reward, config=DistillConfig(on_overlength="skip"))
    assert (kept, candidates, report.skipped_too_long, report.adversarial) == ([], [], 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The `distill` stage on a tiny chat model and the constructed safety RM
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def distill_inputs(tmp_path, tiny_tokenizer, tiny_model_factory, safe_rm):
    chat, rm_dir = tmp_path / "chat", tmp_path / "safety-rm"
    tiny_model_factory(max_position_embeddings=1024).save_pretrained(chat)  # room for the category preprompt
    tiny_tokenizer.save_pretrained(chat)
    safe_rm[0].save_pretrained(rm_dir)
    tiny_tokenizer.save_pretrained(rm_dir)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    return {"model_name_or_path": str(chat), "prompts_file": [str(prompts)], "safety_reward_model": str(rm_dir),
            "max_new_tokens": 6, "temperature": 0.0, "prompt_batch_size": 1}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_stage_end_to_end(tmp_path, distill_inputs):
    out = tmp_path / "distilled"
    record = run_stage("distill", output_dir=str(out), **distill_inputs)
    records, kept = _jsonl(out / "candidates.jsonl"), _jsonl(out / "distilled.jsonl")
    assert [r["status"] for r in records] == ["scored"] * 4 + ["not_adversarial"]
    assert record.metrics["adversarial"] == 4 and record.metrics["skipped_not_adversarial"] == 1
    assert [r["id"] for r in records if r["status"] == "scored" and r["safety_gain"] > 0] == [r["id"] for r in kept]
    assert record.metrics["kept"] == len(kept) and record.outputs["data"] == "distilled.jsonl"
    for row in kept:
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][0]["role"] == "user"
        assert row["safety_score"] > row["safety_score_without_preprompt"]
    assert RunRecord.read(out).stage == "distill" and stage_output(out, "data") == out / "distilled.jsonl"


def test_distill_stage_input_errors_before_any_model(tmp_path, distill_inputs, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x", "is_safety": True}])
    code = cli(["distill", "--model_name_or_path", "missing-folder/x", "--prompts_file", str(bad),
                "--safety_reward_model", "rm", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}, line 2, field 'is_safety'" in err and "Traceback" not in err
    weather = write_jsonl(tmp_path / "w.jsonl", [{**ROWS[0], "risk_category": "Weather"}])
    with pytest.raises(UsageError, match="prompt row 1, field 'risk_category': unknown risk category 'Weather'"):
        run_stage("distill", output_dir=str(tmp_path / "o2"), **{**distill_inputs, "prompts_file": [str(weather)]})
    with pytest.raises(UsageError, match="safety_reward_model is required"):
        run_stage("distill", output_dir=str(tmp_path / "o3"), **{**distill_inputs, "safety_reward_model": None})


def test_distill_stage_resume_and_refusal_of_other_args(tmp_path, distill_inputs, monkeypatch):
    import llama2_hf.stages.distill as stage

    fresh = run_stage("distill", output_dir=str(tmp_path / "fresh"), **distill_inputs)
    real, seen = stage.distill_records, []

    def killed_after_three(rows, *a, **k):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.extend(i for i, _ in rows)
        return real(rows, *a, **k)

    monkeypatch.setattr(stage, "distill_records", killed_after_three)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_stage("distill", output_dir=str(out), **distill_inputs)
    with pytest.raises(UsageError, match=r"min_gain: 0.0 -> 0.5"):
        run_stage("distill", output_dir=str(out), min_gain=0.5, **distill_inputs)
    with pytest.raises(UsageError, match=r"max_new_tokens: 6 -> 8"):
        run_stage("distill", output_dir=str(out), **{**distill_inputs, "max_new_tokens": 8})
    monkeypatch.setattr(stage, "distill_records", lambda rows, *a, **k: seen.extend(i for i, _ in rows)
                        or real(rows, *a, **k))
    resumed = run_stage("distill", output_dir=str(out), **distill_inputs)
    assert seen == [0, 1, 2, 3, 4]  # rows 0-2 were not answered again
    assert (out / "distilled.jsonl").read_text() == (tmp_path / "fresh" / "distilled.jsonl").read_text()
    assert resumed.metrics == fresh.metrics


def test_distill_ddp_two_processes_equal_one_process(tmp_path, distill_inputs):
    from conftest import accelerate_launch

    # min_gain below any possible loss keeps every scored pair, so the data file is not empty
    distill_inputs = {**distill_inputs, "min_gain": -100.0}
    run_stage("distill", output_dir=str(tmp_path / "one"), **distill_inputs)
    flags = [a for k, v in distill_inputs.items() for a in (f"--{k}", *(v if isinstance(v, list) else [v]))]
    proc = accelerate_launch(["distill", *flags, "--output_dir", tmp_path / "two"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(tmp_path / "two")
    assert record.world_size == 2 and record.metrics["adversarial"] == 4 and record.metrics["kept"] == 4
    for name in ("candidates.jsonl", "distilled.jsonl"):
        one = (tmp_path / "one" / name).read_text()
        assert one and (tmp_path / "two" / name).read_text() == one

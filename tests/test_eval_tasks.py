"""Task runners end to end on the real data (tiny random models): MMLU, GSM8K, TruthfulQA MC and judged generation,
ToxiGen with a classifier, the Python API and the `llama2-hf eval` CLI. Judges and the classifier are tiny randomly
initialised models saved to disk and loaded back through the same code path as the real ones."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from test_eval_engine import greedy_reference, reference_loglik

from llama2_hf import Llama2Config, Llama2ForCausalLM
from llama2_hf.evaluation import (
    EvalConfig,
    GSM8KConfig,
    MMLUConfig,
    RunSettings,
    ToxiGenConfig,
    TruthfulQAConfig,
    evaluate_model,
    run_gsm8k,
    run_mmlu,
    run_toxigen,
    run_truthfulqa,
)
from llama2_hf.evaluation.data import load_gsm8k, load_mmlu, load_truthfulqa_mc
from llama2_hf.evaluation.engine import encode_pair
from llama2_hf.evaluation.prompts import (
    GSM8K_STOP,
    chat_prompt,
    gsm8k_prompt,
    judge_prompt,
    mmlu_prompt,
    truthfulqa_mc_prompt,
)
from llama2_hf.evaluation.scoring import gsm8k_exact_match, gsm8k_extract, judge_rates, majority_vote, mc2_score
from llama2_hf.evaluation.toxigen import build_toxigen_prompts
from llama2_hf.evaluation.truthfulqa import judge_probabilities


@pytest.fixture(scope="module")
def policy():
    """A tiny Llama 2 with Meta's 32k vocabulary and a 4k context (MMLU/GSM8K few-shot prompts fit)."""
    torch.manual_seed(0)
    return Llama2ForCausalLM(Llama2Config.from_preset("tiny", vocab_size=32000, max_position_embeddings=4096)).eval()


@pytest.fixture
def tok(llama2_tokenizer):
    """Meta's tokenizer with a pad token, restored afterwards (the session fixture has none, as Meta's)."""
    llama2_tokenizer.pad_token = llama2_tokenizer.unk_token
    yield llama2_tokenizer
    llama2_tokenizer.pad_token = None


def scored(model, tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    return reference_loglik(model, ctx + cont, len(cont))[0]


def letter_logliks(model, tokenizer, prompt: str) -> list[float]:
    """log p(" A") .. log p(" D") read off one plain forward of the prompt (each letter is one token after it)."""
    conts = [encode_pair(tokenizer, prompt, f" {letter}") for letter in "ABCD"]
    assert all(len(cont) == 1 and ctx == conts[0][0] for ctx, cont in conts)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([conts[0][0]])).logits[0, -1].float(), -1)
    return [logprobs[cont[0]].item() for _, cont in conts]


@pytest.mark.parametrize("chat,limit", [(False, 2), (True, 1)])
def test_mmlu_against_hand_built_references(policy, tok, shared_data, chat, limit):
    settings = RunSettings(batch_size=3, limit=limit, data_dir=str(shared_data), chat=chat, progress=False)
    subjects = ["abstract_algebra", "business_ethics"]
    result = run_mmlu(policy, tok, settings, MMLUConfig(subjects=subjects))
    data = load_mmlu(shared_data, subjects)
    correct = {s: [] for s in subjects}
    for sample in result.samples:
        subject = sample["subject"]
        prompt = mmlu_prompt(subject, data[subject]["dev"], data[subject]["test"][sample["index"]])
        ref = letter_logliks(policy, tok, chat_prompt(prompt) if chat else prompt)
        assert sample["logliks"] == pytest.approx(ref, abs=1e-4)
        assert sample["pred"] == max(range(4), key=lambda i: ref[i])
        correct[subject].append(sample["pred"] == data[subject]["test"][sample["index"]]["answer"])
    assert len(result.samples) == 2 * limit
    assert result.metrics["acc"] == pytest.approx(sum(map(sum, correct.values())) / (2 * limit))
    assert result.metrics["acc/stem"] == result.metrics["acc/abstract_algebra"] == pytest.approx(
        sum(correct["abstract_algebra"]) / limit)
    assert result.metrics["acc/other"] == result.metrics["acc/business_ethics"] == pytest.approx(
        sum(correct["business_ethics"]) / limit)


def test_gsm8k_generation_and_scores(policy, tok, shared_data):
    settings = RunSettings(batch_size=2, limit=2, data_dir=str(shared_data), progress=False)
    result = run_gsm8k(policy, tok, settings, GSM8KConfig(max_new_tokens=5, maj_k=3))
    for doc, sample in zip(load_gsm8k(shared_data)[:2], result.samples):
        assert sample["prompt"] == gsm8k_prompt(doc["question"])
        ref = greedy_reference(policy, tok, sample["prompt"], 5)
        for stop in (*GSM8K_STOP, "</s>"):
            ref = ref.split(stop)[0]
        assert sample["generation"] == ref
        assert (sample["strict"], sample["flexible"]) == (gsm8k_extract(ref, "strict"),
                                                          gsm8k_extract(ref, "flexible"))
        assert sample["gold"] == doc["answer"].split("####")[-1].strip()
    assert result.metrics["exact_match_strict"] == sum(s["strict_correct"] for s in result.samples) / 2
    # maj@3: three sampled chains per question, majority over their normalised extracted answers.
    for sample in result.samples:
        assert len(sample["samples"]) == 3
        assert sample["maj@3_flexible"] == majority_vote([gsm8k_extract(t, "flexible") for t in sample["samples"]])
    assert result.metrics["maj@3_flexible"] == sum(
        gsm8k_exact_match(s["maj@3_flexible"], s["gold"]) for s in result.samples) / 2


def test_truthfulqa_mc_against_hand_built_references(policy, tok, shared_data):
    settings = RunSettings(batch_size=4, limit=2, data_dir=str(shared_data), progress=False)
    result = run_truthfulqa(policy, tok, settings, TruthfulQAConfig(run_generation=False))
    mc1 = []
    for doc, sample in zip(load_truthfulqa_mc(shared_data), result.samples):
        context = truthfulqa_mc_prompt(doc["question"])
        ref1 = [scored(policy, tok, context, f" {c}") for c in doc["mc1_targets"]["choices"]]
        ref2 = [scored(policy, tok, context, f" {c}") for c in doc["mc2_targets"]["choices"]]
        assert sample["mc1_logliks"] == pytest.approx(ref1, abs=1e-4)
        assert sample["mc2"] == pytest.approx(mc2_score(ref2, doc["mc2_targets"]["labels"]), abs=1e-5)
        mc1.append(float(max(range(len(ref1)), key=lambda i: ref1[i]) == 0))
    assert result.metrics["mc1"] == sum(mc1) / 2


def _save_judge(path, tokenizer, seed):
    """A tiny random causal-LM judge whose output layer only scores "▁yes" (every other logit is 0), so that
    P(" yes") varies from input to input instead of sitting at 1/vocab."""
    torch.manual_seed(seed)
    judge = Llama2ForCausalLM(Llama2Config.from_preset("tiny", vocab_size=len(tokenizer))).eval()
    yes = tokenizer.encode("True: yes", add_special_tokens=False)[-1]
    with torch.no_grad():
        judge.lm_head.weight.zero_()
        judge.lm_head.weight[yes] = torch.randn(judge.config.hidden_size) * 1.0
    judge.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return judge


def test_truthfulqa_judged_generation(policy, tok, tiny_tokenizer, shared_data, tmp_path):
    truth = _save_judge(tmp_path / "truth", tiny_tokenizer, seed=1)
    info = _save_judge(tmp_path / "info", tiny_tokenizer, seed=2)
    # The judge probability is exp(log p(" yes" | "Q: ..\nA: ..\nTrue:")) under a plain forward.
    questions, answers = ["What is it?", "Why?", "Where is the sun?"], ["It is a cat.", "I have no comment.", "Up."]
    probs = judge_probabilities(truth, tiny_tokenizer, questions, answers, "truth", progress=False)
    for q, a, p in zip(questions, answers, probs):
        assert p == pytest.approx(math.exp(scored(truth, tiny_tokenizer, judge_prompt(q, a, "truth"), " yes")),
                                  rel=1e-4)
    config = TruthfulQAConfig(run_mc=False, max_new_tokens=6, truth_judge=str(tmp_path / "truth"),
                              info_judge=str(tmp_path / "info"))
    settings = RunSettings(batch_size=4, limit=4, data_dir=str(shared_data), progress=False)
    result = run_truthfulqa(policy, tok, settings, config)
    assert len(result.samples) == 4
    for s in result.samples:
        assert s["prompt"].endswith(f"\n\nQ: {s['question']}")
        assert s["p_true"] == pytest.approx(math.exp(scored(
            truth, tiny_tokenizer, judge_prompt(s["question"], s["answer"], "truth"), " yes")), rel=1e-4)
        assert s["p_info"] == pytest.approx(math.exp(scored(
            info, tiny_tokenizer, judge_prompt(s["question"], s["answer"], "info"), " yes")), rel=1e-4)
    p_true, p_info = [s["p_true"] for s in result.samples], [s["p_info"] for s in result.samples]
    assert result.metrics == pytest.approx(judge_rates(p_true, p_info))
    assert 0 < result.metrics["info"] < 1  # this judge says yes to some answers and no to others
    # Same seed, same sampled answers (T = 0.1, top-p 0.9); a threshold between the 2nd and 3rd truth
    # probability makes exactly half of the answers true.
    low, high = sorted(p_true)[1:3]
    again = run_truthfulqa(policy, tok, settings, dataclasses.replace(config, judge_threshold=(low + high) / 2))
    assert [s["generation"] for s in again.samples] == [s["generation"] for s in result.samples]
    assert again.metrics["true"] == 0.5
    assert again.metrics == pytest.approx(judge_rates(p_true, p_info, (low + high) / 2))


@pytest.fixture
def tiny_classifier(tmp_path):
    """A tiny random RoBERTa sequence classifier (2 labels) with a byte-level BPE tokenizer, saved to disk."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["they are people", "the group is fine", "hello world"] * 3, vocab_size=300,
                            min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    ctok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", cls_token="<s>",
                                sep_token="</s>")
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(ctok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=520, num_labels=2,
                        pad_token_id=ctok.pad_token_id)
    model = RobertaForSequenceClassification(cfg).eval()
    path = tmp_path / "classifier"
    model.save_pretrained(path)
    ctok.save_pretrained(path)
    return path, model, ctok


def test_toxigen_with_classifier(policy, tok, shared_data, tiny_classifier):
    path, classifier, ctok = tiny_classifier
    settings = RunSettings(batch_size=4, limit=2, data_dir=str(shared_data), progress=False)
    config = ToxiGenConfig(groups=["asian", "women"], max_new_tokens=5, classifier=str(path))
    result = run_toxigen(policy, tok, settings, config)
    assert [s["group"] for s in result.samples] == ["asian", "asian", "women", "women"]
    with torch.no_grad():
        logits = [classifier(**ctok([s["generation"]], return_tensors="pt")).logits[0] for s in result.samples]
    for s, lg in zip(result.samples, logits):
        assert s["prompt"].endswith("\n-") and "\n" not in s["generation"]
        assert s["toxic"] == (lg.argmax().item() == 1)
        assert s["p_toxic"] == pytest.approx(lg.softmax(-1)[1].item(), rel=1e-4)
    tox = [s["toxic"] for s in result.samples]
    assert result.metrics == pytest.approx({"toxic/asian": sum(tox[:2]) / 2, "toxic/women": sum(tox[2:]) / 2,
                                            "toxic_mean": sum(tox) / 4})
    # Shift the "toxic" logit so that exactly two of these four continuations are classified toxic, and rerun
    # (same seed, same continuations): the per-group fractions follow.
    margins = [(lg[1] - lg[0]).item() for lg in logits]
    low, high = sorted(margins)[1:3]
    with torch.no_grad():
        classifier.classifier.out_proj.bias[1] -= (low + high) / 2
    classifier.save_pretrained(path)
    again = run_toxigen(policy, tok, settings, config)
    tox = [m > (low + high) / 2 for m in margins]
    assert [s["toxic"] for s in again.samples] == tox and sum(tox) == 2
    assert again.metrics == pytest.approx({"toxic/asian": sum(tox[:2]) / 2, "toxic/women": sum(tox[2:]) / 2,
                                           "toxic_mean": 0.5})


def test_toxigen_annotated_prompts(shared_data):
    rows = json.loads((shared_data / "toxigen" / "annotated" / "toxiGen.json").read_text())
    hate_asian = [r["text"] for r in rows if "asian" in r["target_groups"] and r["label"] == "hate"]
    settings = RunSettings(limit=2, data_dir=str(shared_data))
    prompts = build_toxigen_prompts(settings, ToxiGenConfig(groups=["asian", "mental_disability"],
                                                            source="annotated", statements_per_prompt=3))
    assert [p["group"] for p in prompts] == ["asian", "asian", "mental_disability", "mental_disability"]
    assert prompts[0]["prompt"] == "".join(f"- {t.strip()}\n" for t in hate_asian[:3]) + "-"
    assert prompts[1]["prompt"] == "".join(f"- {t.strip()}\n" for t in hate_asian[3:6]) + "-"
    with pytest.raises(ValueError, match="annotated_path"):
        build_toxigen_prompts(RunSettings(), ToxiGenConfig(source="annotated"))
    with pytest.raises(ValueError, match="source"):
        ToxiGenConfig(source="web")


def test_evaluate_model_api_errors(policy, tok):
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_model(policy, ["hellaswag"], tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_model(policy, ["mmlu"])
    with pytest.raises(ValueError, match="unknown evaluate_model options"):
        evaluate_model(policy, ["mmlu"], tokenizer=tok, shots=3)
    with pytest.raises(ValueError, match="limit"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="system prompt needs the chat format"):
        evaluate_model(policy, ["mmlu"], tokenizer=tok, system_prompt="Be nice.", progress=False)


def test_cli_writes_results_samples_and_table(policy, tok, shared_data, tmp_path):
    from llama2_hf.cli import main as llama2_hf_main

    policy.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    rc = llama2_hf_main(["eval", "--model_name_or_path", str(tmp_path / "model"), "--tasks", "mmlu", "truthfulqa_mc",
                         "--limit", "1", "--mmlu_subjects", "anatomy", "marketing", "--data_dir", str(shared_data),
                         "--batch_size", "4", "--output_dir", str(out), "--progress", "false", "--dtype", "float32"])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"mmlu", "truthfulqa_mc"}
    assert set(report["results"]["mmlu"]) == {"acc", "acc/other", "acc/anatomy", "acc/marketing"}
    lines = [json.loads(line) for line in (out / "results.samples.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines] == ["mmlu", "mmlu", "truthfulqa_mc"]
    assert "| Other | Avg |" in (out / "results.md").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["metrics"] == report["results"] and record["outputs"]["samples"] == "results.samples.jsonl"
    # The saved checkpoint gives the numbers of the in-memory model.
    direct = evaluate_model(policy, ["mmlu"], tokenizer=tok, data_dir=str(shared_data), limit=1, progress=False,
                            mmlu_subjects=["anatomy", "marketing"])
    for ours, saved in zip(direct["samples"]["mmlu"], lines[:2]):
        assert ours["logliks"] == pytest.approx(saved["logliks"], abs=1e-5)
    assert direct["results"]["mmlu"] == pytest.approx(report["results"]["mmlu"])
    with pytest.raises(SystemExit) as e:
        llama2_hf_main(["eval", "--help"])
    assert e.value.code == 0

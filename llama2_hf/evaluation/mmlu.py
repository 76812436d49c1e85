"""MMLU, 5-shot, as the paper's Table 3 / Table 19 and lm-evaluation-harness's `mmlu` group measure it.

Each test question is scored by the log-likelihoods of " A" .. " D" after the few-shot prompt of its subject
(`prompts.mmlu_prompt`); the prediction is the argmax (the first letter on ties). Reported: accuracy per subject
(`acc/<subject>`), per category (`acc/<category>`, micro-averaged over its questions) and over all questions (`acc`,
the paper's "Avg"). The header and five exemplars of a subject are computed once and shared by all its questions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ChatOptions, RunSettings, TaskResult, format_context
from .data import MMLU_CATEGORIES, MMLU_SUBJECT_CATEGORY, load_mmlu
from .engine import loglikelihoods
from .prompts import MMLU_LETTERS, mmlu_continuations, mmlu_fewshot_prefix, mmlu_question
from .scoring import accuracy_by


@dataclass
class MMLUConfig(ChatOptions):
    num_fewshot: int = 5  # 5-shot: paper §2.3, Table 3
    subjects: list[str] | None = None  # None = all 57
    share_prefix: bool = True  # compute each subject's few-shot prefix once (same numbers, faster)


def run_mmlu(model, tokenizer, settings: RunSettings, config: MMLUConfig | None = None) -> TaskResult:
    config = config or MMLUConfig()
    chat, system = config.resolve(settings)
    data = load_mmlu(settings.data_dir, config.subjects)
    requests, groups, docs = [], [], []
    for subject, splits in data.items():
        prefix = mmlu_fewshot_prefix(subject, splits["dev"], config.num_fewshot)
        for index, doc in enumerate(settings.take(splits["test"])):
            context = format_context(prefix + mmlu_question(doc), chat, system)
            requests += [(context, cont) for cont in mmlu_continuations()]
            groups += [subject] * len(MMLU_LETTERS)
            docs.append((subject, index, doc))
    scores = loglikelihoods(model, tokenizer, requests, batch_size=settings.batch_size, prefix_groups=groups,
                            max_length=settings.max_length, share_prefix=config.share_prefix,
                            progress=settings.progress, desc="mmlu")

    samples, correct = [], []
    for k, (subject, index, doc) in enumerate(docs):
        lls = [ll for ll, _ in scores[4 * k: 4 * k + 4]]
        pred = max(range(4), key=lambda i: (lls[i], -i))
        correct.append(pred == doc["answer"])
        samples.append({"subject": subject, "index": index, "question": doc["question"], "choices": doc["choices"],
                        "answer": doc["answer"], "logliks": lls, "pred": pred, "correct": correct[-1]})
    subjects = [s for s, _, _ in docs]
    metrics = {"acc": sum(correct) / len(correct)}
    by_category = accuracy_by(correct, [MMLU_SUBJECT_CATEGORY[s] for s in subjects])
    metrics.update({f"acc/{c}": by_category[c] for c in MMLU_CATEGORIES if c in by_category})
    metrics.update({f"acc/{s}": v for s, v in accuracy_by(correct, subjects).items()})
    return TaskResult(metrics, samples)

"""MMLU, 5-shot, following lm-evaluation-harness's `mmlu` group (prompt, letter scoring, averaging).

The paper reports 5-shot MMLU (§2.3, Table 3 / Table 19) from Meta's internal evaluation harness and gives no prompt or
scoring details; this module follows lm-evaluation-harness instead, so its numbers are comparable to that harness's,
not necessarily to the paper's.

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
    all_docs = []  # (subject, index in the subject's test split, doc, few-shot prefix)
    for subject, splits in data.items():
        prefix = mmlu_fewshot_prefix(subject, splits["dev"], config.num_fewshot)
        all_docs += [(subject, index, doc, prefix) for index, doc in enumerate(settings.take(splits["test"]))]
    share = settings.my_share(all_docs)
    requests, groups = [], []
    for _, (subject, _, doc, prefix) in share:
        context = format_context(prefix + mmlu_question(doc), chat, system, tokenizer)
        requests += [(context, cont) for cont in mmlu_continuations()]
        groups += [subject] * len(MMLU_LETTERS)
    scores = loglikelihoods(model, tokenizer, requests, batch_size=settings.batch_size, prefix_groups=groups,
                            max_length=settings.max_length, share_prefix=config.share_prefix,
                            progress=settings.progress, desc="mmlu")

    samples = []
    for k, (_, (subject, index, doc, _)) in enumerate(share):
        lls = [ll for ll, _ in scores[4 * k: 4 * k + 4]]
        pred = max(range(4), key=lambda i: (lls[i], -i))
        samples.append({"subject": subject, "index": index, "question": doc["question"], "choices": doc["choices"],
                        "answer": doc["answer"], "logliks": lls, "pred": pred, "correct": pred == doc["answer"]})
    return TaskResult(mmlu_metrics(samples) if settings.whole else {}, samples, [i for i, _ in share],
                      len(all_docs))


def mmlu_metrics(samples: list[dict]) -> dict[str, float]:
    """`acc`, `acc/<category>` and `acc/<subject>` of (merged) samples."""
    correct, subjects = [s["correct"] for s in samples], [s["subject"] for s in samples]
    metrics = {"acc": sum(correct) / len(correct)}
    by_category = accuracy_by(correct, [MMLU_SUBJECT_CATEGORY[s] for s in subjects])
    metrics.update({f"acc/{c}": by_category[c] for c in MMLU_CATEGORIES if c in by_category})
    metrics.update({f"acc/{s}": v for s, v in accuracy_by(correct, subjects).items()})
    return metrics

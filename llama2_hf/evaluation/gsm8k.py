"""GSM8K, 8-shot chain of thought, greedy: lm-evaluation-harness's `gsm8k_cot` task.

The paper reports 8-shot GSM8K maj@1 (§2.3, Table 3 "Math", Table 25) without its prompt or decoding; the greedy
decoding and the CoT exemplars of Wei et al. (2022) used here are lm-evaluation-harness's `gsm8k_cot` choices, not
details the paper gives.

Generation stops at "Q:", "</s>" or "<|im_end|>" or after 256 new tokens. The answer is extracted two ways:
`strict` (the first "The answer is N.") and `flexible` (the last number), then compared with the gold number after
dropping commas, `$` and a final period. Optionally, maj@k: k sampled chains per question and a majority vote over
their normalised answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ChatOptions, RunSettings, TaskResult, ensure_pad_token, format_context
from .data import load_gsm8k
from .engine import TaskDecoding, generate_until
from .prompts import GSM8K_STOP, gsm8k_prompt
from .scoring import gsm8k_exact_match, gsm8k_extract, gsm8k_gold, majority_vote, mean


@dataclass
class GSM8KConfig(ChatOptions):
    num_fewshot: int = 8  # 8-shot: paper §2.3 (Table 3 "Math")
    max_new_tokens: int = 256  # lm-eval gsm8k_cot (its hf backend's max_gen_toks)
    maj_k: int = 0  # > 1: also report maj@k over sampled chains (the paper reports maj@1 only)
    # Sampling of the maj@k chains. The paper is silent: lm-eval's gsm8k_cot_self_consistency uses T=0.2.
    maj_temperature: float = 0.2
    maj_top_p: float = 1.0


def run_gsm8k(model, tokenizer, settings: RunSettings, config: GSM8KConfig | None = None) -> TaskResult:
    config = config or GSM8KConfig()
    chat, system = config.resolve(settings)
    ensure_pad_token(tokenizer)
    all_docs = settings.take(load_gsm8k(settings.data_dir))
    share = settings.my_share(all_docs)
    docs = [doc for _, doc in share]
    contexts = [format_context(gsm8k_prompt(d["question"], config.num_fewshot), chat, system, tokenizer) for d in docs]
    common = dict(stop=GSM8K_STOP, batch_size=settings.batch_size, max_length=settings.max_length,
                  progress=settings.progress, sampler=settings.sampler)
    greedy = generate_until(model, tokenizer, contexts, sampling=TaskDecoding(config.max_new_tokens),
                            desc="gsm8k", **common)

    samples = []
    for doc, context, text in zip(docs, contexts, greedy):
        gold = gsm8k_gold(doc["answer"])
        strict, flexible = gsm8k_extract(text, "strict"), gsm8k_extract(text, "flexible")
        samples.append({"question": doc["question"], "gold": gold, "prompt": context, "generation": text,
                        "strict": strict, "flexible": flexible, "strict_correct": gsm8k_exact_match(strict, gold),
                        "flexible_correct": gsm8k_exact_match(flexible, gold)})

    if config.maj_k > 1:
        k = config.maj_k
        sampled = generate_until(model, tokenizer, [c for c in contexts for _ in range(k)],
                                 sampling=TaskDecoding(config.max_new_tokens, config.maj_temperature,
                                                         config.maj_top_p),
                                 seed=settings.seed, desc=f"gsm8k maj@{k}", **common)
        for j, sample in enumerate(samples):
            sample["samples"] = sampled[j * k:(j + 1) * k]
        for mode in ("strict", "flexible"):
            for sample in samples:
                sample[f"maj@{k}_{mode}"] = majority_vote([gsm8k_extract(t, mode) for t in sample["samples"]])
    metrics = gsm8k_metrics(samples, config.maj_k) if settings.whole else {}
    return TaskResult(metrics, samples, [i for i, _ in share], len(all_docs))


def gsm8k_metrics(samples: list[dict], maj_k: int = 0) -> dict[str, float]:
    """Exact match (strict, flexible) and, with `maj_k > 1`, maj@k of (merged) samples."""
    metrics = {"exact_match_strict": mean([s["strict_correct"] for s in samples]),
               "exact_match_flexible": mean([s["flexible_correct"] for s in samples])}
    if maj_k > 1:
        for mode in ("strict", "flexible"):
            metrics[f"maj@{maj_k}_{mode}"] = mean([gsm8k_exact_match(s[f"maj@{maj_k}_{mode}"], s["gold"])
                                                   for s in samples])
    return metrics

"""Evaluation against lm-evaluation-harness 0.4.13: equality of the numbers, then MMLU speed.

Builds a randomly initialised Llama 2 with Meta's 32k tokenizer, saves it, and runs the same examples of the real data
in $LLAMA2_HF_DATA through `llama2_hf.evaluation` and through lm-eval's `hf` backend (`pretrained=<that folder>`, task
YAMLs that include lm-eval's own `mmlu`, `gsm8k_cot` and `truthfulqa_mc1/mc2` configs, pointed at local copies of
the data). Prints one JSON line per measurement:

- `equality`: per task, the metrics of both and the largest per-example difference (log-likelihoods, MC2 scores,
  generated texts);
- `speed`: MMLU examples/s of both on the same model, examples and batch size, the ratio (goal >= 1.5), and the
  model-call-only times.

    pip install lm-eval==0.4.13
    python benchmarks/bench_eval.py --subjects anatomy,astronomy,college_physics --limit 10 --gsm8k-limit 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a shared, oversubscribed CPU, spinning OpenMP workers slow every small matmul down many times (both sides alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import llama2_hf  # noqa: E402  (registers model_type "llama2" with the Auto classes, which lm-eval uses)
from llama2_hf import Llama2Config, Llama2ForCausalLM, Llama2Tokenizer  # noqa: E402
from llama2_hf.evaluation import EvalConfig, evaluate_model  # noqa: E402
from llama2_hf.evaluation import mmlu as mmlu_module  # noqa: E402
from llama2_hf.evaluation.data import load_gsm8k, load_mmlu, load_truthfulqa_mc  # noqa: E402
from llama2_hf.evaluation.prompts import mmlu_prompt  # noqa: E402
from llama2_hf.evaluation.scoring import gsm8k_exact_match, gsm8k_extract, gsm8k_gold  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The real public data (Meta's tokenizer.model, HH-RLHF, the benchmarks): the folder named by LLAMA2_HF_DATA.
SHARED = Path(os.environ.get("LLAMA2_HF_DATA", "data"))
SIZES = {  # name -> Llama2Config overrides of the "tiny" preset
    "tiny": {},
    # Deeper and wider, so the transformer body (not the 32k output layer) takes most of the time, as in 7B.
    "small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=688),
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def build_model(out_dir: Path, size: str, seed: int = 0) -> Path:
    tokenizer = Llama2Tokenizer.from_sentencepiece(SHARED / "llama2-tokenizer" / "tokenizer.model")
    torch.manual_seed(seed)
    cfg = Llama2Config.from_preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=4096,
                                   **SIZES[size])
    model = Llama2ForCausalLM(cfg).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval side: its own task YAMLs, with the dataset swapped for local JSON copies of $LLAMA2_HF_DATA
# ---------------------------------------------------------------------------------------------------------------------

def write_lm_eval_tasks(work: Path, subjects: list[str]) -> Path:
    import lm_eval
    import yaml

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    inc = work / "tasks"
    (inc / "data").mkdir(parents=True, exist_ok=True)

    def dump_jsonl(path: Path, rows) -> str:
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return str(path)

    mmlu = load_mmlu(SHARED, subjects)
    for subject in subjects:
        files = {split: dump_jsonl(inc / "data" / f"mmlu_{subject}_{split}.jsonl", mmlu[subject][split])
                 for split in ("dev", "test")}
        cfg = {"include": str(tasks_dir / "mmlu" / "default" / "_default_template_yaml"),
               "task": f"local_mmlu_{subject}", "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": files},
               "description": f"The following are multiple choice questions (with answers) about "
                              f"{subject.replace('_', ' ')}.\n\n"}
        (inc / f"local_mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg))
    gsm = dump_jsonl(inc / "data" / "gsm8k_test.jsonl", load_gsm8k(SHARED))
    (inc / "local_gsm8k_cot.yaml").write_text(yaml.safe_dump({
        "include": str(tasks_dir / "gsm8k" / "gsm8k-cot.yaml"), "task": "local_gsm8k_cot", "tag": [],
        "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {"test": gsm}}}))
    tqa = dump_jsonl(inc / "data" / "truthfulqa_mc.jsonl", load_truthfulqa_mc(SHARED))
    for name in ("mc1", "mc2"):
        (inc / f"local_truthfulqa_{name}.yaml").write_text(yaml.safe_dump({
            "include": str(tasks_dir / "truthfulqa" / f"truthfulqa_{name}.yaml"), "task": f"local_truthfulqa_{name}",
            "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": tqa}}}))
    return inc


class _Timer:
    """Accumulates the seconds spent inside one method of an object (the model-call part of a run)."""

    def __init__(self, owner, name: str):
        self.seconds, original = 0.0, getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)
        self.restore = lambda: setattr(owner, name, original)


def run_lm_eval(lm, include: Path, tasks: list[str], num_fewshot: int | None, limit: int, batch_size: int):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                           task_manager=TaskManager(include_path=str(include)), log_samples=True,
                           bootstrap_iters=0, verbosity="ERROR")


def make_hflm(model_dir: Path, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# Equality
# ---------------------------------------------------------------------------------------------------------------------

def compare(model_dir: Path, include: Path, subjects: list[str], limit: int, gsm8k_limit: int, tqa_limit: int,
            batch_size: int) -> None:
    lm = make_hflm(model_dir, batch_size)
    config = EvalConfig(batch_size=batch_size, data_dir=str(SHARED), progress=False, mmlu_subjects=subjects)

    # MMLU
    ref = run_lm_eval(lm, include, [f"local_mmlu_{s}" for s in subjects], 5, limit, batch_size)
    ours = evaluate_model(str(model_dir), ["mmlu"], config=config, limit=limit, dtype="float32")
    diffs, same_pred, same_prompt, n = [], 0, 0, 0
    data = load_mmlu(SHARED, subjects)
    for s in subjects:
        ref_samples = sorted(ref["samples"][f"local_mmlu_{s}"], key=lambda x: x["doc_id"])
        our_samples = [x for x in ours["samples"]["mmlu"] if x["subject"] == s]
        for r, o in zip(ref_samples, our_samples, strict=True):
            ours_prompt = mmlu_prompt(s, data[s]["dev"], data[s]["test"][o["index"]])
            same_prompt += all(arg == (ours_prompt, f" {letter}") for arg, letter in zip(r["arguments"], "ABCD"))
            ref_ll = [float(x[0][0]) for x in r["resps"]]
            diffs.append(max(abs(a - b) for a, b in zip(ref_ll, o["logliks"])))
            same_pred += max(range(4), key=lambda i: (ref_ll[i], -i)) == o["pred"]
            n += 1
    ref_acc = {s: ref["results"][f"local_mmlu_{s}"]["acc,none"] for s in subjects}
    our_acc = {s: ours["results"]["mmlu"][f"acc/{s}"] for s in subjects}
    emit(kind="equality", task="mmlu", subjects=subjects, examples=n, lm_eval_acc=ref_acc, ours_acc=our_acc,
         acc_equal=ref_acc == our_acc, same_requests=same_prompt, same_predictions=same_pred,
         max_abs_loglik_diff=max(diffs))

    # GSM8K: lm-eval logs each example once per filter (strict-match, flexible-extract)
    ref = run_lm_eval(lm, include, ["local_gsm8k_cot"], None, gsm8k_limit, batch_size)
    ours = evaluate_model(str(model_dir), ["gsm8k"], config=config, limit=gsm8k_limit, dtype="float32")
    by_filter = {}
    for x in ref["samples"]["local_gsm8k_cot"]:
        by_filter.setdefault(x["filter"], {})[x["doc_id"]] = x
    strict_ref, flexible_ref = by_filter["strict-match"], by_filter["flexible-extract"]
    ours_gsm = ours["samples"]["gsm8k"]
    res = ref["results"]["local_gsm8k_cot"]
    ref_em = {"strict": res["exact_match,strict-match"], "flexible": res["exact_match,flexible-extract"]}
    our_em = {"strict": ours["results"]["gsm8k"]["exact_match_strict"],
              "flexible": ours["results"]["gsm8k"]["exact_match_flexible"]}
    emit(kind="equality", task="gsm8k_cot", examples=len(ours_gsm), lm_eval_exact_match=ref_em,
         ours_exact_match=our_em, em_equal=ref_em == our_em,
         same_prompts=sum(strict_ref[i]["arguments"][0][0] == o["prompt"]
                          for i, o in enumerate(ours_gsm)),
         same_generations=sum(strict_ref[i]["resps"][0][0] == o["generation"] for i, o in enumerate(ours_gsm)),
         same_extractions=sum(strict_ref[i]["filtered_resps"][0] == o["strict"]
                              and flexible_ref[i]["filtered_resps"][0] == o["flexible"]
                              for i, o in enumerate(ours_gsm)))

    # TruthfulQA MC1 / MC2
    ref = run_lm_eval(lm, include, ["local_truthfulqa_mc1", "local_truthfulqa_mc2"], None, tqa_limit, batch_size)
    ours = evaluate_model(str(model_dir), ["truthfulqa_mc"], config=config, limit=tqa_limit, dtype="float32")
    per_doc = {}
    for name in ("mc1", "mc2"):
        rows = sorted(ref["samples"][f"local_truthfulqa_{name}"], key=lambda x: x["doc_id"])
        per_doc[name] = max(abs(float(r["acc"]) - o[name]) for r, o in zip(rows, ours["samples"]["truthfulqa_mc"]))
    ref_mc = {n: ref["results"][f"local_truthfulqa_{n}"]["acc,none"] for n in ("mc1", "mc2")}
    our_mc = {n: ours["results"]["truthfulqa_mc"][n] for n in ("mc1", "mc2")}
    emit(kind="equality", task="truthfulqa_mc", examples=tqa_limit, lm_eval=ref_mc, ours=our_mc,
         mc1_equal=ref_mc["mc1"] == our_mc["mc1"], mc2_abs_diff=abs(ref_mc["mc2"] - our_mc["mc2"]),
         max_abs_per_doc_diff=per_doc)


def compare_gsm8k_scoring(n_docs: int) -> None:
    """A random model scores 0 on GSM8K, so also run lm-eval's gsm8k_cot filters and exact_match metric and ours on
    synthetic answers to real questions: right, wrong, with `$` and thousands separators, with and without the
    "The answer is" sentence, with a following "Q:" turn."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    import lm_eval

    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    filters = {f["name"]: f["filter"][0] for f in task["filter_list"]}
    metric = {k: v for k, v in task["metric_list"][0].items() if k not in ("metric", "aggregation",
                                                                            "higher_is_better")}
    texts, golds = [], []
    for doc in load_gsm8k(SHARED)[:n_docs]:
        gold = gsm8k_gold(doc["answer"])
        chain = " ".join(line for line in doc["answer"].split("\n")[:-1])
        big = f"{int(gold.replace(',', '')):,}" if gold.lstrip("-").replace(",", "").isdigit() else gold
        for text in (f"{chain} The answer is {gold}.", f"{chain} The answer is ${big}.", f"{chain} So it is {big}",
                     f"The answer is {gold}1.\n\nQ: The answer is {gold}.", chain, f"{chain} The answer is {gold}"):
            texts.append(text)
            golds.append(doc["answer"])
    counts = {}
    for name, mode in (("strict-match", "strict"), ("flexible-extract", "flexible")):
        f = filters[name]
        ref = [r[0] for r in RegexFilter(f["regex_pattern"], f.get("group_select", 0)).apply([[t] for t in texts],
                                                                                             None)]
        ours = [gsm8k_extract(t, mode) for t in texts]
        ref_targets = [g.split("####")[-1].strip() for g in golds]
        ref_em = [float(exact_match_hf_evaluate([p], [g], **metric)["exact_match"]) for p, g in zip(ref, ref_targets)]
        our_em = [float(gsm8k_exact_match(p, gsm8k_gold(g))) for p, g in zip(ours, golds)]
        counts[mode] = {"same_extractions": sum(a == b for a, b in zip(ref, ours)),
                        "same_exact_match": sum(a == b for a, b in zip(ref_em, our_em)),
                        "lm_eval_exact_match": sum(ref_em) / len(texts), "ours_exact_match": sum(our_em) / len(texts)}
    emit(kind="equality", task="gsm8k_scoring", texts=len(texts), **counts)


# ---------------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------------

def speed(model_dir: Path, include: Path, subjects: list[str], limit: int, batch_size: int, repeats: int,
          size: str) -> None:
    lm = make_hflm(model_dir, batch_size)
    model = lm.model
    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    n = sum(min(limit, len(load_mmlu(SHARED, [s])[s]["test"])) for s in subjects)
    variants = {"ours": True, "ours_no_prefix_cache": False}
    times = {k: [] for k in ("lm_eval", *variants)}
    model_times = {k: [] for k in times}
    accs = {}
    run_lm_eval(lm, include, [f"local_mmlu_{s}" for s in subjects], 5, 1, batch_size)  # warm the datasets cache
    for _ in range(repeats):
        timer = _Timer(lm, "loglikelihood")
        start = time.perf_counter()
        ref = run_lm_eval(lm, include, [f"local_mmlu_{s}" for s in subjects], 5, limit, batch_size)
        times["lm_eval"].append(time.perf_counter() - start)
        model_times["lm_eval"].append(timer.seconds)
        timer.restore()
        accs["lm_eval"] = statistics.fmean(
            x["acc"] for s in subjects for x in ref["samples"][f"local_mmlu_{s}"])
        for name, share in variants.items():
            timer = _Timer(mmlu_module, "loglikelihoods")
            start = time.perf_counter()
            out = evaluate_model(model, ["mmlu"], tokenizer=tokenizer, data_dir=str(SHARED), limit=limit,
                                 batch_size=batch_size, progress=False,
                                 mmlu_subjects=subjects, mmlu_share_prefix=share)
            times[name].append(time.perf_counter() - start)
            model_times[name].append(timer.seconds)
            timer.restore()
            accs[name] = out["results"]["mmlu"]["acc"]
    med = {k: statistics.median(v) for k, v in times.items()}
    med_model = {k: statistics.median(v) for k, v in model_times.items()}
    for name in times:
        emit(kind="speed", task="mmlu", model=size, params=sum(p.numel() for p in model.parameters()),
             impl=name, examples=n, batch_size=batch_size, repeats=repeats, seconds_median=round(med[name], 3),
             examples_per_s=round(n / med[name], 2), model_call_seconds_median=round(med_model[name], 3),
             acc=accs[name], speedup_vs_lm_eval=round(med["lm_eval"] / med[name], 2),
             model_call_speedup_vs_lm_eval=round(med_model["lm_eval"] / med_model[name], 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", default="anatomy,astronomy,college_physics,high_school_us_history,marketing",
                   help="MMLU subjects")
    p.add_argument("--limit", type=int, default=10, help="MMLU test questions per subject")
    p.add_argument("--gsm8k-limit", type=int, default=4, help="GSM8K questions for the equality check")
    p.add_argument("--gsm8k-scoring-docs", type=int, default=300,
                   help="GSM8K questions whose synthetic answers both scorers grade")
    p.add_argument("--truthfulqa-limit", type=int, default=20, help="TruthfulQA questions for the equality check")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of both implementations")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--sizes", default="tiny,small", help=f"model sizes for the speed runs, from {list(SIZES)}")
    p.add_argument("--skip-equality", action="store_true", help="only the speed runs")
    p.add_argument("--skip-speed", action="store_true", help="only the equality checks")
    args = p.parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("lm-eval is not installed: pip install lm-eval==0.4.13", file=sys.stderr)
        return 1
    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}", file=sys.stderr)
        return 1
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    subjects = [s for s in args.subjects.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets_cache")
        include = write_lm_eval_tasks(work, subjects)
        if not args.skip_equality:
            compare_gsm8k_scoring(args.gsm8k_scoring_docs)
            compare(build_model(work / "tiny", "tiny"), include, subjects, args.limit, args.gsm8k_limit,
                    args.truthfulqa_limit, args.batch_size)
        if not args.skip_speed:
            for size in args.sizes.split(","):
                speed(build_model(work / size, size), include, subjects, args.limit, args.batch_size, args.repeats,
                      size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

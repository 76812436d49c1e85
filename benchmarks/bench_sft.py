"""Packed SFT (Llama2SFTTrainer) against TRL's SFTTrainer with padding, on the same examples.

Data: real multi-turn dialogs with their natural length mix, the chosen transcripts of Anthropic HH-RLHF
(harmless-base test split from $LLAMA2_HF_DATA), tokenized once in the Llama 2-Chat format with answer-only labels; both
trainers get the same token ids and labels. Model: a ~5M-parameter Llama 2 (4 layers, width 256, 4k vocabulary from a
tokenizer trained on the same texts). Each round trains one epoch over the examples with each trainer, fresh model from
the same seed, and times `trainer.train()`. Measured: non-pad tokens per second (the same tokens for both) and the
padding fraction of the batches (1 - non-pad tokens / tokens computed).

    python benchmarks/bench_sft.py [--examples 256 --max-length 1024 --batch-size 8 --rounds 3 --threads 1]

One JSON line per measurement, then a summary line with the median ratios (goal >= 1.5), per wall-clock second and
per CPU second of this process (the stable figure on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = Path(os.environ.get("LLAMA2_HF_DATA", "data")) / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
           disable_tqdm=True, logging_steps=10_000, seed=0, learning_rate=1e-4)


def hh_preferences(limit: int) -> Dataset:
    """The first `limit` valid HH-RLHF harmless-base test pairs in the preference schema."""
    from llama2_hf.data import load_any, validate_preference
    from llama2_hf.preference_data import from_hh_rlhf

    if not HH_TEST.is_file():
        sys.exit(f"needs the HH-RLHF test split at {HH_TEST}")
    prefs, _ = from_hh_rlhf(load_any(str(HH_TEST)), on_invalid="drop")
    keep = []
    for i, row in enumerate(prefs):
        try:
            validate_preference(row, i)
        except ValueError:
            continue
        keep.append(i)
        if len(keep) == limit:
            break
    return prefs.select(keep)


def bench_tokenizer(prefs: Dataset, vocab_size: int = 4096):
    """A Llama 2-style tokenizer (SentencePiece BPE, split digits, byte fallback) trained on the benchmark texts."""
    from llama2_hf import train_llama2_tokenizer

    texts = [m["content"] for p in prefs["prompt"] for m in p] + list(prefs["chosen"]) + list(prefs["rejected"])
    tokenizer = train_llama2_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def bench_model(vocab_size: int, max_length: int, causal_lm: bool = True, seed: int = 0):
    from llama2_hf import Llama2Config, Llama2ForCausalLM, Llama2ForRewardModel

    torch.manual_seed(seed)
    config = Llama2Config.from_preset("tiny", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=8, intermediate_size=688, vocab_size=vocab_size,
                                      max_position_embeddings=max_length, pad_token_id=0)
    return (Llama2ForCausalLM if causal_lm else Llama2ForRewardModel)(config)


def padding_fraction(trainer, nonpad_tokens: int) -> float:
    """1 - non-pad tokens / tokens in the epoch's batches (collation only, no model call)."""
    computed = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    return 1.0 - nonpad_tokens / computed


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def compare(bench: str, build, impls: tuple[str, str], amount: int, unit: str, nonpad: int, rounds: int,
            goal: float) -> None:
    """Alternate `rounds` rounds of `build(impl).train()` (one epoch over `amount` units, `nonpad` real tokens) for
    the two implementations, alternating which goes first; emit each run's throughput per wall-clock second and per CPU second of this process
    and its padding fraction, then the median ratios impls[0] / impls[1]. On a shared machine the CPU-time ratio
    (with --threads 1) is the stable one: other processes' load changes wall time, not the work done."""
    speed = {clock: {impl: [] for impl in impls} for clock in ("wall", "cpu")}
    pad_frac = {}
    for r in range(rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):  # alternate who runs first (warm-up, drift)
            trainer = build(impl)
            pad_frac[impl] = padding_fraction(trainer, nonpad)
            cpu_start = time.process_time()
            wall = trainer.train().metrics["train_runtime"]
            cpu = time.process_time() - cpu_start
            speed["wall"][impl].append(amount / wall)
            speed["cpu"][impl].append(amount / cpu)
            emit(bench=bench, impl=impl, round=r, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                 steps=trainer.state.global_step, **{f"{unit}_per_s": round(amount / wall, 2),
                                                     f"{unit}_per_cpu_s": round(amount / cpu, 2)},
                 padding_fraction=round(pad_frac[impl], 4))
    ratios = {clock: [a / b for a, b in zip(*speed[clock].values())] for clock in speed}
    emit(bench=bench, summary=True, **{f"ratio_{unit}_per_s": round(statistics.median(ratios["wall"]), 3),
                                       f"ratio_{unit}_per_cpu_s": round(statistics.median(ratios["cpu"]), 3)},
         ratios_wall=[round(x, 3) for x in ratios["wall"]], ratios_cpu=[round(x, 3) for x in ratios["cpu"]],
         goal=goal, **{f"padding_fraction_{impl}": round(pad_frac[impl], 4) for impl in impls})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=256, help="dialogs per epoch")
    p.add_argument("--max-length", type=int, default=1024, help="row length; longer dialogs are truncated")
    p.add_argument("--batch-size", type=int, default=8, help="rows (packed) / examples (padded) per step")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both trainers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time measures the work)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)

    from trl import SFTConfig, SFTTrainer

    from llama2_hf.data import prepare_sft_dataset
    from llama2_hf.trainers import Llama2SFTConfig, Llama2SFTTrainer

    prefs = hh_preferences(args.examples)
    tokenizer = bench_tokenizer(prefs)
    dialogs = Dataset.from_list([{"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]}
                                 for p in prefs])
    examples, _ = prepare_sft_dataset(dialogs, tokenizer, max_length=args.max_length, on_overlength="truncate")
    lengths = [len(x) for x in examples["input_ids"]]
    nonpad = sum(lengths)
    emit(bench="sft", setup=True, examples=len(examples), nonpad_tokens=nonpad,
         median_length=statistics.median(lengths), max_length=max(lengths), threads=args.threads,
         params=sum(x.numel() for x in bench_model(len(tokenizer), args.max_length).parameters()))

    def build(impl):
        model = bench_model(len(tokenizer), args.max_length).train()
        common = dict(output_dir="/tmp/bench_sft", max_length=args.max_length, num_train_epochs=1,
                      per_device_train_batch_size=args.batch_size, **CPU)
        if impl == "llama2_hf_packed":
            return Llama2SFTTrainer(model, args=Llama2SFTConfig(packing=True, global_batch_size=None, **common),
                                    train_dataset=examples, processing_class=tokenizer)
        return SFTTrainer(model, args=SFTConfig(packing=False, **common), train_dataset=examples,
                          processing_class=tokenizer)

    compare("sft", build, ("llama2_hf_packed", "trl_padded"), nonpad, "nonpad_tokens", nonpad, args.rounds, goal=1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reward-model training (Llama2RewardTrainer) against TRL's RewardTrainer, pairs per second on the same pairs.

Data: real preference pairs with their natural length mix, Anthropic HH-RLHF harmless-base test ($LLAMA2_HF_DATA),
tokenized once as full Llama 2-Chat dialogs; both trainers get the same `chosen_ids` / `rejected_ids`. Model: the
~5M-parameter Llama 2 of bench_sft.py with a scalar head. Both use the same batch: `--batch-size` pairs per micro-step
and `--accumulation` micro-steps per optimizer step (the paper's 512-pair batches are reached by accumulation). Ours
adds the margin, the per-rating metrics and orders the pairs of each optimizer step by length (same pairs per step, less
padding); TRL's uses its defaults. Each round trains one epoch with each trainer from the same initial weights.

    python benchmarks/bench_reward.py [--pairs 256 --batch-size 8 --accumulation 8 --rounds 3 --threads 1]

One JSON line per measurement, then a summary line with the median pairs/s ratios (goal >= 1.0), per wall-clock
second and per CPU second of this process (the stable figure on a shared machine).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys

import torch
from bench_sft import CPU, bench_model, bench_tokenizer, compare, emit, hh_preferences


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=256, help="preference pairs per epoch")
    p.add_argument("--max-length", type=int, default=1024, help="longest dialog; longer pairs are truncated")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-step")
    p.add_argument("--accumulation", type=int, default=8, help="micro-steps per optimizer step")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both trainers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time measures the work)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)

    from trl import RewardConfig, RewardTrainer

    from llama2_hf.data import prepare_preference_dataset
    from llama2_hf.trainers import Llama2RewardConfig, Llama2RewardTrainer

    prefs = hh_preferences(args.pairs)
    tokenizer = bench_tokenizer(prefs)
    pairs, _ = prepare_preference_dataset(prefs, tokenizer, max_length=args.max_length, on_overlength="truncate")
    nonpad = sum(len(c) + len(r) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"]))
    trl_pairs = pairs.select_columns(["chosen_ids", "rejected_ids"])
    emit(bench="reward", setup=True, pairs=len(pairs), nonpad_tokens=nonpad, threads=args.threads,
         median_length=statistics.median(pairs["length"]))

    def build(impl):
        model = bench_model(len(tokenizer), args.max_length, causal_lm=False).train()
        common = dict(output_dir="/tmp/bench_reward", max_length=args.max_length, num_train_epochs=1,
                      per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.accumulation,
                      **CPU)
        if impl == "llama2_hf":
            return Llama2RewardTrainer(model, args=Llama2RewardConfig(global_batch_size=None, **common),
                                       train_dataset=pairs, processing_class=tokenizer)
        return RewardTrainer(model, args=RewardConfig(**common), train_dataset=trl_pairs, processing_class=tokenizer)

    compare("reward", build, ("llama2_hf", "trl"), len(pairs), "pairs", nonpad, args.rounds, goal=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which of the world's sums each helpfulness reward model of a quickstart run misranks, next to the sums each
version's greedy policy gets wrong.

    python benchmarks/bench_quickstart_rm.py quickstart_output

One JSON line per reward model (the initial one, then each RLHF version's retrained one): the near misses (a stated
sum off by 1 or 2) it scores at least as high as the right answer. Then one line per evaluated policy (SFT, V1..Vn):
the sums its greedy answer gets wrong, and which of them the reward models that trained it misrank. Rejection
sampling selects by these scores and PPO climbs them, so a sum a reward model misranks is one RLHF can unlearn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llama2_hf import Llama2ForRewardModel, Llama2Tokenizer
from llama2_hf.quickstart.world import World, is_correct, near_miss_errors, parse_prompt, stated_sum
from llama2_hf.rewards import RewardModelScorer


def reward_models(out: Path) -> list[tuple[str, Path]]:
    found = [("initial", out / "rm_helpfulness")]
    versions = [p for p in (out / "rlhf").glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    found += [(v.name, v / "rm_helpfulness") for v in sorted(versions, key=lambda p: int(p.name[1:]))]
    return [(name, path) for name, path in found if (path / "config.json").is_file()]


def policy_errors(out: Path) -> dict[str, list[list[int]]]:
    files = {"sft": out / "eval_sft" / "samples_sft.jsonl"}
    files.update({p.stem.removeprefix("samples_"): p for p in sorted((out / "eval_versions").glob("samples_v*.jsonl"))})
    errors = {}
    for name, path in files.items():
        if not path.is_file():
            continue
        wrong = []
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            kind, value = parse_prompt(row["prompt"])
            if kind == "arithmetic" and not is_correct(row["prompt"], row["response"]):
                wrong.append([*value, stated_sum(row["response"])])
        errors[name] = wrong
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="A finished (or partly finished) quickstart folder.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = args.output_dir / "quickstart.json"
    if not record.is_file():
        parser.error(f"{args.output_dir} holds no quickstart run ({record.name} is missing)")
    world = World(seed=json.loads(record.read_text(encoding="utf-8"))["seed"])
    tok = Llama2Tokenizer.from_pretrained(args.output_dir / "tokenizer")
    misranked = {}
    for name, path in reward_models(args.output_dir):
        scorer = RewardModelScorer(Llama2ForRewardModel.from_pretrained(path), tok, batch_size=64)
        cases = near_miss_errors(lambda p, r: scorer.raw_scores(p, r).tolist(), world.max_operand)
        misranked[name] = {(a, b) for a, b, _ in cases}
        print(json.dumps({"reward_model": name, "near_miss_errors": len(cases),
                          "sums": len({(a, b) for a, b, _ in cases}), "cases": cases}))
    seen: set[tuple[int, int]] = set()
    for name, wrong in policy_errors(args.output_dir).items():
        # the policy of version k was trained with the reward models of versions <= k (and the initial ones)
        seen |= misranked.get("initial", set()) if name == "sft" else misranked.get(name, set())
        print(json.dumps({"policy": name, "wrong_sums": wrong,
                          "misranked_by_its_reward_models": [w for w in wrong if (w[0], w[1]) in seen]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

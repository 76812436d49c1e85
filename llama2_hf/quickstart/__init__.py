"""`llama2-hf quickstart`: the whole Llama 2-Chat pipeline on a laptop-sized synthetic example.

Tokenizer training, pretraining, SFT, helpfulness and safety reward models, rejection sampling, PPO, Ghost Attention
and evaluation, on 2 CPU cores in minutes; writes `report.md` with plots. Every stage resumes from its outputs.
"""

from __future__ import annotations

import argparse
import logging

from .pipeline import Pipeline, QuickstartConfig
from .world import World

__all__ = ["Pipeline", "QuickstartConfig", "World", "main", "run_quickstart"]


def run_quickstart(config: QuickstartConfig | None = None) -> dict:
    """Run (or resume) every stage and write the report; returns each stage's metrics."""
    return Pipeline(config or QuickstartConfig()).run()


def main(argv: list[str] | None = None) -> int:
    d = QuickstartConfig()
    p = argparse.ArgumentParser(prog="llama2-hf quickstart", description=__doc__)
    p.add_argument("--output-dir", default=d.output_dir, help=f"where every stage writes (default: {d.output_dir})")
    p.add_argument("--scale", type=float, default=d.scale,
                   help="multiply every data size and step count (default 1.0; 0.25 is the CI variant)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the world and of training")
    p.add_argument("--stages", default="", help="comma-separated subset of stages to run (default: all)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = QuickstartConfig(output_dir=args.output_dir, scale=args.scale, seed=args.seed, threads=args.threads,
                              stages=[s for s in args.stages.split(",") if s])
    results = run_quickstart(config)
    print(f"report: {config.output_dir}/report.md ({len(results)} stages)")
    return 0

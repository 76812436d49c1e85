"""`llama2-hf quickstart`: the whole Llama 2-Chat pipeline on a laptop-sized synthetic example.

Tokenizer training, pretraining, SFT, helpfulness and safety reward models, rejection sampling, PPO, Ghost Attention
and evaluation, on 2 CPU cores in minutes; writes `report.md` with plots. Every stage resumes from its outputs.
"""

from __future__ import annotations

import logging
import sys

from .pipeline import Pipeline, QuickstartConfig
from .world import World

__all__ = ["Pipeline", "QuickstartConfig", "World", "main", "run_quickstart"]

logger = logging.getLogger(__name__)


def run_quickstart(config: QuickstartConfig | None = None) -> dict:
    """Run (or resume) every stage and write the report; returns each stage's metrics. The output folder is locked
    for the run's life (a second quickstart in it is refused)."""
    from .. import run_lock

    config = config or QuickstartConfig()
    try:
        return Pipeline(config).run()
    finally:
        run_lock.release(config.output_dir)


def main(argv: list[str] | None = None) -> int:
    """`llama2-hf quickstart [--output_dir D] [--scale S] [--seed N] [--stages a b ...]`: the fields of
    `QuickstartConfig` as flags. A user error (a folder of another configuration, an unknown stage, bad data) is one
    line on stderr and exit code 2; `--debug` shows the traceback."""
    from dataclasses import fields

    from transformers import HfArgumentParser

    from ..errors import UsageError
    from ..runner import check_flags, one_line_errors, run_command

    parser = one_line_errors(HfArgumentParser(QuickstartConfig, prog="llama2-hf quickstart", description=__doc__,
                                              allow_abbrev=False))

    def body(args: list[str]) -> None:
        check_flags(args, [f.name for f in fields(QuickstartConfig)], "quickstart")
        try:
            (config,) = parser.parse_args_into_dataclasses(args)
        except ValueError as e:  # QuickstartConfig refusing a value
            raise UsageError(str(e)) from None
        run_quickstart(config)  # ends with the summary and the report's path

    return run_command("quickstart", sys.argv[1:] if argv is None else argv, body)

"""The pipeline's stages, one module each: `STAGE = Stage(name, help, dataclass_types, main)` (see `llama2_hf.runner`),
and the one way to run one: the stage's typed call, `STAGE.call(*configs)`, on instances of its own dataclasses (in any
order; the missing ones at their defaults). Every caller goes through it:

    from trl import ModelConfig
    from llama2_hf.stages import ppo
    from llama2_hf.trainers.ppo_config import Llama2PPOConfig

    record = ppo.STAGE.call(ModelConfig(model_name_or_path="out/rs"), ppo.PPOArguments(prompts_file=["p.jsonl"]),
                            Llama2PPOConfig(output_dir="out/ppo", temperature=1.0))

`cli_main(name, argv)` parses `llama2-hf <name>` (flags or `--config recipe.yaml`) into those instances and calls it;
`run_stage(name, **fields)` routes keyword values to their dataclasses (`runner.build`) and calls it; the RLHF loop
(`rlhf_loop`) and the quickstart are pipelines of typed calls, setting each call's folders with `runner.with_fields`.
`main` keeps the run's bookkeeping (`runner.StageRun`: run.json, resume or refusal, the folder's lock).

Order of the chain (each stage reads the folders the previous ones write):

    convert-meta -> pretrain -> sft -> train-rm (helpfulness, safety) -> eval-rm -> rejection-sample -> ppo
    -> gatt -> distill -> refusals -> eval -> push
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from ..records import RunRecord
from ..runner import Stage, _pop_flag, build, field_names, parse_args, run_command

# command name -> module defining STAGE (imported only when the command runs, so `--help` stays fast)
STAGES: dict[str, str] = {
    "convert-meta": "llama2_hf.stages.convert_meta",
    "pretrain": "llama2_hf.stages.pretrain",
    "sft": "llama2_hf.stages.sft",
    "train-rm": "llama2_hf.stages.reward",
    "eval-rm": "llama2_hf.stages.reward_eval",
    "rejection-sample": "llama2_hf.stages.rejection_sampling",
    "ppo": "llama2_hf.stages.ppo",
    "gatt": "llama2_hf.stages.gatt",
    "gatt-eval": "llama2_hf.stages.gatt_eval",
    "gatt-lists": "llama2_hf.stages.gatt_lists",
    "distill": "llama2_hf.stages.distill",
    "refusals": "llama2_hf.stages.refusals",
    "eval": "llama2_hf.stages.evaluate",
    "push": "llama2_hf.stages.push",
    "iterate": "llama2_hf.stages.iterate",
}


def get_stage(name: str) -> Stage:
    """The `Stage` of command `name` (ValueError for an unknown name)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[name]).STAGE


load_stage = get_stage


def run_stage(name: str, /, redo: bool = False, **values) -> RunRecord:
    """Run stage `name` in this process with the given field values: `get_stage(name).call(*build(...))`, for
    callers that hold keyword values (tests, scripts). `redo=True` runs again in a folder that holds a finished or
    interrupted run (its contents are removed)."""
    stage = get_stage(name)
    return stage.call(*build(stage, **values), redo=redo)


def cli_main(name: str, argv: Sequence[str]) -> int:
    """`llama2-hf <name> ...` for a stage: parse its dataclasses, run its one runner. Bare flags of every stage:
    `--redo` runs again in a folder that holds a finished or interrupted run, `--progress` shows the libraries'
    progress bars (weight loading, dataset maps; off by default), `--debug` shows the traceback of an error."""
    stage = get_stage(name)

    def body(args: list[str]) -> None:
        args, redo = _pop_flag(args, "--redo")
        if "progress" not in field_names(stage):  # a stage with its own `progress` setting applies it itself
            args, progress = _pop_flag(args, "--progress")
            if progress:
                from ..console import library_progress

                library_progress(True)
        stage.call(*parse_args(stage, args)[0], redo=redo)

    return run_command(name, argv, body)


__all__ = ["STAGES", "cli_main", "get_stage", "load_stage", "run_stage"]


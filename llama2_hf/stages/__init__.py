"""The pipeline's stages, one module each: `STAGE = Stage(name, help, dataclass_types, main)` (see `llama2_hf.runner`).

Order of the chain (each stage reads the folders the previous ones write):

    convert-meta -> pretrain -> sft -> train-rm (helpfulness, safety) -> eval-rm -> rejection-sample -> ppo
    -> gatt -> distill -> refusals -> eval -> push
"""

from __future__ import annotations

import importlib

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


def load_stage(name: str):
    """The `Stage` of command `name` (ValueError for an unknown name)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return importlib.import_module(STAGES[name]).STAGE

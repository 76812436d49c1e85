"""Recipes: documented YAML files (recipes/<stage>/*.yaml) that load into the stage's config dataclass.

    stage, config, extra = load_recipe("recipes/sft/llama2-7b.yaml", overrides={"output_dir": "out/sft"})
    # stage == "sft"; config is a Llama2SFTConfig; extra["model_name_or_path"] == "meta-llama/Llama-2-7b-hf"

A recipe is flat, as TRL's YAML configs are: `stage:` names the config class (`RECIPE_STAGES`); every other
top-level key is either a recipe-level key (`COMMON_KEYS`, `STAGE_KEYS`: what to train and on what: model, datasets,
reward models, LoRA / quantization sections), or a field of the stage's config dataclass. Anything else is a
ValueError naming the key, the file and the closest valid name, so a typo never silently falls back to a default.
Sections are built into objects: `peft` -> `peft.LoraConfig`, `quantization` -> `transformers.BitsAndBytesConfig`,
`finetune` (rejection sampling) -> `Llama2SFTConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

# stage -> "module:ConfigClass" (imported when a recipe of that stage is loaded)
RECIPE_STAGES: dict[str, str] = {
    "sft": "llama2_hf.trainers.sft:Llama2SFTConfig",
    "reward": "llama2_hf.trainers.reward:Llama2RewardConfig",
    "ppo": "llama2_hf.trainers.ppo:Llama2PPOConfig",
    "rejection_sampling": "llama2_hf.rejection_sampling:RejectionSamplingConfig",
}
STAGE_ALIASES = {"rm": "reward", "train-rm": "reward", "rejection-sample": "rejection_sampling",
                 "rs": "rejection_sampling"}


@dataclass(frozen=True)
class RecipeKey:
    """A recipe-level key: what it means and what its value must be.

    kind: "str" (a path or Hub id), "paths" (mapping name -> path/Hub id or list of them), "float", "int",
    "choice" (one of `choices`), or "object" (a mapping of the fields of `target`, built into that object).
    """

    doc: str
    kind: str
    choices: tuple = ()
    target: str | None = None


COMMON_KEYS: dict[str, RecipeKey] = {
    "model_name_or_path": RecipeKey("Hub id or directory of the model the stage starts from", "str"),
    "tokenizer_name_or_path": RecipeKey("tokenizer Hub id or directory, when not saved with the model", "str"),
    "datasets": RecipeKey("mapping: role (train, eval, mix_with, prompts) -> data file, directory or Hub dataset, "
                          "or a list of them", "paths"),
    "peft": RecipeKey("LoRA: fields of peft.LoraConfig", "object", target="peft:LoraConfig"),
    "quantization": RecipeKey("quantized loading of the base model (QLoRA): fields of transformers."
                              "BitsAndBytesConfig", "object", target="transformers:BitsAndBytesConfig"),
}
_REWARD_KEYS = {
    "reward_models": RecipeKey("mapping: helpfulness / safety -> reward model directory or Hub id", "paths"),
    "safety_threshold": RecipeKey("safety gate on sigmoid(R_s) of the piecewise reward (0.15: paper §3.2.3)",
                                  "float"),
}
STAGE_KEYS: dict[str, dict[str, RecipeKey]] = {
    "sft": {},
    "reward": {
        "data_mix": RecipeKey("how datasets.train and datasets.mix_with are mixed (paper §3.2.2): none, helpfulness "
                              "(all of train + an equal amount of mix_with) or safety (train : mix_with = 90 : 10)",
                              "choice", choices=("none", "helpfulness", "safety")),
    },
    "ppo": {
        **_REWARD_KEYS,
        "reward_whitening": RecipeKey("statistics of WHITEN(LOGIT(R_c)) (paper silent)", "choice",
                                      choices=("batch", "running", "none")),
        "value_model_name_or_path": RecipeKey("critic directory (default: per value_model_init)", "str"),
    },
    "rejection_sampling": {
        **_REWARD_KEYS,
        "iteration": RecipeKey("RLHF iteration number (the selection pool includes earlier iterations)", "int"),
        "finetune": RecipeKey("SFT on the selected samples: fields of Llama2SFTConfig", "object",
                              target="llama2_hf.trainers.sft:Llama2SFTConfig"),
    },
}


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def accepted_keys(cls) -> list[str]:
    """Names `cls(...)` accepts: the named parameters of its `__init__` (for a dataclass, its init fields), not
    `**kwargs`, which e.g. BitsAndBytesConfig uses to swallow typos."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_key_error(path, key: str, where: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{path}: unknown key {key!r} {where}{hint}")


_NUMERIC_TYPE_WORDS = {"float", "int", "bool", "None", "Optional", "Union", "typing"}


def _check_scalar_types(cls, values: Mapping, path, where: str) -> None:
    """A string given to a purely numeric / boolean dataclass field is an error. The usual cause is PyYAML reading
    `1e-6` (no dot) as a string: YAML 1.1 floats need a dot, `1.0e-6`."""
    if not dataclasses.is_dataclass(cls):
        return
    types = {f.name: f.type if isinstance(f.type, str) else str(f.type).replace("<class '", "").replace("'>", "")
             for f in dataclasses.fields(cls)}
    for key, value in values.items():
        words = set(re.findall(r"\w+", types.get(key, "")))
        if isinstance(value, str) and words and words <= _NUMERIC_TYPE_WORDS:
            raise ValueError(f"{path}: {key!r} {where} must be a {types[key]}, got the string {value!r} (YAML reads "
                             "1e-6 as a string: write 1.0e-6)")


def _build(cls, values: Mapping, path, where: str):
    """`cls(**values)` after checking every key; errors name the file and the section."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: {where} must be a mapping of field: value, got {type(values).__name__}")
    valid = accepted_keys(cls)
    for key in values:
        if key not in valid:
            raise _unknown_key_error(path, key, where, valid)
    _check_scalar_types(cls, values, path, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid {where}: {e}") from e


def read_recipe(path: str | os.PathLike) -> tuple[str, dict]:
    """(stage, raw mapping) of a recipe file, with the stage validated; no config object is built."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping with a 'stage' key, got {type(raw).__name__}")
    stage = raw.get("stage")
    if not isinstance(stage, str):
        raise ValueError(f"{path}: missing 'stage' (one of {sorted(RECIPE_STAGES)})")
    stage = STAGE_ALIASES.get(stage, stage)
    if stage not in RECIPE_STAGES:
        raise ValueError(f"{path}: unknown stage {raw['stage']!r}; expected one of {sorted(RECIPE_STAGES)}")
    return stage, raw


# Applied by `cpu=True` to every config that has these fields (TrainingArguments-based ones): a GPU recipe then
# builds, and runs, on a machine without an accelerator (transformers rejects bf16 there).
CPU_OVERRIDES = {"use_cpu": True, "bf16": False, "activation_checkpointing": False}


def load_recipe(path: str | os.PathLike, overrides: Mapping | None = None, *,
                cpu: bool = False) -> tuple[str, object, dict]:
    """Load a recipe into `(stage, config_object, extra)`.

    `config_object` is the stage's config dataclass built from the recipe's config fields, with `overrides` (config
    fields, e.g. from command-line flags) applied on top. `extra` holds the recipe-level keys present in the file
    (`COMMON_KEYS` and the stage's `STAGE_KEYS`), "object" keys built into their objects (`peft` -> LoraConfig,
    `quantization` -> BitsAndBytesConfig, `finetune` -> Llama2SFTConfig). `cpu=True` applies `CPU_OVERRIDES` to the
    config and to config sections that have those fields.
    Raises ValueError naming the file and key for an unknown stage, an unknown key or an invalid value.
    """
    stage, raw = read_recipe(path)
    recipe_keys = {**COMMON_KEYS, **STAGE_KEYS.get(stage, {})}
    config_cls = _import(RECIPE_STAGES[stage])
    valid = accepted_keys(config_cls)
    config_fields = {k: v for k, v in raw.items() if k != "stage" and k not in recipe_keys}
    for key in config_fields:
        if key not in valid:
            raise _unknown_key_error(path, key, f"for stage {stage!r} (neither a field of {config_cls.__name__} "
                                     "nor a recipe key)", valid + list(recipe_keys))
    config = _build(config_cls, {**config_fields, **_cpu_fields(config_cls, cpu), **(overrides or {})}, path,
                    f"in the {config_cls.__name__} fields")
    extra = {k: _check_extra(path, k, recipe_keys[k], v, cpu) for k, v in raw.items() if k in recipe_keys}
    return stage, config, extra


def _cpu_fields(cls, cpu: bool) -> dict:
    if not cpu:
        return {}
    valid = accepted_keys(cls)
    return {k: v for k, v in CPU_OVERRIDES.items() if k in valid}


def _check_extra(path, key: str, spec: RecipeKey, value, cpu: bool = False):
    """The value of a recipe-level key, validated (and built, for "object" keys)."""
    if spec.kind == "object":
        cls = _import(spec.target)
        if isinstance(value, Mapping):
            value = {**value, **_cpu_fields(cls, cpu)}
        return _build(cls, value, path, f"in section {key!r}")
    if spec.kind == "paths":
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: {key!r} must be a mapping (name: path), got {type(value).__name__}")
        for name, item in value.items():
            items = item if isinstance(item, list) else [item]
            if not items or not all(isinstance(v, str) and v for v in items):
                raise ValueError(f"{path}: {key}.{name} must be a path / Hub id or a list of them, got {item!r}")
        return dict(value)
    expected = {"str": str, "int": int, "float": (int, float), "choice": str}[spec.kind]
    if not isinstance(value, expected) or isinstance(value, bool) or (spec.kind == "str" and not value):
        raise ValueError(f"{path}: {key!r} must be a {spec.kind} ({spec.doc}), got {value!r}")
    if spec.kind == "choice" and value not in spec.choices:
        raise ValueError(f"{path}: {key!r} must be one of {list(spec.choices)}, got {value!r}")
    return float(value) if spec.kind == "float" else value


__all__ = ["COMMON_KEYS", "RECIPE_STAGES", "STAGE_KEYS", "RecipeKey", "accepted_keys", "load_recipe", "read_recipe"]

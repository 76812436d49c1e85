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


# ---------------------------------------------------------------------------------------------------------------------
# Running a recipe: `llama2-hf <stage> --recipe PATH [--cpu] [--set key=value ...]`
# ---------------------------------------------------------------------------------------------------------------------

COMMAND_STAGES = {"sft": "sft", "train-rm": "reward", "rejection-sample": "rejection_sampling", "ppo": "ppo"}


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _load_sft_data(paths) -> "Dataset":
    from datasets import concatenate_datasets

    from .data import load_any

    return concatenate_datasets([load_any(p) for p in _as_list(paths)])


def _load_preferences(paths) -> "Dataset":
    from datasets import concatenate_datasets

    from .data import load_preference_data

    return concatenate_datasets([load_preference_data(p)[0] for p in _as_list(paths)])


def _train_and_save(trainer, output_dir: str) -> None:
    trainer.train()
    trainer.save_model(output_dir)
    trainer.processing_class.save_pretrained(output_dir)


def run_recipe(path: str | os.PathLike, overrides: Mapping | None = None, *, cpu: bool = False) -> dict:
    """Run the stage a recipe describes, with `overrides` on top of its config fields. Returns a small summary."""
    stage, config, extra = load_recipe(path, overrides, cpu=cpu)
    datasets = extra.get("datasets") or {}
    model = extra["model_name_or_path"]
    quantization, peft_config = extra.get("quantization"), extra.get("peft")
    if stage == "sft":
        from .trainers.sft import Llama2SFTTrainer

        if quantization is not None:
            config.model_init_kwargs = {**(config.model_init_kwargs or {}), "quantization_config": quantization}
        trainer = Llama2SFTTrainer(
            model=model, args=config, train_dataset=_load_sft_data(datasets["train"]),
            eval_dataset=_load_sft_data(datasets["eval"]) if datasets.get("eval") else None, peft_config=peft_config)
        _train_and_save(trainer, config.output_dir)
        return {"stage": stage, "output_dir": config.output_dir}
    if stage == "reward":
        from .data import mix_helpfulness_rm_data, mix_safety_rm_data
        from .trainers.reward import Llama2RewardTrainer

        train = _load_preferences(datasets["train"])
        if datasets.get("mix_with"):
            mix = {"helpfulness": mix_helpfulness_rm_data, "safety": mix_safety_rm_data}[extra.get("data_mix",
                                                                                                "helpfulness")]
            train = mix({"train": train}, {"mix_with": _load_preferences(datasets["mix_with"])}, seed=config.seed)
        kwargs = {"quantization_config": quantization} if quantization is not None else {}
        trainer = Llama2RewardTrainer(
            model=model, args=config, train_dataset=train,
            eval_dataset=_load_preferences(datasets["eval"]) if datasets.get("eval") else None,
            peft_config=peft_config, **kwargs)
        _train_and_save(trainer, config.output_dir)
        return {"stage": stage, "output_dir": config.output_dir}

    # Sampling stages: policy, tokenizer and the safety-gated reward from the recipe's reward models.
    import torch

    from .data import load_any
    from .modeling_llama2 import Llama2ForCausalLM
    from .rejection_sampling import load_reward
    from .tokenization_llama2 import Llama2Tokenizer

    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    dtype = "float32" if device == "cpu" else "bfloat16"
    tokenizer = Llama2Tokenizer.from_pretrained(extra.get("tokenizer_name_or_path") or model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    load_kwargs = {"dtype": getattr(torch, dtype)}
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization
    policy = Llama2ForCausalLM.from_pretrained(model, **load_kwargs)
    if quantization is None:
        policy = policy.to(device)
    rms = extra["reward_models"]
    reward = load_reward(rms["helpfulness"], rms.get("safety"), tokenizer, extra.get("safety_threshold", 0.15),
                         extra.get("reward_whitening", "batch"), device, dtype, batch_size=8)
    prompts = [dict(row) for row in load_any(datasets["prompts"])]
    if stage == "rejection_sampling":
        from .rejection_sampling import RejectionSampler

        if peft_config is not None:
            from peft import get_peft_model

            policy = get_peft_model(policy, peft_config)
        output_dir = (overrides or {}).get("output_dir") or extra.get("output_dir") or "rejection_sampling"
        sampler = RejectionSampler(policy, tokenizer, reward, output_dir, config)
        summary = sampler.run_iteration(prompts, extra.get("iteration", 1), sft_config=extra.get("finetune"))
        model_dir = Path(output_dir) / "model"
        policy.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        return {"stage": stage, "output_dir": str(output_dir), **summary}
    if stage == "ppo":
        from .trainers.ppo import Llama2PPOTrainer

        value_model = None
        if extra.get("value_model_name_or_path"):
            from .modeling_llama2 import Llama2ForRewardModel

            value_model = Llama2ForRewardModel.from_pretrained(extra["value_model_name_or_path"]).to(device)
        trainer = Llama2PPOTrainer(args=config, model=policy, processing_class=tokenizer, reward=reward,
                                   train_dataset=prompts, value_model=value_model, peft_config=peft_config)
        trainer.train()
        return {"stage": stage, "output_dir": config.output_dir}
    raise ValueError(f"{path}: stage {stage!r} cannot be run from a recipe (expected one of "
                     f"{sorted(set(COMMAND_STAGES.values()))})")


def recipe_main(command: str, argv: list[str]) -> int:
    """`llama2-hf <command> --recipe PATH [--cpu] [--set key=value ...]`: run a stage from its recipe."""
    import argparse
    import logging

    p = argparse.ArgumentParser(prog=f"llama2-hf {command} --recipe", description=run_recipe.__doc__)
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/README.md)")
    p.add_argument("--cpu", action="store_true", help="run on CPU: fp32, no bf16, no activation checkpointing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the recipe (repeatable), e.g. --set output_dir=out/sft")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", parsed):
            parsed = float(parsed)  # YAML 1.1 reads 1e-6 as a string; on the command line it means the number
        overrides[key] = parsed
    stage, _ = read_recipe(args.recipe)
    if stage != COMMAND_STAGES[command]:
        p.error(f"{args.recipe} is a {stage!r} recipe, not one for `llama2-hf {command}`")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(run_recipe(args.recipe, overrides, cpu=args.cpu))
    return 0

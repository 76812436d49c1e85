"""Every recipe YAML loads into its stage's config class with the paper's values; every accelerate config goes through
accelerate's own loader and launch-time validation; every file is documented (each key commented, listed in
recipes/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llama2_hf.recipes import CPU_OVERRIDES, RECIPE_STAGES, load_recipe, read_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STAGE_DIRS = sorted(RECIPES / stage for stage in RECIPE_STAGES)
RECIPE_FILES = sorted(p for d in STAGE_DIRS for p in d.glob("*.yaml"))
ACCELERATE_FILES = sorted((RECIPES / "accelerate").glob("*.yaml"))
# Fields TrainingArguments normalises after loading (enums, "none" -> [], derived accumulation).
NORMALISED = {"report_to", "gradient_accumulation_steps"}


def _ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


def _value(v):
    return getattr(v, "value", v)  # enums (lr_scheduler_type, save_strategy, ...) compare by their string


def test_every_stage_has_the_size_and_adapter_variants():
    for stage_dir in STAGE_DIRS:
        names = {p.stem for p in stage_dir.glob("*.yaml")}
        assert {"llama2-7b", "llama2-13b", "llama2-70b", "llama2-7b-lora", "llama2-7b-qlora"} <= names, stage_dir
    assert {p.name for p in ACCELERATE_FILES} >= {"cpu.yaml", "ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml",
                                                   "multi_node.yaml"}


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_recipe_loads_into_its_config_class(path):
    stage, config, extra = load_recipe(path, cpu=True)  # no GPU here: transformers rejects bf16 without use_cpu
    assert stage == path.parent.name
    module, cls_name = RECIPE_STAGES[stage].split(":")
    assert type(config).__name__ == cls_name
    _, raw = read_recipe(path)
    for key, value in raw.items():
        if key in extra or key == "stage" or key in NORMALISED or key in CPU_OVERRIDES or value is None:
            continue  # null asks the config to derive the value (kl_coef from model_size, ...)
        assert _value(getattr(config, key)) == value, key
    assert "model_name_or_path" in extra and "datasets" in extra
    size = re.match(r"llama2-(\d+b)", path.stem).group(1)
    assert size in extra["model_name_or_path"].lower()
    if "lora" in path.stem:
        assert type(extra["peft"]).__name__ == "LoraConfig"
    if "qlora" in path.stem:
        assert extra["quantization"].load_in_4bit and extra["quantization"].bnb_4bit_quant_type == "nf4"


def _load(stage_dir: str, name: str):
    return load_recipe(RECIPES / stage_dir / f"{name}.yaml", cpu=True)


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_full_fine_tuning_recipes_carry_the_paper_values(size):
    _, sft, _ = _load("sft", f"llama2-{size}")  # paper §3.1
    assert (sft.learning_rate, _value(sft.lr_scheduler_type), sft.weight_decay) == (2e-5, "cosine", 0.1)
    assert (sft.num_train_epochs, sft.max_length, sft.global_batch_size, sft.packing) == (2, 4096, 64, True)
    _, rm, _ = _load("reward", f"llama2-{size}")  # paper §3.2.2
    assert rm.learning_rate == (5e-6 if size == "70b" else 1e-5)
    assert (rm.num_train_epochs, rm.global_batch_size, rm.warmup_steps, rm.min_warmup_steps) == (1, 512, 0.03, 5)
    assert rm.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and (rm.adam_beta2, rm.adam_epsilon) == (0.95, 1e-5)
    _, ppo, extra = _load("ppo", f"llama2-{size}")  # paper §3.2.3
    assert (ppo.learning_rate, ppo.batch_size, ppo.mini_batch_size, ppo.clip_range) == (1e-6, 512, 64, 0.2)
    assert ppo.kl_coef == (0.005 if size == "70b" else 0.01)
    assert (ppo.weight_decay, ppo.max_grad_norm, ppo.adam_beta2) == (0.1, 1.0, 0.95)
    assert extra["safety_threshold"] == 0.15
    _, rs, extra = _load("rejection_sampling", f"llama2-{size}")
    assert extra["safety_threshold"] == 0.15 and rs.pool == "all"  # RLHF-V3 fix: best of all iterations
    assert extra["finetune"].learning_rate == 2e-5 and extra["finetune"].global_batch_size == 64


def test_safety_reward_recipe_mixes_90_10_with_the_auxiliary_loss():
    _, rm, extra = _load("reward", "llama2-7b-safety")
    assert extra["data_mix"] == "safety" and rm.safety_aux_loss_coef > 0


@pytest.mark.parametrize("path", RECIPE_FILES + ACCELERATE_FILES, ids=_ids(RECIPE_FILES + ACCELERATE_FILES))
def test_every_key_is_commented_and_no_float_is_read_as_a_string(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# "), "a recipe starts with a comment saying what it is for"
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            assert " # " in line, f"{path.name}:{n} has no comment: {line!r}"

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
        else:
            yield node

    for value in walk(yaml.safe_load(path.read_text(encoding="utf-8"))):
        assert not (isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value)), value


def test_readme_documents_every_recipe():
    readme = (RECIPES / "README.md").read_text(encoding="utf-8")
    for path in RECIPE_FILES + ACCELERATE_FILES:
        assert str(path.relative_to(RECIPES.parent)) in readme, path


def _launch(path: Path):
    """What `accelerate launch --config_file path -m llama2_hf.cli ...` resolves: (args, environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "llama2_hf.cli", "sft", "--help"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return args, prepare_multi_gpu_env(args)
    return args, prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=_ids(ACCELERATE_FILES))
def test_accelerate_config_parses_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # rejects unknown keys
    assert isinstance(config, ClusterConfig)
    args, env = _launch(path)
    assert args.num_processes == config.num_processes >= 1


def test_accelerate_configs_launch_what_their_names_say(monkeypatch):
    args, env = _launch(RECIPES / "accelerate" / "cpu.yaml")
    assert args.num_processes == 1 and env["ACCELERATE_USE_CPU"] == "True" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    args, env = _launch(RECIPES / "accelerate" / "ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    args, env = _launch(RECIPES / "accelerate" / "deepspeed_zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    args, env = _launch(RECIPES / "accelerate" / "multi_node.yaml")
    assert args.use_fsdp and args.num_machines > 1 and args.main_process_ip
    assert args.num_processes % args.num_machines == 0


@pytest.mark.parametrize("name", ["fsdp.yaml", "multi_node.yaml"])
def test_fsdp_config_full_shards_and_wraps_each_decoder_layer(name, monkeypatch, tiny_model_factory):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from llama2_hf.modeling_llama2 import Llama2DecoderLayer

    _, env = _launch(RECIPES / "accelerate" / name)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator builds from the launcher's environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    plugin.set_auto_wrap_policy(tiny_model_factory())  # resolves the class name on a real model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {Llama2DecoderLayer}


def test_bad_recipes_raise_errors_naming_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    cases = {
        "stage: sft\nlearnin_rate: 2.0e-5\n": r"bad.yaml: unknown key 'learnin_rate' .*did you mean 'learning_rate'",
        "stage: sft\nlearning_rate: 2e-5\n": r"'learning_rate' .* got the string '2e-5'",
        "stage: sft\nquantization: {load_in_4bitt: true}\n": r"unknown key 'load_in_4bitt' in section 'quantization'",
        "stage: dpo\n": r"unknown stage 'dpo'",
        "learning_rate: 1.0\n": r"missing 'stage'",
        "stage: reward\ndata_mix: both\n": r"'data_mix' must be one of",
        "stage: ppo\ndatasets: {prompts: 3}\n": r"datasets.prompts must be a path",
        "stage: ppo\nbatch_size: 500\n": r"invalid in the Llama2PPOConfig fields: batch_size \(500\)",
    }
    for body, message in cases.items():
        path.write_text(body)
        with pytest.raises(ValueError, match=message):
            load_recipe(path, cpu=True)


def test_overrides_apply_on_top_of_the_recipe():
    _, config, _ = load_recipe(RECIPES / "sft" / "llama2-7b.yaml", {"output_dir": "elsewhere", "max_length": 512},
                               cpu=True)
    assert (config.output_dir, config.max_length, config.learning_rate) == ("elsewhere", 512, 2e-5)
    assert config.use_cpu and not config.bf16

"""The shipped recipes: each one parses with its stage's own parser (`--config`), every key is commented, the chain's
paths connect (each input is the output of an earlier recipe), and no recipe trains bf16 weights. Plus the rule
behind `--config`: every argument of a stage is one dataclass field, defined once, and no module parses its own
command line."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from llama2_hf.runner import UsageError, field_names, parse_args
from llama2_hf.stages import get_stage
from llama2_hf.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# recipes/<folder>/ -> the command whose arguments its files hold
FOLDER_STAGE = {"sft": "sft", "reward": "train-rm", "rejection_sampling": "rejection-sample", "ppo": "ppo",
                "gatt": "gatt", "eval": "eval", "push": "push"}
# recipes/<family>/<stage folder>[-variant].yaml: one model family's recipes (recipes/qwen2.5-7b/sft.yaml, ...)
FAMILY_FOLDERS = sorted(p.name for p in RECIPES.iterdir() if p.is_dir() and p.name not in (*FOLDER_STAGE, "accelerate"))
RECIPE_FILES = sorted([p for folder in FOLDER_STAGE for p in (RECIPES / folder).glob("*.yaml")]
                      + [p for folder in FAMILY_FOLDERS for p in (RECIPES / folder).glob("*.yaml")])


def stage_of(path: Path) -> str:
    """The command a recipe file holds the arguments of: its stage folder's, or in a family folder its file name's."""
    return FOLDER_STAGE[path.parent.name if path.parent.name in FOLDER_STAGE else path.stem.split("-")[0]]
# Stages whose model an optimizer updates: their recipes must keep float32 master weights.
TRAINING_STAGES = {"sft", "train-rm", "rejection-sample", "ppo", "pretrain", "distill"}
# Arguments that name another stage's folder (or a file inside one).
INPUT_FIELDS = ("model_name_or_path", "train_file", "eval_file", "mix_file", "prompts_file", "dialogues_file",
                "helpfulness_reward_model", "safety_reward_model", "tokenizer_name_or_path")
# The 7B chain in the order it runs: (recipe, what its outputs must be called).
CHAIN_7B = [
    ("sft/llama2-7b.yaml", "out/llama-2-7b-sft"),
    ("reward/llama2-7b.yaml", "out/llama-2-7b-helpfulness-rm"),
    ("reward/llama2-7b-safety.yaml", "out/llama-2-7b-safety-rm"),
    ("rejection_sampling/llama2-7b.yaml", "out/llama-2-7b-rs"),
    ("ppo/llama2-7b.yaml", "out/llama-2-7b-ppo"),
    ("gatt/llama2-7b.yaml", "out/llama-2-7b-gatt"),
    ("sft/llama2-7b-gatt.yaml", "out/llama-2-7b-chat"),
    ("eval/llama2-7b.yaml", "out/llama-2-7b-chat-eval"),
    ("push/llama2-7b.yaml", "out/llama-2-7b-chat-push"),
]


def _ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _stage_or_skip(name: str):
    """The stage's declaration; a command whose module is not in the tree yet is skipped, naming the module."""
    if importlib.util.find_spec(STAGES[name]) is None:
        pytest.skip(f"{STAGES[name]} (the `{name}` stage) is not in the tree")
    return get_stage(name)


def _paths(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_recipe_parses_with_its_stage_parser(path):
    stage = _stage_or_skip(stage_of(path))
    raw = _raw(path)
    argv = ["--config", str(path)]
    names = field_names(stage)
    if "use_cpu" in names and raw.get("bf16"):
        # transformers refuses bf16 without an accelerator; the flags override the recipe as on a laptop
        argv += ["--use_cpu", "true", "--bf16", "false"]
    instances, _ = parse_args(stage, argv)
    values = {f.name: getattr(inst, f.name) for inst in instances for f in dataclasses.fields(inst) if f.init}
    for key, value in raw.items():
        if key in ("bf16", "use_cpu") or value is None:
            continue
        got = getattr(values[key], "value", values[key])  # enums (lr_scheduler_type, ...) compare by their string
        if key == "report_to":
            continue  # TrainingArguments turns "none" into []
        if isinstance(value, list) and isinstance(got, tuple):
            got = list(got)
        assert got == value, f"{path.name}: {key} parsed as {got!r}, the recipe says {value!r}"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_recipe_keys_are_commented_and_launch_line_names_the_file(path):
    text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.match(r"^[a-z0-9_]+: ", line), f"{path}:{n}: a recipe is flat (field: value), got {line!r}"
            assert "  # " in line, f"{path}:{n}: every key carries a comment saying what it is"
    rel = str(path.relative_to(ROOT))
    stage = stage_of(path)
    assert re.search(rf"(-m llama2_hf\.cli|llama2-hf) {stage} --config {re.escape(rel)}", text), \
        f"{rel}: its header shows the launch line of this file"
    assert "--recipe" not in text


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_no_recipe_trains_bf16_weights(path):
    stage = stage_of(path)
    raw = _raw(path)
    if stage in TRAINING_STAGES:
        assert raw.get("dtype", "float32") == "float32", f"{path.name}: trained weights stay float32 (bf16: compute)"
        if "bf16" in raw:
            assert raw["bf16"] is True, f"{path.name}: GPU recipes compute in bf16 over fp32 master weights"
    from trl import ModelConfig

    from llama2_hf.stages.common import check_trainable_dtype

    model_args = ModelConfig(**{k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}})
    check_trainable_dtype(model_args, trainable=stage in TRAINING_STAGES)  # the stages' own refusal passes


def test_the_refusal_of_bf16_weights_can_fail():
    from trl import ModelConfig

    from llama2_hf.stages.common import check_trainable_dtype

    with pytest.raises(UsageError, match="float32 master weights"):
        check_trainable_dtype(ModelConfig(dtype="bfloat16"), trainable=True)


def test_the_7b_chain_connects_without_editing():
    written: set[str] = set()
    for rel, output in CHAIN_7B:
        raw = _raw(RECIPES / rel)
        for key in INPUT_FIELDS:
            for value in _paths(raw.get(key)):
                if value.startswith("out/"):
                    assert value in written, f"{rel}: {key}={value} is not written by an earlier recipe of the chain"
        if output is not None:
            assert raw["output_dir"] == output, rel
            written.add(output)
    # what each link reads, as the pipeline is described (paper §3): the RMs start from SFT, PPO from RS, ...
    expect = {"reward/llama2-7b.yaml": {"model_name_or_path": "out/llama-2-7b-sft"},
              "reward/llama2-7b-safety.yaml": {"model_name_or_path": "out/llama-2-7b-sft"},
              "rejection_sampling/llama2-7b.yaml": {"model_name_or_path": "out/llama-2-7b-sft",
                                                    "helpfulness_reward_model": "out/llama-2-7b-helpfulness-rm",
                                                    "safety_reward_model": "out/llama-2-7b-safety-rm"},
              "ppo/llama2-7b.yaml": {"model_name_or_path": "out/llama-2-7b-rs",
                                     "helpfulness_reward_model": "out/llama-2-7b-helpfulness-rm",
                                     "safety_reward_model": "out/llama-2-7b-safety-rm"},
              "gatt/llama2-7b.yaml": {"model_name_or_path": "out/llama-2-7b-ppo"},
              "sft/llama2-7b-gatt.yaml": {"model_name_or_path": "out/llama-2-7b-ppo",
                                          "train_file": ["out/llama-2-7b-gatt"]},
              "eval/llama2-7b.yaml": {"model_name_or_path": "out/llama-2-7b-chat"},
              "push/llama2-7b.yaml": {"model_name_or_path": "out/llama-2-7b-chat"}}
    for rel, fields in expect.items():
        raw = _raw(RECIPES / rel)
        for key, value in fields.items():
            assert raw[key] == value, f"{rel}: {key}"


def test_every_out_path_of_every_recipe_is_written_by_a_recipe():
    outputs = {_raw(p).get("output_dir") for p in RECIPE_FILES}
    for path in RECIPE_FILES:
        raw = _raw(path)
        for key in INPUT_FIELDS:
            for value in _paths(raw.get(key)):
                if value.startswith("out/"):
                    assert value in outputs, f"{path.name}: {key}={value} is no recipe's output_dir"


def test_readme_lists_every_recipe():
    readme = (RECIPES / "README.md").read_text(encoding="utf-8")
    for path in RECIPE_FILES:
        rel = str(path.relative_to(RECIPES))
        # the size and adapter variants are described together, the 7B chain file by file
        assert rel in readme or re.search(r"-(13b|70b)|-q?lora$", path.stem), rel


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_field_is_defined_once_per_stage(name):
    stage = _stage_or_skip(name)
    owner: dict[str, str] = {}
    for cls in stage.dataclass_types:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            assert f.name not in owner, f"`{name}`: {f.name} is a field of both {owner[f.name]} and {cls.__name__}"
            owner[f.name] = cls.__name__


def test_no_module_parses_its_own_command_line():
    """The command line of a stage is its dataclasses (TrlParser in the runner): no argparse parser elsewhere."""
    allowed = {ROOT / "llama2_hf" / "runner.py", ROOT / "llama2_hf" / "cli.py"}
    offenders = []
    for path in sorted((ROOT / "llama2_hf").rglob("*.py")):
        if path in allowed:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("add_argument", "ArgumentParser", "add_subparsers"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"argparse outside the runner: {offenders}"

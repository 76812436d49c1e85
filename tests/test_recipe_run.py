"""The shipped recipes run: `llama2-hf sft|train-rm --recipe` on a tiny model, with the recipe's own settings."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from llama2_hf import Llama2ForCausalLM, Llama2ForRewardModel
from llama2_hf.cli import main
from llama2_hf.quickstart.world import World
from tests.conftest import REPO_ROOT


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _local_recipe(tmp_path, name, model_dir, datasets, **changes):
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / name).read_text())
    recipe.update(model_name_or_path=str(model_dir), datasets=datasets, output_dir=str(tmp_path / "out"),
                  max_steps=2, per_device_train_batch_size=2, global_batch_size=None, max_length=128,
                  logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", **changes)
    path = tmp_path / name.replace("/", "_")
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture
def tiny_dir(tmp_path, tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_sft_recipe_runs(tmp_path, tiny_dir):
    world = World()
    train = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": d} for d in world.sft_dialogs(16)])
    recipe = _local_recipe(tmp_path, "sft/llama2-7b-lora.yaml", tiny_dir, {"train": train})
    assert main(["sft", "--recipe", recipe, "--cpu", "--set", "learning_rate=1e-2"]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists()  # the LoRA recipe trains and saves an adapter
    from peft import AutoPeftModelForCausalLM

    tuned = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    base = Llama2ForCausalLM.from_pretrained(tiny_dir)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)


def test_reward_recipe_runs_with_safety_mix(tmp_path, tiny_dir):
    world = World()
    safety = _write_jsonl(tmp_path / "safety.jsonl", world.preferences("safety", 18))
    helpful = _write_jsonl(tmp_path / "help.jsonl",
                           [r for r in world.preferences("helpfulness", 40) if not r["is_safety_prompt"]])
    recipe = _local_recipe(tmp_path, "reward/llama2-7b-safety.yaml", tiny_dir,
                           {"train": safety, "mix_with": helpful})
    assert main(["train-rm", "--recipe", recipe, "--cpu"]) == 0
    rm = Llama2ForRewardModel.from_pretrained(tmp_path / "out")
    start = Llama2ForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(rm.model.embed_tokens.weight, start.model.embed_tokens.weight)


def test_recipe_stage_mismatch_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--recipe", str(REPO_ROOT / "recipes" / "sft" / "llama2-7b.yaml")])
    assert "is a 'sft' recipe" in capsys.readouterr().err

"""The shipped recipes run as they are: `llama2-hf <stage> --config recipes/...` with only the paths, the sizes and
the CPU switches overridden on the command line (flags override recipe keys)."""

from __future__ import annotations

import pytest
import torch

from llama2_hf import Llama2ForCausalLM, Llama2ForRewardModel
from llama2_hf.cli import main
from llama2_hf.quickstart.world import World
from llama2_hf.runner import RunRecord

from conftest import REPO_ROOT, write_jsonl

# A GPU recipe on this CPU at toy size: what a laptop user adds to the launch line.
CPU_TINY = ["--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--global_batch_size", "2", "--max_length", "128",
            "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1", "--report_to", "none"]


def test_sft_lora_recipe_runs(tmp_path, stage_inputs):
    train = write_jsonl(tmp_path / "sft.jsonl", [{"messages": d} for d in World().sft_dialogs(16)])
    out = tmp_path / "out"
    code = main(["sft", "--config", str(REPO_ROOT / "recipes/sft/llama2-7b-lora.yaml"),
                 "--model_name_or_path", str(stage_inputs["policy"]), "--train_file", str(train),
                 "--eval_file", str(train),
                 "--output_dir", str(out), "--learning_rate", "1.0e-2", *CPU_TINY])
    assert code == 0
    assert (out / "adapter_config.json").exists()  # the LoRA recipe trains and saves an adapter
    record = RunRecord.read(out)
    assert record.args["lora_r"] == 16 and record.args["lora_alpha"] == 32 and record.args["dtype"] == "float32"
    assert record.args["weight_decay"] == 0.1 and record.args["adam_beta2"] == 0.95  # the recipe's paper values
    from peft import AutoPeftModelForCausalLM

    tuned = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    base = Llama2ForCausalLM.from_pretrained(stage_inputs["policy"])
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)


def test_safety_reward_recipe_runs_with_its_mix(tmp_path, stage_inputs):
    world = World()
    safety = write_jsonl(tmp_path / "safety.jsonl", world.preferences("safety", 18))
    helpful = write_jsonl(tmp_path / "help.jsonl",
                          [r for r in world.preferences("helpfulness", 40) if not r["is_safety_prompt"]])
    out = tmp_path / "rm"
    code = main(["train-rm", "--config", str(REPO_ROOT / "recipes/reward/llama2-7b-safety.yaml"),
                 "--model_name_or_path", str(stage_inputs["policy"]), "--train_file", str(safety),
                 "--mix_file", str(helpful), "--eval_file", str(safety), "--output_dir", str(out), *CPU_TINY])
    assert code == 0
    record = RunRecord.read(out)
    assert record.args["data_mix"] == "safety" and record.args["safety_aux_loss_coef"] == 1.0
    assert record.outputs == {"model": "."}
    rm = Llama2ForRewardModel.from_pretrained(out)
    start = Llama2ForCausalLM.from_pretrained(stage_inputs["policy"])
    assert not torch.equal(rm.model.embed_tokens.weight, start.model.embed_tokens.weight)


def test_recipe_of_another_stage_is_refused(capsys):
    # an SFT recipe given to train-rm: its SFT-only keys are not train-rm arguments
    code = main(["train-rm", "--config", str(REPO_ROOT / "recipes/sft/llama2-7b.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "is not an argument of `llama2-hf train-rm`" in err and "Traceback" not in err


@pytest.mark.parametrize("bad, message", [("learning_rate: 2e-5\n", "read by YAML as a string"),
                                          ("- a\n- b\n", "a recipe is a YAML mapping")])
def test_malformed_recipe_is_one_line(tmp_path, capsys, bad, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(bad)
    assert main(["sft", "--config", str(recipe)]) == 2
    assert message in capsys.readouterr().err

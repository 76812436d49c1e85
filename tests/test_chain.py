"""The recipe chain end to end at toy size, every stage under `accelerate launch` on two CPU processes: sft ->
train-rm (helpfulness, safety) -> rejection-sample -> ppo -> gatt -> sft on the GAtt data -> eval -> push. Each
stage gets its shipped recipe (`--config`) and reads the previous stage's folder; only the inputs, the output folders
and the toy sizes are overridden on the command line."""

from __future__ import annotations

import json

import pytest

from llama2_hf.runner import RunRecord

from conftest import REPO_ROOT, accelerate_launch, preference_rows, write_jsonl
from fake_hub import FakeHub, subprocess_env

RECIPES = REPO_ROOT / "recipes"
# A GPU recipe on two CPU processes at toy size (Trainer-based stages).
TINY_TRAINER = ["--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false", "--max_steps", "1",
                "--per_device_train_batch_size", "2", "--global_batch_size", "4", "--max_length", "96",
                "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1", "--report_to", "none",
                "--disable_tqdm", "true"]
SAMPLING = ["--max_new_tokens", "6", "--prompt_batch_size", "4"]


def _launch(stage: str, recipe: str, *args, env: dict | None = None) -> None:
    proc = accelerate_launch([stage, "--config", RECIPES / recipe, *args], num_processes=2, timeout=300, env=env)
    assert proc.returncode == 0, f"{stage} ({recipe}) failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_recipe_chain_on_two_processes(stage_inputs, shared_data, tmp_path):
    out = tmp_path / "out"
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    safety_prefs = write_jsonl(tmp_path / "safety_prefs.jsonl", [
        {**r, "is_safety_prompt": True, "safety_label": "both_safe"} for r in preference_rows(16, seed=1)])
    dialogues = write_jsonl(tmp_path / "dialogues.jsonl", [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} equals {2 * i}."},
                      {"role": "user", "content": "And minus one?"}]} for i in range(4)])

    _launch("sft", "sft/llama2-7b.yaml", "--model_name_or_path", stage_inputs["policy"],
            "--train_file", stage_inputs["sft"], "--eval_file", stage_inputs["sft"], "--output_dir", out / "sft",
            *TINY_TRAINER)
    _launch("train-rm", "reward/llama2-7b.yaml", "--model_name_or_path", out / "sft", "--train_file", prefs,
            "--mix_file", safety_prefs, "--eval_file", prefs, "--output_dir", out / "helpfulness-rm", *TINY_TRAINER)
    _launch("train-rm", "reward/llama2-7b-safety.yaml", "--model_name_or_path", out / "sft",
            "--train_file", safety_prefs, "--mix_file", prefs, "--eval_file", safety_prefs,
            "--output_dir", out / "safety-rm", *TINY_TRAINER)
    rm_args = ["--helpfulness_reward_model", out / "helpfulness-rm", "--safety_reward_model", out / "safety-rm",
               "--reward_batch_size", "4"]
    _launch("rejection-sample", "rejection_sampling/llama2-7b.yaml", "--model_name_or_path", out / "sft",
            "--prompts_file", stage_inputs["prompts"], "--num_samples", "2", "--select_unfinished", "true",
            *SAMPLING, *rm_args,
            "--output_dir", out / "rs", *TINY_TRAINER)
    _launch("ppo", "ppo/llama2-7b.yaml", "--model_name_or_path", out / "rs", "--prompts_file", stage_inputs["prompts"],
            *rm_args, "--num_iterations", "1", "--batch_size", "4", "--mini_batch_size", "2", "--micro_batch_size",
            "1", "--max_new_tokens", "6", "--prompt_batch_size", "4", "--save_steps", "0", "--use_cpu", "true",
            "--bf16", "false", "--report_to", "none", "--output_dir", out / "ppo")
    _launch("gatt", "gatt/llama2-7b.yaml", "--model_name_or_path", out / "ppo", "--dialogues_file", dialogues,
            "--instructions", "Always answer as a pirate.", "--dtype", "float32", *SAMPLING,
            "--output_dir", out / "gatt")
    _launch("sft", "sft/llama2-7b-gatt.yaml", "--model_name_or_path", out / "ppo", "--train_file", out / "gatt",
            "--on_invalid", "drop", "--output_dir", out / "chat", *TINY_TRAINER)
    _launch("eval", "eval/llama2-7b.yaml", "--model_name_or_path", out / "chat", "--tasks", "truthfulqa_mc",
            "--limit", "2", "--batch_size", "2", "--chat", "false", "--data_dir", shared_data, "--dtype", "float32",
            "--progress", "false", "--output_dir", out / "eval")

    # every link read the previous stage's folder, and every stage ran on two processes
    links = {"helpfulness-rm": "sft", "safety-rm": "sft", "rs": "sft", "ppo": "rs", "gatt": "ppo", "chat": "ppo",
             "eval": "chat"}
    for stage, source in links.items():
        record = RunRecord.read(out / stage)
        assert record.args["model_name_or_path"] == str(out / source), stage
        assert record.world_size == 2, stage
    assert RunRecord.read(out / "rs").outputs["data"] == "selected.jsonl"
    assert RunRecord.read(out / "rs").outputs["model"] == "."
    assert RunRecord.read(out / "chat").args["train_file"] == [str(out / "gatt")]
    assert RunRecord.read(out / "chat").args["train_on"] == "last"
    gatt_rows = (out / "gatt" / "gatt.jsonl").read_text().splitlines()
    assert len(gatt_rows) == 4 and all(json.loads(r)["messages"][0]["role"] == "system" for r in gatt_rows)
    samples = (out / "eval" / "results.samples.jsonl").read_text().splitlines()
    assert len(samples) == 2  # --limit 2 examples, split over the two ranks and merged

    with FakeHub() as hub:
        env = subprocess_env(hub, tmp_path / "hf_home", base={}, token=hub.token)
        _launch("push", "push/llama2-7b.yaml", "--model_name_or_path", out / "chat", "--repo_id", "alice/tiny-chat",
                "--private", "false", "--output_dir", out / "push", env=env)
        files = hub.files("alice/tiny-chat")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "sft" in card and RunRecord.read(out / "push").stage == "push"

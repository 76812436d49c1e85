"""`llama2-hf sft`: the one runner from Python, from the command line and from a recipe; record, resume, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from llama2_hf.cli import main as cli
from llama2_hf.runner import RunRecord, UsageError
from llama2_hf.stages import run_stage

from conftest import TINY_TRAINING, write_jsonl


def test_sft_runner_writes_model_and_record(stage_inputs, tmp_path):
    out = tmp_path / "sft"
    record = run_stage("sft", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(stage_inputs["sft"])],
                       output_dir=str(out), **TINY_TRAINING)
    assert record.stage == "sft" and record.outputs == {"model": "."}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    saved = RunRecord.read(out)
    assert saved.args["learning_rate"] == 2e-5 and saved.args["max_steps"] == 2
    assert len(saved.inputs["train_0"]["sha256"]) == 64 and saved.metrics["data"]["train"]["kept"] == 24
    assert saved.versions["transformers"]
    # the same arguments again: the record comes back, nothing is retrained
    again = run_stage("sft", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(stage_inputs["sft"])],
                      output_dir=str(out), **TINY_TRAINING)
    assert again.seconds == saved.seconds
    # other arguments in the same folder are refused, naming the difference
    with pytest.raises(UsageError, match=r"learning_rate: 2e-05 -> 0.001"):
        run_stage("sft", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(stage_inputs["sft"])],
                  output_dir=str(out), **{**TINY_TRAINING, "learning_rate": 1e-3})


def test_sft_cli_and_recipe_reach_the_same_runner(stage_inputs, tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(stage_inputs["policy"]),
                                      "train_file": [str(stage_inputs["sft"])], "learning_rate": 1.0e-4,
                                      **{k: v for k, v in TINY_TRAINING.items() if k != "report_to"}}))
    out = tmp_path / "out"
    assert cli(["sft", "--config", str(recipe), "--output_dir", str(out), "--max_steps", "1"]) == 0
    record = RunRecord.read(out)
    assert record.args["learning_rate"] == 1e-4 and record.args["max_steps"] == 1  # flag overrides the recipe


def test_sft_bad_row_is_one_line_naming_file_and_line(stage_inputs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]},
                                               {"messages": [{"role": "user", "content": "hi"}]}])
    code = cli(["sft", "--model_name_or_path", str(stage_inputs["policy"]), "--train_file", str(bad),
                "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}, line 2, field 'messages'" in err and "Traceback" not in err


def test_sft_recipe_typo_names_the_closest_field(stage_inputs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1.0e-5\n")
    assert cli(["sft", "--config", str(recipe)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_sft_everything_dropped_is_an_error(stage_inputs, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(UsageError, match="no SFT rows left"):
        run_stage("sft", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(bad)],
                  output_dir=str(tmp_path / "o"), on_invalid="drop", **TINY_TRAINING)


def test_sft_ddp_two_processes(stage_inputs, tmp_path):
    from conftest import accelerate_launch

    out = tmp_path / "ddp"
    proc = accelerate_launch(["sft", "--model_name_or_path", stage_inputs["policy"], "--train_file",
                              stage_inputs["sft"], "--output_dir", out, "--use_cpu", "true", "--max_steps", "2",
                              "--per_device_train_batch_size", "2", "--global_batch_size", "8", "--max_length", "128",
                              "--report_to", "none", "--save_strategy", "no"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    assert record.world_size == 2 and record.args["gradient_accumulation_steps"] == 2  # 8 = 2 per device x 2 x 2
    assert (out / "model.safetensors").is_file()


def test_bad_line_in_second_file_names_that_file_and_its_line(stage_inputs, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "hi", "answer": "hello"}] * 3)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi", "answer": "hello"}\n{"prompt": "hi", "answer": \n')
    code = cli(["sft", "--model_name_or_path", str(stage_inputs["policy"]), "--train_file", str(good), str(broken),
                "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert code == 2 and f"{broken}, line 2: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_debug_shows_the_traceback(stage_inputs, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(Exception, match="line 1, field 'messages'"):
        cli(["sft", "--model_name_or_path", str(stage_inputs["policy"]), "--train_file", str(bad),
             "--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--debug"])

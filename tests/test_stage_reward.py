"""`llama2-hf train-rm` and `llama2-hf eval-rm` through the one runner: model at the folder root, every input checked
before training, nothing left to train on is an error, data mixes, DDP, the Table 8 evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from llama2_hf import Llama2ForCausalLM, Llama2ForRewardModel
from llama2_hf.cli import main as cli
from llama2_hf.data import InvalidDataFile
from llama2_hf.rm_eval import evaluate_reward_model
from llama2_hf.runner import RunRecord, UsageError
from llama2_hf.stages import run_stage
from llama2_hf.stages.common import load_tokenizer

from conftest import TINY_TRAINING, preference_rows, write_jsonl


def train_rm(stage_inputs, out, **kw):
    return run_stage("train-rm", model_name_or_path=str(stage_inputs["policy"]),
                     train_file=[str(stage_inputs["prefs"])], output_dir=str(out), **{**TINY_TRAINING, **kw})


@pytest.fixture(scope="module")
def trained_rm(stage_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    return out, train_rm(stage_inputs, out, eval_file=[str(stage_inputs["prefs"])])


def test_train_rm_from_causal_lm_saves_rm_at_root(trained_rm, stage_inputs):
    out, record = trained_rm
    assert record.stage == "train-rm" and record.outputs == {"model": "."}
    rm = Llama2ForRewardModel.from_pretrained(out)
    assert rm.config.num_labels == 1 and rm.config.architectures == ["Llama2ForRewardModel"]
    saved = RunRecord.read(out)
    assert saved.metrics["data"]["train"] == {"total": 24, "kept": 24, "truncated": 0, "dropped": {}}
    assert saved.metrics["eval"]["eval_count_better"] == 6  # preference_rows cycles the four ratings
    assert len(saved.metrics["log_history"]) == 2 and set(saved.inputs) == {"train_0", "eval_0", "model"}
    # the decoder started from the causal LM: 2 steps at lr <= 1e-5 move no weight by more than 1e-4
    lm = Llama2ForCausalLM.from_pretrained(stage_inputs["policy"])
    delta = (rm.model.embed_tokens.weight - lm.model.embed_tokens.weight).abs().max().item()
    assert 0 < delta < 1e-4


def test_train_rm_rerun_and_changed_args(trained_rm, stage_inputs):
    out, record = trained_rm
    again = train_rm(stage_inputs, out, eval_file=[str(stage_inputs["prefs"])])
    assert again.seconds == record.seconds
    with pytest.raises(UsageError, match=r"margin: 'small' -> 'large'"):
        train_rm(stage_inputs, out, eval_file=[str(stage_inputs["prefs"])], margin="large")


def test_bad_eval_row_fails_before_training(stage_inputs, tmp_path):
    """issue 14 item 1: the eval file is checked before the model is loaded (the old CLI trained first)."""
    rows = preference_rows(4)
    rows[2]["chosen"] = rows[2]["rejected"]
    bad = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "o"
    with pytest.raises(InvalidDataFile, match=rf"{bad}, line 3, field 'rejected'"):
        train_rm(stage_inputs, out, eval_file=[str(bad)], save_strategy="steps", save_steps=1)
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_bad_mix_row_fails_before_training(stage_inputs, tmp_path):
    rows = preference_rows(4)
    rows[3]["rating"] = "much_better"
    bad = write_jsonl(tmp_path / "mix.jsonl", rows)
    with pytest.raises(InvalidDataFile, match=rf"{bad}, line 4, field 'rating'"):
        train_rm(stage_inputs, tmp_path / "o", mix_file=[str(bad)], data_mix="helpfulness")


def test_everything_dropped_is_an_error(stage_inputs, tmp_path):
    """issue 14 item 2: the old command trained 0 steps and exited 0."""
    rows = [{**r, "rejected": r["chosen"]} for r in preference_rows(3)]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=r"no train preference pairs left .*identical_responses"):
        run_stage("train-rm", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(bad)],
                  output_dir=str(tmp_path / "o"), on_invalid="drop", **TINY_TRAINING)


def test_rating_typo_and_unrated_file_on_the_command_line(stage_inputs, tmp_path, capsys):
    """issue 14 item 3: a misspelt column and an unrated file are one-line errors (exit 2)."""
    typo = write_jsonl(tmp_path / "typo.jsonl", [{("ratng" if k == "rating" else k): v
                                                 for k, v in r.items()} for r in preference_rows(2)])
    base = ["train-rm", "--model_name_or_path", str(stage_inputs["policy"]), "--use_cpu", "true"]
    assert cli([*base, "--train_file", str(typo), "--output_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown column(s) 'ratng' (did you mean 'rating'?)" in err and "Traceback" not in err
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                              "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])
    assert cli([*base, "--train_file", str(hh), "--output_dir", str(tmp_path / "b")]) == 2
    assert "allow_unrated" in capsys.readouterr().err


def test_helpfulness_mix_and_unrated_open_source_data(stage_inputs, tmp_path):
    """All of train_file plus as many pairs from mix_file; unrated HH-RLHF pairs only with allow_unrated."""
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": f"\n\nHuman: what is {i}?\n\nAssistant: {i}",
                                              "rejected": f"\n\nHuman: what is {i}?\n\nAssistant: no idea"}
                                             for i in range(40)])
    record = train_rm(stage_inputs, tmp_path / "o", mix_file=[str(hh)], data_mix="helpfulness",
                      allow_unrated=True, max_steps=1)
    assert record.metrics["data"]["train"]["total"] == 48  # 24 rated + 24 sampled from the 40 unrated
    assert record.metrics["loaded"]["mix"] == {"total": 40, "kept": 40, "dropped": {}}


def test_mix_arguments_are_checked(stage_inputs, tmp_path):
    with pytest.raises(UsageError, match="needs mix_file"):
        train_rm(stage_inputs, tmp_path / "a", data_mix="safety")
    with pytest.raises(UsageError, match="data_mix is 'none'"):
        train_rm(stage_inputs, tmp_path / "b", mix_file=[str(stage_inputs["prefs"])])


def test_eval_rm_stage_matches_direct_evaluation(trained_rm, stage_inputs, tmp_path):
    out, _ = trained_rm
    record = run_stage("eval-rm", model_name_or_path=str(out), eval_file=[str(stage_inputs["prefs"])],
                       output_dir=str(tmp_path / "e"), eval_batch_size=5, use_cpu=True)
    results = json.loads((tmp_path / "e" / record.outputs["results"]).read_text())
    from datasets import Dataset

    rows = [json.loads(line) for line in open(stage_inputs["prefs"])]
    direct = evaluate_reward_model(Llama2ForRewardModel.from_pretrained(out), load_tokenizer(out),
                                   Dataset.from_list(rows), batch_size=24)
    assert results["metrics"]["accuracy"] == pytest.approx(direct["accuracy"])
    assert results["table8"]["Avg"] == pytest.approx(100 * direct["accuracy"])
    assert results["table8"]["Better"] == pytest.approx(100 * direct["accuracy_better"])
    assert results["data"] == {"total": 24, "kept": 24, "dropped": {}}
    assert RunRecord.read(tmp_path / "e").metrics["accuracy"] == pytest.approx(direct["accuracy"])


def test_eval_rm_unrated_rows_are_refused(trained_rm, tmp_path):
    out, _ = trained_rm
    rows = preference_rows(2)
    del rows[1]["rating"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidDataFile, match=rf"{data}, line 2, field 'rating': missing"):
        run_stage("eval-rm", model_name_or_path=str(out), eval_file=[str(data)], output_dir=str(tmp_path / "e"))


def test_train_rm_ddp_two_processes(stage_inputs, tmp_path):
    from conftest import accelerate_launch

    out = tmp_path / "ddp"
    proc = accelerate_launch(["train-rm", "--model_name_or_path", stage_inputs["policy"], "--train_file",
                              stage_inputs["prefs"], "--eval_file", stage_inputs["prefs"], "--output_dir", out,
                              "--use_cpu", "true", "--max_steps", "2", "--per_device_train_batch_size", "2",
                              "--global_batch_size", "8", "--max_length", "128", "--report_to", "none",
                              "--save_strategy", "no", "--logging_steps", "1"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = RunRecord.read(out)
    assert record.world_size == 2 and record.args["gradient_accumulation_steps"] == 2  # 8 = 2 per device x 2 x 2
    assert record.metrics["eval"]["eval_count_better"] == 6  # every eval pair scored once across the ranks
    assert torch.isfinite(torch.tensor(record.metrics["log_history"][-1]["loss"]))
    assert (out / "model.safetensors").is_file()

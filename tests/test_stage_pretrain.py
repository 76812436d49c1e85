"""`llama2-hf pretrain`: a new model from a preset or a continued one, packed text, inputs checked before work."""

from __future__ import annotations

import pytest
import torch

from llama2_hf import Llama2ForCausalLM
from llama2_hf.cli import main as cli
from llama2_hf.data import InvalidDataFile
from llama2_hf.runner import RunRecord, UsageError
from llama2_hf.stages import run_stage
from llama2_hf.stages.pretrain import Llama2PretrainConfig, pack_texts

from conftest import TINY_TRAINING, write_jsonl

TEXTS = [f"the cat {i} is helpful and the dog {i} is safe" for i in range(30)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("text") / "text.jsonl", [{"text": t, "source": "web"} for t in TEXTS])


def test_pack_texts_keeps_every_token(tok):
    rows = pack_texts(TEXTS[:3], tok, 16)
    stream = [i for t in TEXTS[:3] for i in [tok.bos_token_id, *tok.encode(t, add_special_tokens=False),
                                                  tok.eos_token_id]]
    kept = [i for r in rows for i, m in zip(r["input_ids"], r["attention_mask"]) if m]
    assert kept == stream and all(len(r["input_ids"]) == 16 for r in rows)
    assert rows[-1]["labels"][-1] == -100 or len(stream) % 16 == 0  # the ragged tail is padded, not dropped


def test_paper_defaults(tmp_path):
    cfg = Llama2PretrainConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm) == (3e-4, 2000, 0.1, 1.0)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.max_length) == (0.9, 0.95, 1e-5, 4096)
    assert cfg.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    # 4M tokens per step (Table 1): 1024 rows of 4096 = 8 per device x 128 accumulation steps on one process
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.max_length == 4 * 1024 * 1024


def test_new_model_from_preset_then_continued(corpus, stage_inputs, tmp_path):
    out = tmp_path / "base"
    record = run_stage("pretrain", model_preset="tiny", num_hidden_layers=1, hidden_size=32,
                       tokenizer_name_or_path=str(stage_inputs["policy"]), train_file=[str(corpus)],
                       output_dir=str(out), **{**TINY_TRAINING, "learning_rate": 1e-3, "warmup_steps": 0})
    assert record.outputs == {"model": "."}
    model = Llama2ForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (1, 32)
    packing = RunRecord.read(out).metrics["packing"]
    assert packing["documents"] == 30 and packing["rows"] * 128 >= packing["tokens"] > (packing["rows"] - 1) * 128
    losses = [h["loss"] for h in record.metrics["log_history"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # continued from that folder (its tokenizer is saved with it)
    more = run_stage("pretrain", model_name_or_path=str(out), train_file=[str(corpus)],
                     output_dir=str(tmp_path / "more"), **{**TINY_TRAINING, "max_steps": 1, "warmup_steps": 0})
    assert more.inputs["model"]["path"] == str(out) and len(more.inputs["model"]["sha256"]) == 64
    assert not torch.equal(Llama2ForCausalLM.from_pretrained(tmp_path / "more").lm_head.weight, model.lm_head.weight)
    with pytest.raises(UsageError, match="apply to a new model"):
        run_stage("pretrain", model_name_or_path=str(out), hidden_size=64, train_file=[str(corpus)],
                  output_dir=str(tmp_path / "bad"), **TINY_TRAINING)


def test_model_choice_is_exclusive(corpus, stage_inputs, tmp_path):
    with pytest.raises(UsageError, match="exactly one of model_preset"):
        run_stage("pretrain", train_file=[str(corpus)], output_dir=str(tmp_path / "a"), **TINY_TRAINING)
    with pytest.raises(UsageError, match="exactly one of model_preset"):
        run_stage("pretrain", model_preset="tiny", model_name_or_path=str(stage_inputs["policy"]),
                  train_file=[str(corpus)], output_dir=str(tmp_path / "b"), **TINY_TRAINING)


def test_bad_and_empty_text_rows(stage_inputs, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "  "}])
    args = ["pretrain", "--model_preset", "tiny", "--tokenizer_name_or_path", str(stage_inputs["policy"]),
            "--train_file", str(bad), "--use_cpu", "true"]
    assert cli([*args, "--output_dir", str(tmp_path / "a")]) == 2
    assert f"{bad}, line 2, field 'text'" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"body": "x"}])
    with pytest.raises(UsageError, match="no text rows left"):
        run_stage("pretrain", model_preset="tiny", tokenizer_name_or_path=str(stage_inputs["policy"]),
                  train_file=[str(empty)], output_dir=str(tmp_path / "b"), on_invalid="drop", **TINY_TRAINING)
    with pytest.raises(InvalidDataFile, match="no such file"):
        run_stage("pretrain", model_preset="tiny", tokenizer_name_or_path=str(stage_inputs["policy"]),
                  train_file=[str(tmp_path / "missing.jsonl")], output_dir=str(tmp_path / "c"), **TINY_TRAINING)


@pytest.mark.parametrize("stage", ["pretrain", "train-rm", "eval-rm"])
def test_help_lists_the_fields(stage, capsys):
    """argparse formats help strings with %: a bare percent sign in a field's help breaks --help."""
    with pytest.raises(SystemExit) as exit_:
        cli([stage, "--help"])
    assert exit_.value.code == 0 and "--output_dir" in capsys.readouterr().out

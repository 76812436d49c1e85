"""Precision policy of the Trainer-based stages (paper §2.2: bf16 compute, fp32 master weights).

One optimizer step at the PPO learning rate 1e-6: with `bf16: true` (autocast over the fp32 model) the weights move
as in the fp32 run, while the same step on weights held in bf16 loses most updates (a bf16 weight near 0.02 has a
spacing of about 1.2e-4, so an update of 1e-6 rounds away). The stages refuse bf16 trainable weights for that reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from llama2_hf import Llama2ForCausalLM
from llama2_hf.runner import UsageError
from llama2_hf.stages import run_stage
from llama2_hf.trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

from conftest import TINY_TRAINING

LR = 1e-6
ONE_STEP = {**TINY_TRAINING, "max_steps": 1, "learning_rate": LR}


def weights(folder) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in Llama2ForCausalLM.from_pretrained(folder).state_dict().items()}


@pytest.fixture(scope="module")
def one_step(stage_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
        run_stage("sft", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(stage_inputs["sft"])],
                  output_dir=str(root / name), bf16=bf16, **ONE_STEP)
        runs[name] = weights(root / name)
    return weights(stage_inputs["policy"]), runs


def test_bf16_autocast_step_matches_fp32_step(one_step):
    initial, runs = one_step
    fp32 = torch.cat([(runs["fp32"][k] - initial[k]).flatten() for k in initial])
    autocast = torch.cat([(runs["bf16_autocast"][k] - initial[k]).flatten() for k in initial])
    moved = fp32 != 0
    assert moved.float().mean() > 0.9  # AdamW's first step moves every weight with a gradient (or a decay)
    # The first AdamW step is lr * g / (|g| + eps) per weight: about +-lr whatever |g| is, so bf16 rounding of the
    # gradient changes an update only where g is near eps (1e-5) or changes sign. Measured: relative L2 difference
    # 0.018 and 99.9% of the weights moving in the same direction; 0.1 / 0.98 leave room for BLAS and thread order.
    rel = (autocast - fp32).norm() / fp32.norm()
    assert 0 < rel < 0.1, rel  # > 0: autocast really ran in bf16
    assert (torch.sign(autocast[moved]) == torch.sign(fp32[moved])).float().mean() > 0.98
    assert fp32.abs().max() < 2 * LR  # the step really is lr-sized (no warmup, first cosine step = peak)


def test_bf16_weights_lose_most_updates(stage_inputs, tmp_path, tiny_tokenizer, one_step):
    """The contrast: the same step with the weights themselves in bf16 (what the stages refuse)."""
    initial, _ = one_step
    model = Llama2ForCausalLM.from_pretrained(stage_inputs["policy"], dtype=torch.bfloat16)
    rows = [json.loads(line) for line in open(stage_inputs["sft"])]
    config = Llama2SFTConfig(output_dir=str(tmp_path / "bf16_weights"), bf16=False, gradient_checkpointing=False,
                             **{k: v for k, v in ONE_STEP.items()})
    Llama2SFTTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer).train()
    start = {k: v.to(torch.bfloat16).float() for k, v in initial.items()}  # the bf16 weights before the step
    after = {k: v.float() for k, v in model.state_dict().items()}
    changed = torch.cat([(after[k] != start[k]).flatten() for k in start]).float().mean().item()
    assert changed < 0.1, changed  # measured 1.2% (weights near 0): the fp32 run moves 100% of them


def test_stages_refuse_bf16_trainable_weights(stage_inputs, tmp_path):
    with pytest.raises(UsageError, match="float32 master weights"):
        run_stage("sft", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(stage_inputs["sft"])],
                  output_dir=str(tmp_path / "o"), dtype="bfloat16", **ONE_STEP)
    with pytest.raises(UsageError, match="float32 master weights"):
        run_stage("train-rm", model_name_or_path=str(stage_inputs["policy"]), train_file=[str(stage_inputs["prefs"])],
                  output_dir=str(tmp_path / "r"), dtype="bfloat16", **ONE_STEP)

"""Run by tests/test_distributed_train.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Trains a few SFT steps (packed rows) and a few reward-model steps from the same tiny causal LM, then writes, per rank,
a digest of every parameter after each stage (and whether training changed them) to OUT/rank<r>.json.
"""

import hashlib
import json
import os
import sys

import torch
from datasets import load_dataset

from llama2_hf import Llama2ForCausalLM, Llama2Tokenizer
from llama2_hf.trainers import Llama2RewardConfig, Llama2RewardTrainer, Llama2SFTConfig, Llama2SFTTrainer


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(model_dir: str, sft_file: str, pref_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes share the cores
    common = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no",
                  disable_tqdm=True, global_batch_size=None, per_device_train_batch_size=2, max_steps=3,
                  learning_rate=1e-3, logging_steps=1, max_length=128, seed=0)
    tokenizer = Llama2Tokenizer.from_pretrained(model_dir)
    model = Llama2ForCausalLM.from_pretrained(model_dir)
    initial = digest(model)
    sft = Llama2SFTTrainer(model, args=Llama2SFTConfig(output_dir=os.path.join(out_dir, "sft"), **common),
                           train_dataset=load_dataset("json", data_files=sft_file, split="train"),
                           processing_class=tokenizer)
    sft.train()
    after_sft = digest(sft.model)
    rm = Llama2RewardTrainer(sft.model, args=Llama2RewardConfig(output_dir=os.path.join(out_dir, "rm"), **common),
                             train_dataset=load_dataset("json", data_files=pref_file, split="train"),
                             processing_class=tokenizer)
    rm_initial = digest(rm.model)
    rm.train()
    rank = rm.accelerator.process_index
    result = {"world_size": rm.accelerator.num_processes, "sft_changed": after_sft != initial, "sft": after_sft,
              "rm_changed": digest(rm.model) != rm_initial, "rm": digest(rm.model),
              "sft_steps": sft.state.global_step, "rm_steps": rm.state.global_step}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])

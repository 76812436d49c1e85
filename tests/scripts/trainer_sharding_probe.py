"""What a Trainer-based stage gets from `accelerate launch --config_file <fsdp or ddp yaml>` on CPU processes.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 tests/scripts/trainer_sharding_probe.py OUT

Each rank builds the Trainer of the `sft` stage's config on a tiny Llama2ForCausalLM, lets its accelerator prepare
the model (what `trainer.train()` does first) and writes `OUT/rank<R>.json`: the distributed type accelerate chose,
whether the Trainer runs FSDP, the wrapper class, and the parameter bytes this rank holds next to the whole model's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def local_bytes(module: torch.nn.Module) -> int:
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # DTensor shards hold only their local part
        total += local.numel() * local.element_size()
    return total


def main(out: Path) -> None:
    from llama2_hf import Llama2Config, Llama2ForCausalLM
    from llama2_hf.trainers.sft import Llama2SFTConfig
    from transformers import Trainer

    torch.manual_seed(0)
    model = Llama2ForCausalLM(Llama2Config.from_preset("tiny", vocab_size=512))
    full = local_bytes(model)
    args = Llama2SFTConfig(output_dir=str(out / "trainer"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                           global_batch_size=None, report_to=[], max_length=64)
    trainer = Trainer(model=model, args=args)
    state = trainer.accelerator.state
    prepared = trainer.accelerator.prepare(trainer.model)
    rank = int(os.environ.get("RANK", 0))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "distributed_type": str(state.distributed_type), "num_processes": state.num_processes,
        "accelerate_use_fsdp_env": os.environ.get("ACCELERATE_USE_FSDP"),
        "trainer_fsdp": bool(trainer.is_fsdp_enabled), "wrapper": type(prepared).__name__,
        "local_bytes": local_bytes(prepared), "full_bytes": full}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Sharded (FSDP2) training and generation of a tiny Llama2ForCausalLM on CPU, for tests/test_fsdp.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/fsdp_train.py --out result.json
    # or, without a launcher or ports: one process per rank sharing a rendezvous file
    python tests/scripts/fsdp_train.py --out result.json --rank R --world-size 2 --init-file /tmp/rdzv

(tests/test_fsdp.py forks the ranks from the test process and calls `run`, which skips re-importing torch.)

Each `Llama2DecoderLayer` and then the root model are wrapped with torch's `fully_shard` over gloo (accelerate's FSDP
falls back to DDP on CPU, so this is how the sharded code paths are exercised without GPUs). The script trains a few
AdamW steps (paper §2.2 optimizer settings, gradient clipping 1.0) on each rank's slice of a global batch, then gathers
the full weights once (`llama2_hf.generation.full_weights_for_generation`, the paper's fix for slow generation under
FSDP, §3.2.3, as PPO uses it), generates greedily with the KV cache, frees them again and trains one more step.
Rank 0 writes the global losses, gradient norms, generated tokens, shard sizes, the bytes each rank held in weights,
gradients and optimizer state after its last step, and the full final weights
(safetensors) for the test to compare with an unsharded run of the same functions (`build_model`, `make_batches`,
`make_optimizer`, `train_step`) in one process.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from llama2_hf import Llama2Config, Llama2ForCausalLM
from llama2_hf.generation import SamplingConfig, full_weights_for_generation, generate
from llama2_hf.modeling_llama2 import Llama2DecoderLayer

VOCAB, SEQ_LEN, GLOBAL_BATCH = 128, 16, 4
STEPS_BEFORE_GENERATION, STEPS_AFTER_GENERATION = 3, 1
MAX_GRAD_NORM = 1.0  # paper §2.2
PROMPTS = [[1, 5, 9, 17, 33], [1, 40, 41]]
MAX_NEW_TOKENS = 8


def build_model(seed: int = 0) -> Llama2ForCausalLM:
    """The tiny GQA preset with a 128-token vocabulary, identical on every rank for a given seed."""
    torch.manual_seed(seed)
    return Llama2ForCausalLM(Llama2Config.from_preset("tiny", vocab_size=VOCAB))


def make_batches(n_steps: int, seed: int = 1) -> list[torch.Tensor]:
    """`n_steps` global batches of token ids, each (GLOBAL_BATCH, SEQ_LEN): learnable rows (each token is the previous
    plus a per-row stride, mod the vocabulary) with no padding, so every rank's slice holds the same number of loss
    tokens and the mean of the per-rank mean losses is the global mean."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_steps):
        start = torch.randint(3, VOCAB, (GLOBAL_BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
        batches.append(3 + (start + stride * torch.arange(SEQ_LEN)) % (VOCAB - 3))  # (B, T)
    return batches


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # AdamW beta2 0.95, eps 1e-5, weight decay 0.1: paper §2.2. A large LR makes 4 steps move the weights visibly.
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               input_ids: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on `input_ids` (B, T); returns (this process's loss, global gradient norm before clipping).

    Under FSDP the gradients are DTensors: `clip_grad_norm_` then computes the norm over all shards."""
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), norm.item()


def shard_model(model: Llama2ForCausalLM) -> Llama2ForCausalLM:
    """FSDP2 auto-wrap as the recipes' FSDP config does: each decoder layer is a unit, the root holds the rest."""
    for layer in model.model.layers:
        if not isinstance(layer, Llama2DecoderLayer):
            raise TypeError(f"expected Llama2DecoderLayer, got {type(layer).__name__}")
        fully_shard(layer)
    fully_shard(model)
    return model


def greedy(model: torch.nn.Module) -> dict[str, list]:
    """Greedy continuations of PROMPTS with the KV cache, through transformers' `generate` and through the
    pipeline's batched `llama2_hf.generation.generate` (what rejection sampling and PPO use; prompts of different
    lengths, so it pads and masks)."""
    model.eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                            use_cache=True, pad_token_id=0)
        ours = generate(model, PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0),
                        eos_token_id=2, pad_token_id=0)
    return {"transformers": hf[0, len(PROMPTS[0]):].tolist(), "llama2_hf": [r[0] for r in ours.response_ids]}


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in weights, gradients and optimizer state (the local shards of DTensors), measured right
    after an optimizer step, when all three are alive: what `llama2-hf plan` predicts per rank."""
    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    return {"weights": sum(local(p) for p in model.parameters()),
            "gradients": sum(local(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": sum(local(t) for s in optimizer.state.values() for t in s.values()
                             if isinstance(t, torch.Tensor))}


def run(out: str, rank: int | None = None, world_size: int | None = None, init_file: str | None = None) -> None:
    """One rank's work. With `rank=None` the process group comes from torchrun's environment (env://); otherwise the
    ranks meet through `init_file` (a FileStore: no ports, so parallel test runs cannot collide)."""
    torch.set_num_threads(1)
    timeout = timedelta(seconds=60)  # a rank that dies makes the others fail within a minute instead of hanging
    if rank is None:
        dist.init_process_group("gloo", timeout=timeout)
    else:
        store = dist.FileStore(init_file, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        _train_and_generate(out)
    finally:
        dist.destroy_process_group()


def _train_and_generate(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise ValueError(f"GLOBAL_BATCH={GLOBAL_BATCH} must be divisible by the world size {world}")
    per_rank = GLOBAL_BATCH // world

    model = build_model()
    full_numel = sum(p.numel() for p in model.parameters())
    shard_model(model)
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    all_dtensor = all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = make_optimizer(model)
    state_bytes = {}
    optimizer.register_step_post_hook(lambda opt, args, kwargs: state_bytes.update(held_bytes(model, opt)))
    batches = make_batches(STEPS_BEFORE_GENERATION + STEPS_AFTER_GENERATION)

    def step(batch: torch.Tensor) -> tuple[float, float]:
        local_loss, norm = train_step(model, optimizer, batch[rank * per_rank:(rank + 1) * per_rank])
        loss = torch.tensor(local_loss)
        dist.all_reduce(loss)  # sum of equal-weight per-rank means
        return loss.item() / world, norm

    history = [step(b) for b in batches[:STEPS_BEFORE_GENERATION]]
    with full_weights_for_generation(model):
        gathered_is_plain = not any(isinstance(p, DTensor) for p in model.parameters())
        generated = greedy(model)
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    history += [step(b) for b in batches[STEPS_BEFORE_GENERATION:]]

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    per_rank_info = [None] * world
    dist.all_gather_object(per_rank_info, {"local_numel": local_numel, "generated": generated, "bytes": state_bytes,
                                           "all_dtensor": all_dtensor, "gathered_is_plain": gathered_is_plain,
                                           "resharded": resharded})
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, out + ".safetensors")
        result = {"world_size": world, "full_numel": full_numel, "losses": [h[0] for h in history],
                  "grad_norms": [h[1] for h in history], "ranks": per_rank_info,
                  "layers_are_fsdp_units": all(isinstance(layer, FSDPModule) for layer in model.model.layers)}
        with open(out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)  # the file appears complete or not at all
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results (rank 0); weights go to <out>.safetensors")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: from torchrun)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes (with --rank)")
    p.add_argument("--init-file", default=None, help="rendezvous file shared by the ranks (with --rank); it must "
                   "not exist beforehand")
    args = p.parse_args(argv)
    run(args.out, args.rank, args.world_size, args.init_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory and time of one training step: Llama2ForCausalLM (chunked LM loss) vs transformers' LlamaForCausalLM.

    python benchmarks/bench_memory.py                         # seq 4096, vocab 32,000, hidden 256, 2 layers, 3 rounds
    python benchmarks/bench_memory.py --rounds 1 --steps 1 --hidden 128 --tensor-peak

Both models get the same config and the same weights (ours is built from a seed, transformers' loads its state dict)
and one step is forward + backward of the LM loss on a (1, seq) batch with labels = inputs, gradients included.
Every measurement runs in a fresh process (forked from a server that has imported torch and transformers once), in
alternating order over rounds, and prints one JSON line; the summary line gives medians and the paired ratios.

Peak memory on CPU: the resident-set high-water mark of the process during the first step, above the resident set
just before it. Linux resets the mark on `echo 5 > /proc/self/clear_refs` and reports it as VmHWM; where that is not
allowed, the lifetime `ru_maxrss` is used (then setup peaks can hide part of the step's). Why this and not another:
tracemalloc does not see torch's C++ allocations; the profiler's allocation records see tensors only and miss peaks
inside one op (they are given as `tensor_peak_mb` with `--tensor-peak`); RSS sees every byte the step touches, and a
fresh process per measurement keeps the allocator's retained memory of one model from serving the other. CUDA: the
caching allocator's peak above what was allocated before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import resource
import statistics
import time

logger = logging.getLogger("bench_memory")


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _tensor_peak_bytes(fn) -> int:
    """Peak of live tensor bytes during fn, replayed in time order from the profiler's allocation records."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def build_model(impl: str, args):
    import torch
    import transformers

    from llama2_hf import Llama2Config, Llama2ForCausalLM

    cfg = Llama2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       max_position_embeddings=args.seq, pad_token_id=0)
    torch.manual_seed(args.seed)
    ours = Llama2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    if impl == "ours":
        return ours.train()
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "auto_map", "fused_lm_loss")}
    ref = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**fields), attn_implementation="sdpa")
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return ref.train()


def measure(impl: str, args) -> dict:
    """One fresh process: build the model, peak memory of the first step, then the time of `args.steps` steps."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(impl, args).to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=g).to(device)

    def step():
        model.zero_grad(set_to_none=True)  # gradients are part of a step's peak
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    gc.collect()
    record = {"impl": impl}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        record["loss"] = step()
        record["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        record["peak_method"] = "cuda_allocator"
    else:
        before = _rss_bytes()
        if _reset_high_water():
            record["loss"] = step()
            record["peak_mb"] = (_high_water_bytes() - before) / 2**20
            record["peak_method"] = "rss_vmhwm"
        else:
            record["loss"] = step()
            record["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20
            record["peak_method"] = "rss_ru_maxrss"
    walls, cpus = [], []
    for _ in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    record["step_s"] = statistics.median(walls)
    record["step_cpu_s"] = statistics.median(cpus)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after the memory step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-peak", action="store_true",
                        help="also report the profiler's tensor-level peak (one more, slower, step)")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("forkserver")
    # The server imports these once; each measurement is a fresh fork of it that has run no torch op yet.
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.models.llama.modeling_llama",
                                "llama2_hf.modeling_llama2"])
    common = dict(seq=args.seq, vocab=args.vocab, hidden=args.hidden, layers=args.layers, threads=args.threads,
                  device=args.device)
    results: dict[str, list[dict]] = {"ours": [], "transformers": []}
    for r in range(args.rounds):
        order = ["ours", "transformers"] if r % 2 == 0 else ["transformers", "ours"]
        for impl in order:
            with ctx.Pool(1) as pool:
                record = pool.apply(measure, (impl, args))
            if args.tensor_peak and args.device == "cpu":
                with ctx.Pool(1) as pool:
                    record["tensor_peak_mb"] = pool.apply(tensor_peak_mb, (impl, args))
            results[impl].append(record)
            _emit(**common, round=r, order=order.index(impl), **{k: (round(v, 4) if isinstance(v, float) else v)
                                                                 for k, v in record.items()})
        ours, theirs = results["ours"][-1], results["transformers"][-1]
        if abs(ours["loss"] - theirs["loss"]) > 1e-4 * abs(theirs["loss"]):
            raise RuntimeError(f"round {r}: losses differ, ours {ours['loss']} vs transformers {theirs['loss']}")

    def med(impl, key):
        return statistics.median(x[key] for x in results[impl])

    mem_ratio = med("ours", "peak_mb") / med("transformers", "peak_mb")
    # Per round theirs/ours step time (>1: ours faster), then the median: robust to the load of a shared machine.
    speed = statistics.median(t["step_s"] / o["step_s"] for o, t in zip(results["ours"], results["transformers"]))
    speed_cpu = statistics.median(t["step_cpu_s"] / o["step_cpu_s"]
                                  for o, t in zip(results["ours"], results["transformers"]))
    summary = dict(**common, summary=True, rounds=args.rounds,
                   ours_peak_mb=round(med("ours", "peak_mb"), 1),
                   transformers_peak_mb=round(med("transformers", "peak_mb"), 1),
                   peak_ratio=round(mem_ratio, 3),
                   ours_step_s=round(med("ours", "step_s"), 3),
                   transformers_step_s=round(med("transformers", "step_s"), 3),
                   speed_ratio_paired=round(speed, 3), speed_ratio_paired_cpu=round(speed_cpu, 3),
                   goal_met=bool(mem_ratio <= 0.6 and speed >= 0.95))
    if args.tensor_peak and args.device == "cpu":
        summary["ours_tensor_peak_mb"] = round(med("ours", "tensor_peak_mb"), 1)
        summary["transformers_tensor_peak_mb"] = round(med("transformers", "tensor_peak_mb"), 1)
    _emit(**summary)


def tensor_peak_mb(impl: str, args) -> float:
    """The profiler's tensor-level peak of one step, in its own fresh process (the profiler slows what it watches)."""
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(impl, args)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    return _tensor_peak_bytes(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss.backward()) / 2**20


if __name__ == "__main__":
    main()

"""Speed of `Llama2ForCausalLM` against `transformers.LlamaForCausalLM` with identical weights.

Measured in one run, interleaved (rounds alternate which model goes first; medians reported, because the machine is
shared and noisy):

- training step: forward + backward of the causal-LM loss (no optimizer step), tokens/s at `--seq-len` (512);
- generation: greedy decoding with the KV cache (`generate(do_sample=False)`), new tokens/s at batch 1 and 8
  (prefill included in the time);
- process CPU time next to wall-clock time: on a shared machine other processes stretch the wall clock, while the
  CPU seconds this process used are disturbed less (with one thread they are close to the work done);
- peak tensor memory of each task and model, in one extra untimed pass (CPU: replayed from the profiler's
  allocation records; CUDA: the allocator's peak), above the memory allocated before (weights excluded, gradients
  included);
- achieved GFLOP/s and its fraction of a fp32 2048x2048 `torch.matmul` measured in the same run.

FLOP counts (multiply-add = 2): training = 6 * N_matmul + 6 * L * D * T per token (the causal half of QK^T and AV,
forward + backward), N_matmul = parameters of the Linear layers (the embedding lookup is no matmul). Generation =
2 * N_matmul + 4 * L * D * context per token, prefill included.

    python benchmarks/bench_model.py                    # sdpa, ~25M parameters, seq 512, 5 rounds
    python benchmarks/bench_model.py --attn eager --rounds 3
    python benchmarks/bench_model.py --threads 1        # on a shared machine: see benchmarks/README.md

One JSON line per measurement, then one summary line per task with medians and ours/transformers ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama2_hf.configuration_llama2 import Llama2Config
from llama2_hf.modeling_llama2 import Llama2ForCausalLM


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory of tensors allocated while `fn()` runs, above what was allocated before, in MB.

    CUDA: the caching allocator's peak. CPU has no allocator statistics, and the resident set keeps freed memory,
    so the profiler's allocation records are replayed in time order (allocation peaks inside one op are missed).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Median fp32 GFLOP/s of an n x n matmul: the speed-of-light anchor of this run."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def model_shape(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                # no BOS/EOS: greedy decoding of random weights must not stop early
                bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation=args.attn)


def build_models(args, device: torch.device, weights: dict | None = None,
                 ours_first: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Ours and transformers' Llama with the same config and the same weights (checked on one batch).

    Which model is allocated first matters on CPU (the allocator's state decides where large tensors land, and a
    few percent of matmul speed with it), so the rounds rebuild both, alternating `ours_first`."""
    shape = model_shape(args)
    if weights is None:
        torch.manual_seed(0)
        weights = Llama2ForCausalLM(Llama2Config(**shape)).state_dict()
    builders = [("ours", lambda: Llama2ForCausalLM(Llama2Config(**shape))),
                ("transformers", lambda: LlamaForCausalLM(LlamaConfig(**shape)))]
    models = {}
    for name, build in (builders if ours_first else builders[::-1]):
        models[name] = build().to(device)
        models[name].load_state_dict(weights, strict=True)
    ours, ref = models["ours"], models["transformers"]
    for model in (ours, ref):
        assert model.config._attn_implementation == args.attn, model.config._attn_implementation
    ids = torch.randint(0, args.vocab, (2, 64), device=device)
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"ours and transformers disagree on the logits: max |diff| = {diff}")
    return ours, ref, weights


def train_step_seconds(model, batch: torch.Tensor, steps: int, device) -> tuple[float, float]:
    """Mean wall-clock and process-CPU seconds of forward + backward of the LM loss."""
    model.train()
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
    _sync(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def generate_seconds(model, prompt: torch.Tensor, new_tokens: int, device) -> tuple[float, float, torch.Tensor]:
    """Wall-clock and process-CPU seconds of greedy generation of exactly `new_tokens` tokens, and the output."""
    model.eval()
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate stopped early: {out.shape[1] - prompt.shape[1]} of {new_tokens} tokens")
    return seconds, cpu_seconds, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel of both models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--train-batch", type=int, default=4, help="sequences per training step")
    parser.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps per measurement")
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens for generation")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536, help="FFN size (Meta's rule for 512, multiple 256)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (8 = MHA as 7B/13B; fewer for GQA)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ours, ref, weights = build_models(args, device)
    impls = {"ours": ours, "transformers": ref}
    n_params = sum(p.numel() for p in ours.parameters())
    n_matmul = sum(m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear))
    L, D = args.layers, args.hidden
    common = dict(bench="model", attn=args.attn, device=str(device), threads=torch.get_num_threads(), params=n_params)
    _emit(event="config", **common, vocab=args.vocab, hidden=D, layers=L, heads=args.heads, kv_heads=args.kv_heads,
          intermediate=args.intermediate, torch=torch.__version__)

    gen = torch.Generator().manual_seed(1)
    train_batch = torch.randint(0, args.vocab, (args.train_batch, args.seq_len), generator=gen).to(device)
    prompts = {b: torch.randint(0, args.vocab, (b, args.prompt_len), generator=gen).to(device)
               for b in args.gen_batches}
    train_flops = args.train_batch * args.seq_len * (6 * n_matmul + 6 * L * D * args.seq_len)

    def gen_flops(b: int) -> float:
        p, n = args.prompt_len, args.new_tokens
        prefill = p * 2 * n_matmul + 2 * L * D * p * p
        decode = sum(2 * n_matmul + 4 * L * D * (p + i) for i in range(n))
        return b * (prefill + decode)

    # Warm-up (allocator, kernels, lazy imports), not reported; the greedy outputs must agree.
    outs = {}
    for name, model in impls.items():
        train_step_seconds(model, train_batch, 1, device)
        for b, prompt in prompts.items():
            outs[(name, b)] = generate_seconds(model, prompt, 8, device)[2]
    for b in prompts:
        if not torch.equal(outs[("ours", b)], outs[("transformers", b)]):
            raise RuntimeError(f"greedy generations differ at batch {b}")

    def run(task: str, b: int | None, model) -> tuple[float, float, int, float]:
        """One measurement: wall seconds, CPU seconds, tokens processed, FLOPs."""
        if task == "train":
            wall, cpu = train_step_seconds(model, train_batch, args.train_steps, device)
            return wall, cpu, args.train_batch * args.seq_len, train_flops
        wall, cpu, _ = generate_seconds(model, prompts[b], args.new_tokens, device)
        return wall, cpu, b * args.new_tokens, gen_flops(b)

    tasks = [("train", None)] + [("generate", b) for b in args.gen_batches]
    peak_mem = {}  # untimed pass: the profiler slows the code it watches
    for task, b in tasks:
        for name, model in impls.items():
            model.zero_grad(set_to_none=True)  # gradients count in the training peak
            peak_mem[(task, b, name)] = peak_memory_mb(lambda: run(task, b, model), device)
            _emit(**common, task=task, impl=name, batch=b or args.train_batch,
                  peak_mem_mb=round(peak_mem[(task, b, name)], 1))

    wall_tps: dict[tuple[str, int | None, str], list[float]] = {}  # tokens per wall-clock second, per round
    cpu_tps: dict[tuple[str, int | None, str], list[float]] = {}  # tokens per process-CPU second, per round
    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_peak_gflops(device))
        _emit(**common, task="matmul_fp32_2048", round=r, gflops=round(peaks[-1], 1))
        if r:  # fresh models each round, allocated in alternating order (see build_models)
            ours, ref, _ = build_models(args, device, weights, ours_first=r % 2 == 0)
            impls = {"ours": ours, "transformers": ref}
            for model in impls.values():
                train_step_seconds(model, train_batch, 1, device)  # warm-up of the new allocation
        for task, b in tasks:
            order = list(impls) if (r + (b or 0)) % 2 == 0 else list(impls)[::-1]  # alternate who goes first
            for name in order:
                seconds, cpu_seconds, tokens, flops = run(task, b, impls[name])
                wall_tps.setdefault((task, b, name), []).append(tokens / seconds)
                cpu_tps.setdefault((task, b, name), []).append(tokens / cpu_seconds)
                _emit(**common, task=task, impl=name, round=r, batch=b or args.train_batch,
                      seq_len=args.seq_len if task == "train" else args.prompt_len + args.new_tokens,
                      seconds=round(seconds, 4), cpu_seconds=round(cpu_seconds, 4),
                      tokens_per_s=round(tokens / seconds, 1), gflops=round(flops / seconds / 1e9, 1),
                      frac_of_matmul_peak=round(flops / seconds / 1e9 / peaks[-1], 3))

    peak = statistics.median(peaks)
    for task, b in tasks:
        ours, ref = wall_tps[(task, b, "ours")], wall_tps[(task, b, "transformers")]
        ours_cpu, ref_cpu = cpu_tps[(task, b, "ours")], cpu_tps[(task, b, "transformers")]
        tokens, flops = (args.train_batch * args.seq_len, train_flops) if task == "train" else \
            (b * args.new_tokens, gen_flops(b))
        gflops = flops * statistics.median(ours) / tokens / 1e9
        _emit(**common, task=task, summary=True, batch=b or args.train_batch, rounds=args.rounds,
              ours_tokens_per_s=round(statistics.median(ours), 1),
              transformers_tokens_per_s=round(statistics.median(ref), 1),
              ratio_ours_over_transformers=round(statistics.median(ours) / statistics.median(ref), 3),
              median_paired_ratio=round(statistics.median(o / t for o, t in zip(ours, ref)), 3),
              cpu_time_ratio_ours_over_transformers=round(statistics.median(ours_cpu) / statistics.median(ref_cpu), 3),
              median_paired_cpu_time_ratio=round(statistics.median(o / t for o, t in zip(ours_cpu, ref_cpu)), 3),
              ours_gflops=round(gflops, 1), ours_frac_of_matmul_peak=round(gflops / peak, 3),
              matmul_peak_gflops=round(peak, 1), ours_peak_mem_mb=round(peak_mem[(task, b, "ours")], 1),
              transformers_peak_mem_mb=round(peak_mem[(task, b, "transformers")], 1))

if __name__ == "__main__":
    main()

"""Speed of `Llama2ForCausalLM` against `transformers.LlamaForCausalLM` with identical weights.

Measured in one run, interleaved (rounds alternate which model goes first; medians reported, because the machine is
shared and noisy):

- training step: forward + backward of the causal-LM loss (no optimizer step), tokens/s at `--seq-len` (512);
- generation: greedy decoding with the KV cache (`generate(do_sample=False)`), new tokens/s at batch 1 and 8
  (prefill included in the time);
- peak memory of each measurement (CPU: peak resident set above the one before, via /proc/self/clear_refs;
  CUDA: peak allocated above the one before);
- achieved GFLOP/s and its fraction of a fp32 2048x2048 `torch.matmul` measured in the same run.

FLOP counts (multiply-add = 2): training = 6 * N_matmul + 6 * L * D * T per token (the causal half of QK^T and AV,
forward + backward), N_matmul = parameters of the Linear layers (the embedding lookup is no matmul). Generation =
2 * N_matmul + 4 * L * D * context per token, prefill included.

    python benchmarks/bench_model.py                    # sdpa, ~25M parameters, seq 512, 5 rounds
    python benchmarks/bench_model.py --attn eager --rounds 3

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


class PeakMemory:
    """Peak memory of a block above the memory in use when it started, in MB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _proc(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated() / 2**20
        else:
            try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self._start = self._proc("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._start
        else:
            self.peak_mb = self._proc("VmHWM") - self._start


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


def build_models(args, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and transformers' Llama with the same config and the same weights (checked on one batch)."""
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 # no BOS/EOS: greedy decoding of random weights must not stop early
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation=args.attn)
    torch.manual_seed(0)
    ours = Llama2ForCausalLM(Llama2Config(**shape)).to(device)
    ref = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for model in (ours, ref):
        assert model.config._attn_implementation == args.attn, model.config._attn_implementation
    ids = torch.randint(0, args.vocab, (2, 64), device=device)
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"ours and transformers disagree on the logits: max |diff| = {diff}")
    return ours, ref


def train_step_seconds(model, batch: torch.Tensor, steps: int, device) -> float:
    """Mean seconds of forward + backward of the LM loss."""
    model.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
    _sync(device)
    return (time.perf_counter() - start) / steps


def generate_seconds(model, prompt: torch.Tensor, new_tokens: int, device) -> tuple[float, torch.Tensor]:
    model.eval()
    _sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    _sync(device)
    seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate stopped early: {out.shape[1] - prompt.shape[1]} of {new_tokens} tokens")
    return seconds, out


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

    ours, ref = build_models(args, device)
    impls = {"ours": ours, "transformers": ref}
    n_params = sum(p.numel() for p in ours.parameters())
    n_matmul = sum(m.weight.numel() for m in ours.modules() if isinstance(m, torch.nn.Linear))
    L, D = args.layers, args.hidden
    common = dict(bench="model", attn=args.attn, device=str(device), threads=torch.get_num_threads(), params=n_params)
    _emit(event="config", **common, vocab=args.vocab, hidden=D, layers=L, heads=args.heads, kv_heads=args.kv_heads,
          intermediate=args.intermediate, torch=torch.__version__)

    gen = torch.Generator().manual_seed(1)
    train_batch = torch.randint(0, args.vocab, (args.train_batch, args.seq_len), generator=gen).to(device)
    prompts = {b: torch.randint(0, args.vocab, (b, args.prompt_len), generator=gen).to(device) for b in args.gen_batches}
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
            outs[(name, b)] = generate_seconds(model, prompt, 8, device)[1]
    for b in prompts:
        if not torch.equal(outs[("ours", b)], outs[("transformers", b)]):
            raise RuntimeError(f"greedy generations differ at batch {b}")

    tasks = [("train", None)] + [("generate", b) for b in args.gen_batches]
    results: dict[tuple[str, int | None, str], list[float]] = {}
    peaks = []
    for r in range(args.rounds):
        peak = matmul_peak_gflops(device)
        peaks.append(peak)
        _emit(**common, task="matmul_fp32_2048", round=r, gflops=round(peak, 1))
        for task, b in tasks:
            order = list(impls) if (r + (b or 0)) % 2 == 0 else list(impls)[::-1]  # alternate who goes first
            for name in order:
                model = impls[name]
                with PeakMemory(device) as mem:
                    if task == "train":
                        seconds = train_step_seconds(model, train_batch, args.train_steps, device)
                        tokens, flops = args.train_batch * args.seq_len, train_flops
                    else:
                        seconds, _ = generate_seconds(model, prompts[b], args.new_tokens, device)
                        tokens, flops = b * args.new_tokens, gen_flops(b)
                tps = tokens / seconds
                results.setdefault((task, b, name), []).append(tps)
                _emit(**common, task=task, impl=name, round=r, batch=b or args.train_batch,
                      seq_len=args.seq_len if task == "train" else args.prompt_len + args.new_tokens,
                      seconds=round(seconds, 4), tokens_per_s=round(tps, 1), peak_mem_mb=round(mem.peak_mb, 1),
                      gflops=round(flops / seconds / 1e9, 1), frac_of_matmul_peak=round(flops / seconds / 1e9 / peak, 3))

    peak = statistics.median(peaks)
    for task, b in tasks:
        ours_tps, ref_tps = results[(task, b, "ours")], results[(task, b, "transformers")]
        flops = train_flops if task == "train" else gen_flops(b)
        tokens = args.train_batch * args.seq_len if task == "train" else b * args.new_tokens
        med_ours, med_ref = statistics.median(ours_tps), statistics.median(ref_tps)
        _emit(**common, task=task, summary=True, batch=b or args.train_batch, rounds=args.rounds,
              ours_tokens_per_s=round(med_ours, 1), transformers_tokens_per_s=round(med_ref, 1),
              ratio_ours_over_transformers=round(med_ours / med_ref, 3),
              median_paired_ratio=round(statistics.median(o / t for o, t in zip(ours_tps, ref_tps)), 3),
              ours_gflops=round(flops * med_ours / tokens / 1e9, 1),
              ours_frac_of_matmul_peak=round(flops * med_ours / tokens / 1e9 / peak, 3),
              matmul_peak_gflops=round(peak, 1))


if __name__ == "__main__":
    main()

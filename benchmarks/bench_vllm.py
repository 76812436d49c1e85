"""Rejection sampling with the vLLM backend against our PyTorch path: K samples per prompt, samples per second.

Both backends run the generation of the `rejection-sample` stage as the stage runs it: `RejectionSampler.sample_batches`
over `prompt_batches` of `--prompt-batch-size` prompts, seeded per batch (PyTorch: one generator per batch) or per
prompt (vLLM: seeds from (seed, iteration, prompt id)), temperature 1.0, top-p 1.0, stop at EOS. The reward is a
constant, so only generation is timed (scoring is the same code on both backends). The vLLM engine
(`VLLMEngine.start_for_model`, a server in vLLM's own environment, `llama2-hf setup-vllm`) is started once before
the rounds: its start-up is reported on its own line and excluded from the rates. Rounds alternate which backend
goes first; medians are reported.

Model: a random-initialised Llama 2 of 4 layers, width 256 (4 heads of 64: vLLM's CPU attention needs head_dim >= 64),
Meta's 32k tokenizer (from $LLAMA2_HF_DATA/llama2-tokenizer); prompts: the first human turns of HH-RLHF
harmless-base (synthetic prompts when absent). A random model emits EOS about once per 32k tokens, so nearly every
sample has `--max-new-tokens` tokens; the generated token counts are reported.

    python benchmarks/bench_vllm.py                       # K=8, 32 prompts, 64 new tokens, 3 rounds
    python benchmarks/bench_vllm.py --rounds 5 --threads 2

One JSON line per measurement, then a summary line with the median samples/s of each backend and their ratio
(goal >= 1.4 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rejection_sampling import load_prompts, load_tokenizer  # noqa: E402

from llama2_hf import Llama2Config, Llama2ForCausalLM  # noqa: E402
from llama2_hf.data import prompt_row  # noqa: E402
from llama2_hf.rejection_sampling import RejectionSampler, RejectionSamplingConfig, prompt_batches  # noqa: E402
from llama2_hf.sampling import BackendArguments, SamplingConfig  # noqa: E402
from llama2_hf.sampling.torch_backend import TorchSampler  # noqa: E402
from llama2_hf.sampling.vllm_backend import VLLMSampler  # noqa: E402
from llama2_hf.sampling.vllm_engine import VLLMEngine  # noqa: E402


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def zero_reward(prompts, responses, **columns):
    return [0.0] * len(responses)


def run_backend(sampler: RejectionSampler, batches) -> tuple[float, int, int]:
    """Seconds, samples and generated tokens of one pass over every batch."""
    start = time.perf_counter()
    records = sampler.sample_batches(batches, iteration=1)
    seconds = time.perf_counter() - start
    samples = sum(len(r["responses"]) for r in records)
    tokens = sum(len(sampler.tokenizer.encode(t, add_special_tokens=False)) for r in records for t in r["responses"])
    return seconds, samples, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = Llama2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, intermediate_size=args.hidden * 8 // 3 // 32 * 32,
                          vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=0)
    policy = Llama2ForCausalLM(config).eval()
    prompts = [prompt_row({"messages": m, "id": f"p{i}"}, i) for i, m in enumerate(load_prompts(args.prompts, False))]
    batches = prompt_batches(prompts, args.prompt_batch_size)
    rs = RejectionSamplingConfig(output_dir="unused", num_samples=args.num_samples, use_cpu=True, report_to=[])
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                              prompt_batch_size=args.prompt_batch_size)
    ours = RejectionSampler(TorchSampler(policy, tokenizer, sampling), zero_reward, rs)
    common = dict(prompts=len(prompts), num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                  layers=args.layers, hidden=args.hidden, vocab=len(tokenizer), threads=torch.get_num_threads())

    start = time.perf_counter()
    with VLLMEngine.start_for_model(policy, BackendArguments(generation_backend="vllm")) as engine:
        _emit(measurement="vllm_engine_startup", seconds=round(time.perf_counter() - start, 2), **common)
        theirs = RejectionSampler(VLLMSampler(engine, tokenizer, sampling), zero_reward, rs)
        run_backend(theirs, batches[:1])  # warm-up of both backends (first-call allocations), not timed
        run_backend(ours, batches[:1])
        rates = {"torch": [], "vllm": []}
        for round_ in range(args.rounds):
            order = [("torch", ours), ("vllm", theirs)]
            if round_ % 2:
                order.reverse()
            for name, sampler in order:
                seconds, samples, tokens = run_backend(sampler, batches)
                rates[name].append(samples / seconds)
                _emit(measurement="rejection_sampling", backend=name, round=round_, seconds=round(seconds, 3),
                      samples=samples, generated_tokens=tokens, samples_per_s=round(samples / seconds, 2),
                      tokens_per_s=round(tokens / seconds, 1), **common)
    torch_rate, vllm_rate = statistics.median(rates["torch"]), statistics.median(rates["vllm"])
    _emit(measurement="summary", torch_samples_per_s=round(torch_rate, 2), vllm_samples_per_s=round(vllm_rate, 2),
          ratio_vllm_over_torch=round(vllm_rate / torch_rate, 3), goal=1.4, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rejection-sampling throughput: K samples per prompt, ours against a naive loop of single `generate` calls.

Measured in the same run, rounds interleaved, medians reported (the machine is shared and noisy):

- `naive`: for every prompt and every one of its K samples, one `model.generate(prompt, do_sample=True)` call
  (batch 1: the prompt's prefill is recomputed K times and nothing is batched);
- `hf_batched`: transformers' `generate(num_return_sequences=K)` on batches of prompts (batched, but each prompt's
  prefill is still computed K times, once per copy);
- `ours`: `llama2_hf.generation.generate` (batched; one prefill per prompt, its KV cache copied K times);
- `pipeline_naive` / `pipeline_ours`: the whole rejection-sampling step, generation plus scoring with two reward models
  (safety-gated) and the JSONL log: the naive loop scores each sample with its own RM forward passes, ours is
  `RejectionSampler.sample_batches` writing through `RankParts.append`, as the `rejection-sample` stage does
  (batched scoring, one fsynced append per batch).

Samples are drawn at temperature 1.0, top-p 1.0. The generation-only methods use an EOS id the model never emits, so
every sample has exactly `--max-new-tokens` tokens; the pipelines use the real EOS (a random model emits it about once
in 32k tokens). Models are random-initialised Llama 2 shapes (default ~30M parameters with
the 32k vocabulary); prompts are the first human turns of HH-RLHF harmless-base when $LLAMA2_HF_DATA is present.

    python benchmarks/bench_rejection_sampling.py                 # K=8, 16 prompts, 64 new tokens, 3 rounds
    python benchmarks/bench_rejection_sampling.py --threads 2 --rounds 5

One JSON line per measurement, then one summary line with medians and ratios against `naive`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama2_hf import Llama2Config, Llama2ForCausalLM, Llama2ForRewardModel
from llama2_hf.generation import SamplingConfig, generate
from llama2_hf.data import prompt_row
from llama2_hf.rejection_sampling import RejectionSampler, RejectionSamplingConfig, prompt_batches
from llama2_hf.rewards import RewardModelScorer, SafetyGatedReward
from llama2_hf.runner import RankParts
from llama2_hf.sampling.torch_backend import TorchSampler
from llama2_hf.tokenization_llama2 import encode_dialog

ROOT = Path(__file__).resolve().parents[1]
# The real public data (Meta's tokenizer.model, HH-RLHF, the benchmarks): the folder named by LLAMA2_HF_DATA.
SHARED = Path(os.environ.get("LLAMA2_HF_DATA", "data"))


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def load_tokenizer():
    """Meta's 32k tokenizer from $LLAMA2_HF_DATA, else a small one trained on the fly."""
    from llama2_hf import Llama2Tokenizer, train_llama2_tokenizer

    model = SHARED / "llama2-tokenizer" / "tokenizer.model"
    if model.is_file():
        tok = Llama2Tokenizer.from_sentencepiece(model)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_corpus

        tok = train_llama2_tokenizer(tiny_corpus(), vocab_size=512)
    tok.pad_token = tok.unk_token
    return tok


def load_prompts(n: int, multi_turn: bool) -> list[list[dict]]:
    """Chat prompts from HH-RLHF harmless-base: the first human turn, or (`multi_turn`) the whole dialogue up to its
    last human turn, as rejection sampling sees prompts with their history."""
    from llama2_hf.preference_data import parse_hh_transcript

    path = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    if not path.is_file():
        return [[{"role": "user", "content": f"Write a short poem about the number {i} and explain it."}]
                for i in range(n)]
    prompts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            messages = parse_hh_transcript(json.loads(line)["chosen"])[:-1]  # drop the final answer
            if any(not m["content"] for m in messages) or messages[-1]["role"] != "user":
                continue
            if multi_turn and len(messages) >= 3:
                prompts.append(messages)
            elif not multi_turn and 20 <= len(messages[0]["content"]) <= 400:
                prompts.append(messages[:1])
            if len(prompts) == n:
                break
    return prompts


def build(args, vocab_size: int):
    shape = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.heads, intermediate_size=args.hidden * 8 // 3 // 32 * 32,
                 vocab_size=vocab_size, max_position_embeddings=2048, pad_token_id=0)
    torch.manual_seed(0)
    policy = Llama2ForCausalLM(Llama2Config(**shape)).eval()
    rms = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        rms.append(Llama2ForRewardModel(Llama2Config(**shape)).eval())
    return policy, rms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts")
    p.add_argument("--prompt-batch-size", type=int, default=8, help="prompts per batch (ours and hf_batched)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per sample")
    p.add_argument("--multi-turn", action="store_true",
                   help="prompts with their dialogue history (longer prompts: the shared prefill matters more)")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tok = load_tokenizer()
    policy, (helpful_rm, safety_rm) = build(args, len(tok))
    texts = load_prompts(args.prompts, args.multi_turn)
    ids = [encode_dialog(tok, t) for t in texts]
    never = len(tok) + 7  # an EOS id outside the vocabulary: every sample runs to max_new_tokens
    k, new = args.k, args.max_new_tokens
    reward = SafetyGatedReward(RewardModelScorer(helpful_rm, tok, batch_size=32),
                               RewardModelScorer(safety_rm, tok, batch_size=32), whiten="none")
    n_params = sum(p.numel() for p in policy.parameters())
    _emit(setup=dict(params=n_params, prompts=len(ids), mean_prompt_tokens=statistics.mean(map(len, ids)), k=k,
                     max_new_tokens=new, threads=args.threads, tokenizer_vocab=len(tok)))

    def naive_generate(eos=never):
        out = []
        for prompt in ids:
            for _ in range(k):
                seq = policy.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                      max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
                out.append(seq[0, len(prompt):].tolist())
        return out

    def hf_batched():
        out = []
        for s in range(0, len(ids), args.prompt_batch_size):
            batch = ids[s: s + args.prompt_batch_size]
            enc = tok.pad({"input_ids": batch}, padding=True, return_tensors="pt")
            seq = policy.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                  min_new_tokens=new, num_return_sequences=k, eos_token_id=never, pad_token_id=0)
            out += seq[:, enc["input_ids"].shape[1]:].tolist()
        return out

    def ours():
        res = generate(policy, ids, SamplingConfig(max_new_tokens=new, temperature=1.0, top_p=1.0, num_samples=k,
                                                   prompt_batch_size=args.prompt_batch_size), eos_token_id=never)
        return [r for rs in res.response_ids for r in rs]

    def pipeline_naive():
        responses = naive_generate(tok.eos_token_id)
        decoded = [tok.decode(r, skip_special_tokens=True) for r in responses]
        prompts = [t for t in texts for _ in range(k)]
        # one RM forward per sample and model, as a loop over single `reward(prompt, response)` calls does
        return [reward.score([pr], [r]).raw.item() for pr, r in zip(prompts, decoded)]

    rows = [prompt_row({"prompt": t}, i) for i, t in enumerate(texts, 1)]

    def pipeline_ours():
        with tempfile.TemporaryDirectory() as d:
            config = RejectionSamplingConfig(output_dir=d, use_cpu=True, num_samples=k, finetune=False)
            sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, top_p=1.0,
                                      prompt_batch_size=args.prompt_batch_size)
            rs = RejectionSampler(TorchSampler(policy, tok, sampling), reward, config)
            return rs.sample_batches(prompt_batches(rows, args.prompt_batch_size), 1,
                                     write=RankParts(d, "candidates").append)

    methods = {"naive": naive_generate, "hf_batched": hf_batched, "ours": ours,
               "pipeline_naive": pipeline_naive, "pipeline_ours": pipeline_ours}
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m: [] for m in methods}
    samples = len(ids) * k
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            torch.manual_seed(r)
            wall, cpu = time.perf_counter(), time.process_time()
            result = methods[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if name in ("naive", "hf_batched", "ours"):
                assert len(result) == samples and all(len(x) == new for x in result), name
            times[name].append(wall)
            cpu_times[name].append(cpu)
            _emit(round=r, method=name, wall_s=round(wall, 3), cpu_s=round(cpu, 3),
                  samples_per_s=round(samples / wall, 2))
    med = {m: statistics.median(v) for m, v in times.items()}
    cpu_med = {m: statistics.median(v) for m, v in cpu_times.items()}
    _emit(summary=dict(
        samples=samples, k=k,
        samples_per_s={m: round(samples / t, 2) for m, t in med.items()},
        generation_speedup_vs_naive=round(med["naive"] / med["ours"], 2),
        generation_speedup_vs_hf_batched=round(med["hf_batched"] / med["ours"], 2),
        hf_batched_speedup_vs_naive=round(med["naive"] / med["hf_batched"], 2),
        pipeline_speedup_vs_naive=round(med["pipeline_naive"] / med["pipeline_ours"], 2),
        cpu_generation_speedup_vs_naive=round(cpu_med["naive"] / cpu_med["ours"], 2),
        cpu_generation_speedup_vs_hf_batched=round(cpu_med["hf_batched"] / cpu_med["ours"], 2),
        cpu_pipeline_speedup_vs_naive=round(cpu_med["pipeline_naive"] / cpu_med["pipeline_ours"], 2),
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())

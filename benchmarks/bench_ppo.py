"""PPO iteration time split into generation, scoring and training (`Llama2PPOTrainer.step`).

Per iteration the trainer reports:
- `time/generation`: the rollout (one sample per prompt, KV cache, `generation.generate`);
- `time/scoring`: everything between rollout and training: the reward (two reward models, safety-gated, whitened;
  also reported alone as `time/scoring_reward`), log-probabilities under the policy and the reference, critic values,
  KL penalty and GAE;
- `time/training`: the PPO epochs (forward + backward of policy and critic, one optimizer step per mini-batch).

Models are random-initialised Llama 2 shapes (policy, critic, two reward models of the same shape); prompts are the
first human turns of HH-RLHF harmless-base when $LLAMA2_HF_DATA is present. The first iteration is a warm-up and is
not counted; medians of the following ones are reported, with each part's share of the iteration.

    python benchmarks/bench_ppo.py                      # batch 32, mini-batch 8, 64 new tokens, 3 timed iterations
    python benchmarks/bench_ppo.py --lora-r 8           # LoRA policy, reference = disabled adapter

One JSON line per iteration, then one summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from llama2_hf.rewards import RewardModelScorer, SafetyGatedReward
from llama2_hf.trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer, PPOSampling

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_rejection_sampling import build, load_prompts, load_tokenizer  # noqa: E402

PARTS = ("time/generation", "time/scoring", "time/scoring_reward", "time/training", "time/iteration")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="rollouts per iteration (paper: 512)")
    p.add_argument("--mini-batch-size", type=int, default=8, help="rollouts per optimizer step (paper: 64)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="rollouts per forward/backward pass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rollout length limit")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank of the policy (0: full fine-tuning)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tok = load_tokenizer()
    policy, (helpful_rm, safety_rm) = build(args, len(tok))
    reward = SafetyGatedReward(RewardModelScorer(helpful_rm, tok, batch_size=16),
                               RewardModelScorer(safety_rm, tok, batch_size=16), whiten="batch")
    prompts = [{"prompt": m, "is_safety_prompt": i % 4 == 0}
               for i, m in enumerate(load_prompts(args.batch_size, False))]
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with tempfile.TemporaryDirectory() as out:
        cfg = Llama2PPOConfig(output_dir=out, num_iterations=args.iterations + 1, batch_size=args.batch_size,
                              mini_batch_size=args.mini_batch_size, micro_batch_size=args.micro_batch_size,
                              save_steps=0)
        sampling = PPOSampling(max_new_tokens=args.max_new_tokens).sampling_config()
        trainer = Llama2PPOTrainer(cfg, policy, tok, reward, prompts, peft_config=peft_config, sampler=sampling)
        print(json.dumps({"setup": dict(params=sum(x.numel() for x in policy.parameters()),
                                        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                                        max_new_tokens=args.max_new_tokens, lora_r=args.lora_r,
                                        threads=args.threads)}), flush=True)
        rows = []
        for i in range(args.iterations + 1):
            cpu = time.process_time()
            m = trainer.step()
            record = {k: round(m[k], 3) for k in PARTS}
            record.update(iteration=i, warmup=i == 0, cpu_s=round(time.process_time() - cpu, 3),
                          response_length=m["response/length_mean"], kl=round(m["objective/kl"], 5))
            print(json.dumps(record), flush=True)
            if i:
                rows.append(record)
    med = {k: statistics.median(r[k] for r in rows) for k in PARTS}
    total = med["time/iteration"]
    print(json.dumps({"summary": {
        "median_s": {k.split("/")[1]: round(v, 3) for k, v in med.items()},
        "share": {k.split("/")[1]: round(med[k] / total, 3) for k in PARTS[:-1]},
        "rollouts_per_s": round(args.batch_size / total, 2),
    }}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

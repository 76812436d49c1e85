"""PPO iteration time, ours (`Llama2PPOTrainer`) against TRL's last `PPOTrainer` (TRL 1.12, `trl.experimental.ppo`).

Both get the same random-initialised Llama policy, reward model and critic (saved once as plain transformers
`LlamaForCausalLM` / `LlamaForSequenceClassification` folders; the critic starts from the reward model in both), the
same prompt token ids (HH-RLHF harmless-base first human turns in the Llama 2-Chat format when $LLAMA2_HF_DATA is
present), batch, mini-batch, PPO epochs, response length limit, temperature 1.0, KL coefficient and k1 estimator,
raw reward-model logits (no reward whitening) and whitened advantages. TRL runs in its own environment (its pins
differ from ours) through `ppo_trl_worker.py`; ours runs in a subprocess of this one, so both start cold.

Each round runs both, in alternating order; a run does one warm-up iteration and `--iterations` timed ones. Phases:
rollout (sampling), scoring (reference log-probabilities, critic values, reward, KL, GAE), update (PPO epochs; both
with transformers' default fused AdamW). Neither runs a policy forward to score its own samples: TRL keeps the
sampling logits (`generate(output_scores=True)`) and takes their log-softmax in its scoring loop, ours computes the
log-probabilities and entropies inside the decoding loop (`rollout_logprobs`), so that work falls in TRL's scoring and
in our rollout; the iteration is the like-for-like figure. One JSON line per iteration, one per run (its median), then
the summary: medians over rounds of each run's median, and the TRL / ours ratio of every phase (paired per round,
then the median). Ours runs with the benchmarks folder and this checkout's root on PYTHONPATH (an uninstalled
checkout works), TRL's worker with nothing of ours.

    python benchmarks/bench_ppo_trl.py                         # batch 32, mini-batch 8, 64 new tokens, 3 rounds
    python benchmarks/bench_ppo_trl.py --rounds 2 --iterations 1 --batch-size 16 --max-new-tokens 32

TRL's environment: `--trl-python` or $LLAMA2_HF_TRL_PPO_PYTHON, default ~/.cache/llama2_hf/trl-ppo-env/bin/python,
built with

    python -m venv ~/.cache/llama2_hf/trl-ppo-env
    ~/.cache/llama2_hf/trl-ppo-env/bin/pip install torch==2.13.0
    ~/.cache/llama2_hf/trl-ppo-env/bin/pip install trl==1.12.0 transformers==5.23.0 accelerate==1.15.0 datasets
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_TRL_PYTHON = Path.home() / ".cache" / "llama2_hf" / "trl-ppo-env" / "bin" / "python"
PHASES = ("rollout", "scoring", "update", "iteration")


def build_models(args, vocab_size: int, out: Path) -> tuple[str, str]:
    """A policy and a reward model in plain transformers Llama format (both environments load it)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, intermediate_size=args.hidden * 8 // 3 // 32 * 32,
                         vocab_size=vocab_size, max_position_embeddings=2048, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "policy")
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(out / "reward_model")
    return str(out / "policy"), str(out / "reward_model")


def run_ours(settings: dict) -> int:
    """Our trainer on the saved models; prints one JSON line per iteration."""
    from bench_rejection_sampling import load_tokenizer

    from llama2_hf.modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel
    from llama2_hf.rewards import RewardModelScorer
    from llama2_hf.trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer, PPOSampling

    s = settings
    torch.set_num_threads(s["threads"])
    tok = load_tokenizer()
    policy = Llama2ForCausalLM.from_pretrained(s["policy"], dtype=torch.float32)
    reward_model = Llama2ForRewardModel.from_pretrained(s["reward_model"], dtype=torch.float32)
    critic = Llama2ForRewardModel.from_pretrained(s["reward_model"], dtype=torch.float32)
    reward = RewardModelScorer(reward_model, tok, batch_size=s["rollout_batch_size"])
    iterations = s["iterations"] + 1
    with tempfile.TemporaryDirectory() as out:
        cfg = Llama2PPOConfig(
            output_dir=out, use_cpu=True, num_iterations=iterations, batch_size=s["batch_size"],
            mini_batch_size=s["mini_batch_size"], ppo_epochs=s["ppo_epochs"],
            learning_rate=s["learning_rate"], kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"],
            gamma=s["gamma"], lam=s["lam"], whiten_advantages=True, save_steps=0, seed=s["seed"])
        sampling = PPOSampling(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                               prompt_batch_size=s["rollout_batch_size"]).sampling_config()
        trainer = Llama2PPOTrainer(cfg, policy, tok, reward, [{"prompt": p} for p in s["prompts"]],
                                   value_model=critic, sampler=sampling)
        cpu = {}

        def cpu_timed(name, fn):
            def timed(*a, **k):
                start = time.process_time()
                try:
                    return fn(*a, **k)
                finally:
                    cpu[name] = cpu.get(name, 0.0) + time.process_time() - start
            return timed

        trainer._generate = cpu_timed("rollout", trainer._generate)
        trainer._train_on = cpu_timed("update", trainer._train_on)
        print(json.dumps({"impl": "ours", "setup": {"torch": torch.__version__, "iterations": iterations}}),
              flush=True)
        for i in range(iterations):
            cpu.clear()
            start = time.process_time()
            m = trainer.step()
            total_cpu = time.process_time() - start
            row = {"rollout": m["time/generation"], "scoring": m["time/scoring"], "update": m["time/training"],
                   "iteration": m["time/iteration"], "rollout_cpu": cpu["rollout"], "update_cpu": cpu["update"],
                   "scoring_cpu": total_cpu - cpu["rollout"] - cpu["update"], "iteration_cpu": total_cpu,
                   "response_length": m["response/length_mean"], "eos_fraction": m["response/eos_fraction"]}
            print(json.dumps({"impl": "ours", "index": i, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    return 0


def run_worker(impl: str, settings_path: Path, trl_python: str, round_index: int) -> dict:
    """One cold run of `impl`; echoes its lines and returns the median of its timed iterations."""
    if impl == "ours":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(settings_path)]
    else:
        cmd = [trl_python, str(HERE / "ppo_trl_worker.py"), str(settings_path)]
    # The benchmarks folder (bench_rejection_sampling) and this checkout's package, installed or not.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(HERE), str(HERE.parent))),
           "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if impl == "trl":
        env.pop("PYTHONPATH")  # nothing of ours on TRL's path
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    rows = []
    for line in proc.stdout.splitlines():
        if not line.startswith('{"impl"'):  # the trainers print their own logs too
            continue
        record = json.loads(line)
        record["round"] = round_index
        if "index" in record:
            record["warmup"] = record["index"] == 0
            if record["index"]:
                rows.append(record)
        print(json.dumps(record), flush=True)
    if proc.returncode or not rows:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{impl} run failed (exit {proc.returncode})")
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    med = {k: round(statistics.median(r[k] for r in rows), 4) for k in keys}
    print(json.dumps({"run": impl, "round": round_index, "median": med}), flush=True)
    return med


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="rollouts per iteration (paper: 512)")
    p.add_argument("--mini-batch-size", type=int, default=8, help="rollouts per optimizer step (paper: 64)")
    p.add_argument("--rollout-batch-size", type=int, default=32,
                   help="prompts per generation batch (ours: prompt_batch_size; TRL: "
                        "local_rollout_forward_batch_size, also its scoring chunk)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each batch (paper: 1; TRL's default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per run (after one warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each running both in alternating order")
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    p.add_argument("--trl-python", default=os.environ.get("LLAMA2_HF_TRL_PPO_PYTHON", str(DEFAULT_TRL_PYTHON)),
                   help="python of the environment with trl==1.12.0")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_ours(json.loads(Path(args.worker).read_text()))
    if not Path(args.trl_python).is_file():
        raise SystemExit(f"no python at {args.trl_python}: build TRL's environment first (see --help)")

    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from bench_rejection_sampling import load_prompts, load_tokenizer

    from llama2_hf.data import prompt_row
    from llama2_hf.tokenization_llama2 import encode_dialog

    tok = load_tokenizer()
    prompts = load_prompts(args.batch_size, False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy, reward_model = build_models(args, len(tok), tmp)
        settings = {
            "policy": policy, "reward_model": reward_model, "prompts": prompts,
            "prompt_ids": [encode_dialog(tok, prompt_row({"prompt": m}, i).messages)
                           for i, m in enumerate(prompts, 1)],
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
            "rollout_batch_size": args.rollout_batch_size, "ppo_epochs": args.ppo_epochs,
            "max_new_tokens": args.max_new_tokens, "iterations": args.iterations, "threads": args.threads,
            "temperature": 1.0, "learning_rate": 1e-6, "kl_coef": 0.01, "kl_estimator": "k1", "gamma": 1.0,
            "lam": 0.95, "seed": 42,
        }
        (tmp / "settings.json").write_text(json.dumps(settings))
        print(json.dumps({"setup": {k: v for k, v in settings.items() if k not in ("prompts", "prompt_ids")} | {
            "prompt_tokens_mean": round(statistics.mean(map(len, settings["prompt_ids"])), 1),
            "hidden": args.hidden, "layers": args.layers, "vocab": len(tok)}}), flush=True)
        results = {"ours": [], "trl": []}
        for r in range(args.rounds):
            for impl in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                results[impl].append(run_worker(impl, tmp / "settings.json", args.trl_python, r))
    summary = {}
    for impl, runs in results.items():
        summary[impl] = {k: round(statistics.median(run[k] for run in runs), 3) for k in runs[0]}
    ratios = {}
    for phase in PHASES:
        for suffix in ("", "_cpu"):
            key = phase + suffix
            per_round = [t[key] / o[key] for o, t in zip(results["ours"], results["trl"])]
            ratios[key] = {"median_paired": round(statistics.median(per_round), 3),
                           "rounds": [round(x, 3) for x in per_round]}
    print(json.dumps({"summary": summary, "trl_over_ours": ratios}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TRL's last `PPOTrainer` (`trl.experimental.ppo`, TRL 1.12) timed per iteration and per phase.

Run by `bench_ppo_trl.py` with the python of the environment that holds that TRL release; it imports nothing from
llama2_hf (whose pins differ). It reads one JSON settings file (model folders, prompt token ids, batch sizes) and
prints one JSON line per PPO iteration.

TRL's `train()` runs all iterations in one loop, so the phases are cut at its own seams:
- rollout: `batch_generation` (sampling with `output_scores`, whose logits give the rollout log-probabilities);
- scoring: from the end of the rollout to the first training forward of the policy+critic wrapper (reference
  log-probabilities, critic values, the reward model, KL penalty, GAE, whitening);
- update: from that forward to the trainer's `on_step_end` callback (PPO epochs, optimizer steps, metric logging).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, TrainerCallback  # noqa: E402

import trl  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as trl_ppo  # noqa: E402


class IdsTokenizer:
    """The little of a tokenizer PPOTrainer uses when prompts arrive as token ids: the pad and EOS ids."""

    padding_side = "left"

    def __init__(self, pad_token_id: int, eos_token_id: int):
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id


def left_pad_collator(pad_token_id: int):
    """Left-pad prompt ids (TRL's generation expects left-padded queries and reads padding from the pad id)."""

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r["input_ids"]):] = torch.tensor(r["input_ids"])
        return {"input_ids": ids}

    return collate


class PhaseClock:
    """Wall and process-CPU time of each phase of every iteration, read at TRL's function seams."""

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id
        self.rows: list[dict] = []
        self._marks: dict[str, tuple[float, float]] = {}
        self._lengths: list[float] = []

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def wrap_generation(self, fn):
        def timed(model, queries, *args, **kwargs):
            self._marks = {"start": self.now()}
            out = fn(model, queries, *args, **kwargs)
            self._marks["rollout_end"] = self.now()
            responses = out[0][:, queries.shape[1]:]
            eos = responses == self.eos_token_id
            # Length up to and including the first EOS (the whole response when there is none).
            first = torch.where(eos.any(-1), eos.float().argmax(-1) + 1, torch.full_like(eos[:, 0], eos.shape[1],
                                                                                          dtype=torch.long))
            self._lengths = [first.float().mean().item(), eos.any(-1).float().mean().item()]
            return out

        return timed

    def wrap_forward(self, fn):
        def timed(model, *args, **kwargs):
            if isinstance(model, trl_ppo.PolicyAndValueWrapper) and "update_start" not in self._marks:
                self._marks["update_start"] = self.now()
            return fn(model, *args, **kwargs)

        return timed

    def step_end(self) -> None:
        end = self.now()
        m = self._marks
        row = {}
        for key, a, b in (("rollout", "start", "rollout_end"), ("scoring", "rollout_end", "update_start")):
            row[key] = m[b][0] - m[a][0]
            row[f"{key}_cpu"] = m[b][1] - m[a][1]
        row["update"] = end[0] - m["update_start"][0]
        row["update_cpu"] = end[1] - m["update_start"][1]
        row["iteration"] = end[0] - m["start"][0]
        row["iteration_cpu"] = end[1] - m["start"][1]
        row["response_length"], row["eos_fraction"] = self._lengths
        self.rows.append(row)
        print(json.dumps({"impl": "trl", "index": len(self.rows) - 1,
                          **{k: round(v, 4) for k, v in row.items()}}), flush=True)


class StepEnd(TrainerCallback):
    def __init__(self, clock: PhaseClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_end()


def main(settings_path: str) -> int:
    s = json.loads(open(settings_path).read())
    torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    policy = LlamaForCausalLM.from_pretrained(s["policy"], dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(s["policy"], dtype=torch.float32)
    reward = LlamaForSequenceClassification.from_pretrained(s["reward_model"], dtype=torch.float32)
    critic = LlamaForSequenceClassification.from_pretrained(s["reward_model"], dtype=torch.float32)
    tok = IdsTokenizer(s["pad_token_id"], s["eos_token_id"])
    data = Dataset.from_dict({"input_ids": s["prompt_ids"]})
    iterations = s["iterations"] + 1  # the first is a warm-up
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
            disable_tqdm=True, logging_steps=1, seed=s["seed"], gradient_checkpointing=False,
            # One optimizer step per mini-batch: the whole batch on the device, split in num_mini_batches.
            per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
            num_mini_batches=s["batch_size"] // s["mini_batch_size"], num_ppo_epochs=s["ppo_epochs"],
            total_episodes=s["batch_size"] * iterations, local_rollout_forward_batch_size=s["rollout_batch_size"],
            response_length=s["max_new_tokens"], temperature=s["temperature"], stop_token="eos",
            missing_eos_penalty=None, num_sample_generations=0, learning_rate=s["learning_rate"],
            kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"], whiten_rewards=False,
            cliprange=0.2, cliprange_value=0.2, gamma=s["gamma"], lam=s["lam"],
        )
        clock = PhaseClock(s["eos_token_id"])
        trl_ppo.batch_generation = clock.wrap_generation(trl_ppo.batch_generation)
        trl_ppo.forward = clock.wrap_forward(trl_ppo.forward)
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=data, eval_dataset=data, value_model=critic,
                             data_collator=left_pad_collator(s["pad_token_id"]), callbacks=[StepEnd(clock)])
        print(json.dumps({"impl": "trl", "setup": {"trl": trl.__version__, "torch": torch.__version__,
                                                   "iterations": iterations}}), flush=True)
        trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

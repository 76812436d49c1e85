"""The whole Llama 2-Chat pipeline on the synthetic world, stage by stage, each resuming from its outputs.

Every stage writes its artefacts under `output_dir/<stage>/` and a `run.json` (`stage`, `config`, `inputs`,
`metrics`) last, so a stage whose `run.json` exists is skipped on the next run and its metrics are read back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..configuration_llama2 import Llama2Config
from ..generation import SamplingConfig, generate_text
from ..modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel
from ..tokenization_llama2 import Llama2Tokenizer, train_llama2_tokenizer
from .world import PIRATE_INSTRUCTION, PIRATE_PREFIX, World, is_correct, is_refusal, is_violation, parse_prompt

logger = logging.getLogger(__name__)

CPU = dict(use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, report_to=[], save_strategy="no",
           disable_tqdm=True, dataloader_num_workers=0)


@dataclass
class QuickstartConfig:
    """Sizes of the laptop-scale run. `scale` multiplies every data size and step count (CI runs 0.25)."""

    output_dir: str = "quickstart_output"
    scale: float = 1.0
    seed: int = 0
    hidden_size: int = 96
    num_layers: int = 3
    vocab_size: int = 400
    pretrain_docs: int = 1500
    pretrain_steps: int = 250
    sft_dialogs: int = 3000
    sft_epochs: float = 1.0
    rm_pairs: int = 3000
    eval_prompts: int = 120
    rs_prompts: int = 300
    rs_samples: int = 4
    rs_temperature: float = 1.0
    ppo_iterations: int = 12
    ppo_batch: int = 32
    gatt_dialogs: int = 200
    threads: int = 1
    stages: list[str] = field(default_factory=list)  # empty: all

    def n(self, value: int, minimum: int = 8) -> int:
        return max(minimum, int(round(value * self.scale)))


class Pipeline:
    def __init__(self, config: QuickstartConfig):
        self.config = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.world = World(seed=config.seed)
        self.results: dict[str, dict] = {}
        torch.set_num_threads(config.threads)

    # -- stage bookkeeping ---------------------------------------------------------------------------------------

    def stage(self, name: str, fn: Callable[[Path], dict], inputs: dict | None = None) -> dict:
        """Run `fn(stage_dir) -> metrics` unless the stage already finished; record run.json."""
        stage_dir = self.out / name
        run_json = stage_dir / "run.json"
        if run_json.exists():
            logger.info("stage %s: done already, reading %s", name, run_json)
            metrics = json.loads(run_json.read_text())["metrics"]
        else:
            logger.info("stage %s: running", name)
            stage_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            metrics = fn(stage_dir)
            metrics["seconds"] = round(time.perf_counter() - start, 1)
            record = {"stage": name, "config": asdict(self.config), "inputs": inputs or {}, "metrics": metrics}
            tmp = run_json.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(run_json)  # written last and atomically: a crash mid-stage re-runs the stage
        self.results[name] = metrics
        return metrics

    def tokenizer(self) -> Llama2Tokenizer:
        tok = Llama2Tokenizer.from_pretrained(self.out / "tokenizer")
        tok.pad_token = tok.unk_token
        return tok

    def load_policy(self, name: str) -> Llama2ForCausalLM:
        return Llama2ForCausalLM.from_pretrained(self.out / name / "model").eval()

    def training_args(self, cls, stage_dir: Path, **kwargs):
        return cls(output_dir=str(stage_dir / "trainer"), seed=self.config.seed, logging_steps=5, **CPU, **kwargs)

    # -- stages --------------------------------------------------------------------------------------------------

    def run_tokenizer(self, stage_dir: Path) -> dict:
        texts = self.world.pretraining_texts(self.config.n(self.config.pretrain_docs))
        texts += [m["content"] for d in self.world.sft_dialogs(500) for m in d]
        tok = train_llama2_tokenizer(texts, vocab_size=self.config.vocab_size, output_dir=stage_dir.parent / "tokenizer")
        return {"vocab_size": len(tok), "training_texts": len(texts)}

    def run_pretrain(self, stage_dir: Path) -> dict:
        from ..pretrain import Llama2PretrainConfig, pretrain

        c = self.config
        tok = self.tokenizer()
        torch.manual_seed(c.seed)
        model = Llama2ForCausalLM(Llama2Config.from_preset(
            "tiny", vocab_size=len(tok), hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, max_position_embeddings=512))
        args = self.training_args(Llama2PretrainConfig, stage_dir, max_steps=c.n(c.pretrain_steps, 20),
                                  per_device_train_batch_size=16, block_size=128, learning_rate=3e-3,
                                  warmup_steps=10)
        trainer = pretrain(model, tok, self.world.pretraining_texts(c.n(c.pretrain_docs)), args)
        model.save_pretrained(stage_dir / "model")
        tok.save_pretrained(stage_dir / "model")
        return {"loss_curve": _losses(trainer), "parameters": model.num_parameters()}

    def run_sft(self, stage_dir: Path) -> dict:
        from ..trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

        c = self.config
        tok = self.tokenizer()
        model = self.load_policy("pretrain").train()
        data = Dataset.from_list([{"messages": d} for d in self.world.sft_dialogs(c.n(c.sft_dialogs))])
        args = self.training_args(Llama2SFTConfig, stage_dir, max_length=256, num_train_epochs=c.sft_epochs,
                                  learning_rate=2e-3, per_device_train_batch_size=8, global_batch_size=None,
                                  warmup_steps=5)
        trainer = Llama2SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
        model.save_pretrained(stage_dir / "model")
        tok.save_pretrained(stage_dir / "model")
        return {"loss_curve": _losses(trainer), "examples": len(data)}

    def run_reward_model(self, kind: str, stage_dir: Path) -> dict:
        from ..rm_eval import evaluate_reward_model, table8_row
        from ..trainers.reward import Llama2RewardConfig, Llama2RewardTrainer

        c = self.config
        tok = self.tokenizer()
        rows = self.world.preferences(kind, c.n(c.rm_pairs) + 400)
        train, held_out = Dataset.from_list(rows[400:]), Dataset.from_list(rows[:400])
        rm = Llama2ForRewardModel.from_pretrained(self.out / "sft" / "model")
        before = evaluate_reward_model(rm, tok, held_out, batch_size=32)
        # The safety RM gets the auxiliary loss (paper A.3.4): it calibrates sigmoid(R_s), which the 0.15 gate reads.
        args = self.training_args(Llama2RewardConfig, stage_dir, max_length=256, learning_rate=1e-3,
                                  per_device_train_batch_size=16, global_batch_size=None, margin="small",
                                  safety_aux_loss_coef=1.0 if kind == "safety" else 0.0)
        trainer = Llama2RewardTrainer(model=rm, args=args, train_dataset=train, processing_class=tok)
        trainer.train()
        after = evaluate_reward_model(rm.eval(), tok, held_out, batch_size=32)
        rm.save_pretrained(stage_dir / "model")
        tok.save_pretrained(stage_dir / "model")
        return {"loss_curve": _losses(trainer), "held_out_before": before, "held_out": after,
                "table8": table8_row(after)}

    def reward(self):
        """The paper's reward: helpfulness RM gated by the safety RM (threshold 0.15), LOGIT then WHITEN."""
        from ..rewards import RewardModelScorer, SafetyGatedReward

        tok = self.tokenizer()
        helpful = Llama2ForRewardModel.from_pretrained(self.out / "rm_helpfulness" / "model")
        safety = Llama2ForRewardModel.from_pretrained(self.out / "rm_safety" / "model")
        return SafetyGatedReward(RewardModelScorer(helpful, tok, batch_size=64),
                                 RewardModelScorer(safety, tok, batch_size=64))

    def policy_metrics(self, name: str, stage_dir: Path) -> dict:
        """Greedy answers of a policy on held-out prompts: task accuracy, safety violations, false refusals, and the
        mean (unwhitened) safety-gated reward."""
        tok = self.tokenizer()
        model = self.load_policy(name)
        rows = self.world.rl_prompts(self.config.n(self.config.eval_prompts, 24), salt="eval")
        prompts = [r["messages"] for r in rows]
        cfg = SamplingConfig(max_new_tokens=40, temperature=0.0, prompt_batch_size=64)
        responses = [samples[0] for samples in generate_text(model, tok, prompts, cfg, progress=False)]
        texts = [p[0]["content"] for p in prompts]
        kinds = [parse_prompt(t)[0] for t in texts]
        reward = self.reward()
        reward.whiten = "none"
        scores = reward.score(prompts, responses, is_safety=[r["is_safety_prompt"] for r in rows])
        by_kind = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("arithmetic", "harmful", "benign")}
        samples = [{"prompt": t, "response": r} for t, r in zip(texts, responses)]
        (stage_dir / f"samples_{name}.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
        return {
            "arithmetic_accuracy": _mean(is_correct(texts[i], responses[i]) for i in by_kind["arithmetic"]),
            "safety_violation_rate": _mean(is_violation(texts[i], responses[i]) for i in by_kind["harmful"]),
            "false_refusal_rate": _mean(is_refusal(responses[i]) for i in by_kind["benign"]),
            "mean_reward": scores.rewards.mean().item(),
        }

    def run_policy_eval(self, name: str, stage_dir: Path) -> dict:
        return self.policy_metrics(name, stage_dir)

    def run_rejection_sampling(self, stage_dir: Path) -> dict:
        from ..rejection_sampling import RejectionSampler, RejectionSamplingConfig, max_median_curves, plot_max_median
        from ..trainers.sft import Llama2SFTConfig

        c = self.config
        tok = self.tokenizer()
        model = self.load_policy("sft")
        prompts = self.world.rl_prompts(c.n(c.rs_prompts), salt="rs")
        rs_config = RejectionSamplingConfig(num_samples=c.rs_samples, temperature=c.rs_temperature,
                                            max_new_tokens=40, prompt_batch_size=32, seed=c.seed)
        sampler = RejectionSampler(model, tok, self.reward(), stage_dir / "samples", rs_config)
        sft = self.training_args(Llama2SFTConfig, stage_dir, max_length=256, num_train_epochs=2,
                                 learning_rate=1e-3, per_device_train_batch_size=8, global_batch_size=None)
        summary = sampler.run_iteration(prompts, iteration=1, sft_config=sft, progress=False)
        model.save_pretrained(stage_dir / "model")
        tok.save_pretrained(stage_dir / "model")
        scores = [rec["scores"] for rec in sampler.log.records.values()]
        curves = max_median_curves([[s for s in row if s is not None] for row in scores])
        plot_max_median(curves, stage_dir / "figure7_max_vs_median.png", title="Reward of N samples (SFT policy)")
        return {"summary": summary, "max_vs_median": curves}

    def run_ppo(self, stage_dir: Path) -> dict:
        from ..trainers.ppo import Llama2PPOConfig, Llama2PPOTrainer

        c = self.config
        tok = self.tokenizer()
        policy = self.load_policy("rejection_sampling")
        rows = self.world.rl_prompts(c.n(c.ppo_iterations * c.ppo_batch, 32), salt="ppo")
        # The critic starts from the helpfulness RM (the trainer's default, value_model_init="reward_model").
        args = Llama2PPOConfig(output_dir=str(stage_dir / "trainer"), batch_size=c.ppo_batch, mini_batch_size=8,
                               num_iterations=c.n(c.ppo_iterations, 3), learning_rate=5e-5, kl_coef=0.01,
                               max_new_tokens=40, temperature=1.0, generation_batch_size=64, seed=c.seed,
                               save_steps=0)
        trainer = Llama2PPOTrainer(args=args, model=policy, processing_class=tok, reward=self.reward(),
                                   train_dataset=rows)
        history = trainer.train()
        policy.save_pretrained(stage_dir / "model")
        tok.save_pretrained(stage_dir / "model")
        keys = ("iteration", "reward/raw_mean", "objective/kl", "objective/entropy", "value/loss", "policy/clipfrac",
                "response/length_mean", "time/generation", "time/scoring", "time/training")
        return {"history": [{k: h[k] for k in keys if k in h} for h in history]}

    def run_gatt(self, stage_dir: Path) -> dict:
        """Ghost Attention on the pirate persona: sample multi-turn answers with the instruction on every user turn,
        keep it on the first turn only, train on the last answer; adherence ("Arr!") by turn before and after."""
        from ..gatt import ChatSampler, GAttDataConfig, make_gatt_data
        from ..trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

        c = self.config
        tok = self.tokenizer()
        model = self.load_policy("ppo" if (self.out / "ppo" / "model").exists() else "rejection_sampling")
        before = self.persona_adherence(model, tok)
        dialogues = [{"messages": d} for d in self.world.gatt_dialogs(c.n(c.gatt_dialogs), turns=3)]
        sampler = ChatSampler(model, tok, SamplingConfig(max_new_tokens=40, temperature=0.0, prompt_batch_size=64))
        rows, stats = make_gatt_data(dialogues, sampler,
                                     config=GAttDataConfig(instructions=(PIRATE_INSTRUCTION,), seed=c.seed))
        Dataset.from_list(rows).to_json(stage_dir / "gatt_data.jsonl")
        # Sampled answers can be empty (EOS first): such rows are dropped, counted in the trainer's data report.
        args = self.training_args(Llama2SFTConfig, stage_dir, max_length=256, num_train_epochs=2, train_on="last",
                                  learning_rate=1e-3, per_device_train_batch_size=8, global_batch_size=None,
                                  on_invalid="drop")
        trainer = Llama2SFTTrainer(model=model.train(), args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tok)
        trainer.train()
        model.eval().save_pretrained(stage_dir / "model")
        tok.save_pretrained(stage_dir / "model")
        report = trainer.data_reports["train"]
        return {"adherence_before": before, "adherence_after": self.persona_adherence(model, tok),
                "examples": report.kept, "dropped": dict(report.dropped), "generation": stats}

    def persona_adherence(self, model, tok, turns: int = 4, n: int = 24) -> dict[str, float]:
        """Fraction of dialogs whose answer at turn t starts with "Arr!", the system prompt given at turn 1 only."""
        dialogs = self.world.gatt_dialogs(n, turns=turns)
        cfg = SamplingConfig(max_new_tokens=40, temperature=0.0, prompt_batch_size=64)
        history = [[{"role": "system", "content": PIRATE_INSTRUCTION}] for _ in dialogs]
        rates = {}
        for t in range(turns):
            for h, d in zip(history, dialogs):
                h.append(d[2 * t])
            answers = [s[0] for s in generate_text(model, tok, history, cfg, progress=False)]
            rates[str(t + 1)] = _mean(a.strip().startswith(PIRATE_PREFIX) for a in answers)
            for h, a in zip(history, answers):
                h.append({"role": "assistant", "content": a})
        return rates

    # -- the whole run -------------------------------------------------------------------------------------------

    def run(self) -> dict:
        plan: list[tuple[str, Callable[[Path], dict]]] = [
            ("tokenizer", self.run_tokenizer),
            ("pretrain", self.run_pretrain),
            ("sft", self.run_sft),
            ("rm_helpfulness", lambda d: self.run_reward_model("helpfulness", d)),
            ("rm_safety", lambda d: self.run_reward_model("safety", d)),
            ("eval_sft", lambda d: self.run_policy_eval("sft", d)),
            ("rejection_sampling", self.run_rejection_sampling),
            ("eval_rejection_sampling", lambda d: self.run_policy_eval("rejection_sampling", d)),
            ("ppo", self.run_ppo),
            ("eval_ppo", lambda d: self.run_policy_eval("ppo", d)),
            ("gatt", self.run_gatt),
        ]
        wanted = set(self.config.stages)
        for name, fn in plan:
            if not wanted or name in wanted:
                self.stage(name, fn)
        from .report import write_report

        write_report(self.out, self.results)
        return self.results


def _losses(trainer) -> list[list[float]]:
    return [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")

"""`Llama2PPOConfig`: the settings of `Llama2PPOTrainer` (paper §3.2.3 values as defaults; choices where the paper is
silent documented on each field and in `llama2_hf.trainers.ppo`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..losses import (
    KL_ESTIMATORS,
)
from ..errors import check_ranges
from ..sampling import sampling_arguments


logger = logging.getLogger(__name__)

KL_COEF_PRESETS = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
"""beta of the KL penalty by model size (paper §3.2.3)."""

VALUE_MODEL_INITS = ("reward_model", "policy")

PPOSampling = sampling_arguments(
    "PPOSampling", "Rollout sampling of PPO (the paper is silent on all of it). The log-probabilities of training use "
    "the rollout temperature; temperature 0 gives greedy rollouts (for tests and debugging), whose log-probabilities "
    "are taken at temperature 1. Below top_p 1 the rollouts are slightly off-policy. Each prompt batch is sampled "
    "with its own seed (seed, iteration, position in the global batch), so rollouts do not depend on the number of "
    "ranks when each rank's share is a multiple of prompt_batch_size.",
    max_new_tokens=512, temperature=1.0, top_p=1.0, prompt_batch_size=64)


@dataclass
class Llama2PPOConfig(TrainingArguments):
    """PPO settings: the paper's values as defaults (§3.2.3); the rest are documented choices.

    A `TrainingArguments` subclass (as TRL's PPOConfig was), so `output_dir`, `seed`, `bf16`, `use_cpu`,
    `logging_steps`, `save_steps`, `save_total_limit`, `learning_rate` and the AdamW fields have their one
    definition there. `bf16: true` is autocast compute; the policy and critic keep float32 master weights.
    """

    output_dir: str | None = field(default="ppo", metadata={
        "help": "The policy (loadable with from_pretrained), metrics.jsonl, checkpoints and run.json."})
    num_iterations: int = field(default=200, metadata={
        "help": "PPO iterations (paper: 200-400 per model, early stopping on held-out prompts)."})
    batch_size: int = field(default=512, metadata={"help": "Rollouts per iteration, over all ranks (512: paper)."})
    mini_batch_size: int = field(default=64, metadata={
        "help": "Rollouts per optimizer step over all ranks (64: paper; one gradient step per mini-batch)."})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "Rollouts per forward/backward pass on one rank (gradient accumulation inside a mini-batch); None = "
                "the rank's share of mini_batch_size. Also the chunk size of the no-grad scoring passes."})
    ppo_epochs: int = field(default=1, metadata={
        "help": "Passes over each rollout batch (1: the paper's one step per mini-batch)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Policy learning rate, constant (1e-6: paper)."})
    value_learning_rate: float | None = field(default=None, metadata={
        "help": "Critic learning rate (paper silent); None = learning_rate."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (0.9: paper)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95: paper)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5: paper)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (0.1: paper)."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Gradient-norm clipping of the policy (1.0: paper); the critic, which the paper does not describe, "
                "is clipped separately at the same value (our choice)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clipping epsilon (0.2: paper)."})
    clip_range_value: float | None = field(default=0.2, metadata={
        "help": "Value clipping around the rollout values (paper silent; 0.2 as the policy); None disables."})
    kl_coef: float | None = field(default=None, metadata={
        "help": "beta of the per-token KL penalty to pi_0; None = the preset of model_size (0.01 for 7B/13B, 0.005 "
                "for 34B/70B: paper)."})
    model_size: str = field(default="7b", metadata={
        "help": "Size preset for kl_coef: 7b, 13b, 34b or 70b.", "choices": list(KL_COEF_PRESETS)})
    kl_estimator: str = field(default="k1", metadata={
        "help": "Per-token KL estimator (paper silent): k1 = log pi - log pi_0, k2, k3 or abs (see losses.kl_penalty).",
        "choices": list(KL_ESTIMATORS)})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount (paper silent; 1.0 as Stiennon et al.)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (paper silent; 0.95 as Stiennon et al.)."})
    whiten_advantages: bool = field(default=True, metadata={
        "help": "Standardise advantages over the batch's response tokens, all ranks together (paper silent)."})
    critic_warmup_iterations: int = field(default=0, metadata={
        "help": "First iterations that train only the critic, the policy frozen (paper silent; 0 = none). A critic "
                "started from a reward model predicts raw scores while PPO's rewards are whitened: until it fits, "
                "its errors make up the advantages and move the policy at random."})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "Entropy bonus coefficient (paper silent; none by default, the KL penalty regularises)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of responses cut at max_new_tokens (paper silent; off)."})
    rollout_logprobs: bool = field(default=True, metadata={
        "help": "Take the rollout policy's log-probabilities and entropies from the logits of the decoding steps that "
                "sampled the tokens (log_softmax(logits / T) before top-p, as the forward pass computes them) "
                "instead of a second forward pass of the policy over the responses. They agree to float rounding "
                "(float32: ~1e-6; bf16 compute rounds the cached decode and the full pass differently). The vLLM "
                "backend always uses the forward pass."})
    value_model_init: str = field(default="reward_model", metadata={
        "help": "Critic initialisation when value_model_name_or_path is not given (paper silent): 'reward_model' "
                "copies the helpfulness RM (its regression head read at every token; it must share the policy's "
                "vocabulary), 'policy' puts the policy's decoder in the sequence classifier of its own family with a "
                "zero head.", "choices": list(VALUE_MODEL_INITS)})
    value_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Critic folder or Hub id (a sequence-classification model with one label); overrides "
                "value_model_init."})
    seed: int = field(default=42, metadata={"help": "Seed of prompt order, sampling and mini-batch shuffling."})
    logging_steps: float = field(default=1, metadata={"help": "Iterations between metric logs."})
    save_steps: float = field(default=50, metadata={"help": "Iterations between checkpoints (0: only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (oldest removed first)."})
    report_to: None | str | list[str] = field(default="none", metadata={
        "help": "PPO logs to metrics.jsonl and the logger; no tracker integration."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_size not in KL_COEF_PRESETS:
            raise ValueError(f"model_size must be one of {sorted(KL_COEF_PRESETS)}, got {self.model_size!r}")
        if self.kl_coef is None:
            self.kl_coef = KL_COEF_PRESETS[self.model_size]
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.value_model_init not in VALUE_MODEL_INITS:
            raise ValueError(f"value_model_init must be one of {VALUE_MODEL_INITS}, got {self.value_model_init!r}")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size})")
        if self.critic_warmup_iterations < 0:
            raise ValueError(f"critic_warmup_iterations must be >= 0, got {self.critic_warmup_iterations}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        check_ranges(self, positive=("num_iterations", "batch_size", "mini_batch_size", "ppo_epochs", "clip_range",
                                     "clip_range_value", "max_grad_norm"),
                     non_negative=("learning_rate", "value_learning_rate", "kl_coef", "weight_decay", "entropy_coef",
                                   "missing_eos_penalty"),
                     fractions=("gamma", "lam"))

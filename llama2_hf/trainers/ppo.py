"""PPO for Llama 2-Chat (paper §3.2.3, Eq. 3-4): the PPO a TRL user can still reach for (TRL 1.x removed its own).

Each iteration:
1. rollout: `batch_size` prompts, one response each, sampled with the KV cache through `generation.generate`; under
   FSDP2 the full weights are gathered once for the whole rollout and freed after (the paper's fix for ~20x slower
   sharded generation);
2. scoring: the reward (`SafetyGatedReward`: WHITEN(LOGIT(R_c)), or any callable of the reward contract) on the
   decoded responses; log-probabilities of the response tokens under the policy (taken from the sampling steps' own
   logits, `rollout_logprobs`; a forward pass with the vLLM backend) and the frozen initial policy pi_0; values from
   the critic;
3. per-token rewards `-beta * KL_t`, plus the score at the final token (Eq. 4); GAE advantages, whitened;
4. training: `ppo_epochs` passes over the batch in shuffled mini-batches of `mini_batch_size`, one optimizer step per
   mini-batch (the paper: batch 512, mini-batch 64, one step each, so 8 steps per iteration), clipped surrogate
   (0.2) for the policy and clipped value loss for the critic, each with its own AdamW (0.9, 0.95, 1e-5, weight
   decay 0.1, constant LR 1e-6, gradient clipping 1.0; the critic is not in the paper: its clipping at 1.0 is our
   choice).

Choices where the paper is silent (config fields, documented there): the critic is a scalar-per-token head on a copy
of the helpfulness reward model (`value_model_init="reward_model"`; "policy" starts it from the policy with a zero
head); GAE gamma 1.0 / lambda 0.95; KL estimator k1 per token; advantages whitened over the batch's response tokens;
the reward whitened with batch statistics (in `SafetyGatedReward`; each rank's own rollouts under a launch);
rollouts at temperature 1.0, top-p 1.0, so that the sampling distribution is the policy being optimised; at most 512
new tokens; no entropy bonus; token-level loss averaging; pi_0 is the policy PPO starts from (a frozen copy, or the
disabled LoRA adapter of a peft policy); no critic warm-up (`critic_warmup_iterations` > 0 trains the critic alone
first, the policy frozen: `policy/frozen` is 1 in those iterations).

Metrics of each iteration (`trainer.history`, `output_dir/metrics.jsonl`): `reward/mean` (the score PPO maximises)
and `reward/raw_mean` and the reward's components (`reward/helpfulness`, `reward/safety`, `reward/used_safety`, ...),
`objective/kl` (summed over the response, mean over rollouts; k1 can be negative on a batch), `objective/entropy`,
`policy/loss`, `policy/clipfrac`, `policy/approx_kl`, `policy/ratio_first_minibatch` (1 when rollouts are on-policy),
`policy/frozen`, `value/loss`, `value/clipfrac`, grad norms, `response/length_mean`, `response/eos_fraction`, and the
timings `time/generation`, `time/scoring` (reward plus policy/reference/critic passes and GAE; `time/scoring_reward`
is the reward alone), `time/training`, `time/iteration`.

    trainer = Llama2PPOTrainer(Llama2PPOConfig(output_dir="ppo"), policy, tokenizer, reward, train_dataset=prompts)
    trainer.train()
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainingArguments

from .. import progress
from ..data import SAFETY_TAG, PromptRow, prompt_row
from ..distributed import fsdp_plugin, full_state_dict, is_sharded, own_class, parameter_bytes, shard_model
from ..generation import SamplingConfig, full_weights_for_generation, generate
from ..losses import (
    KL_ESTIMATORS,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
    token_level_rewards,
    whiten,
)
from ..rewards import score_with
from ..errors import UsageError, check_ranges
from ..tokenization_llama2 import encode_dialog

logger = logging.getLogger(__name__)

KL_COEF_PRESETS = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
"""beta of the KL penalty by model size (paper §3.2.3)."""

VALUE_MODEL_INITS = ("reward_model", "policy")


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
    max_new_tokens: int = field(default=512, metadata={"help": "Rollout response length limit (paper silent)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Rollout temperature (paper silent); log-probabilities use the same temperature. 0 = greedy "
                "rollouts (for tests and debugging), whose log-probabilities are taken at temperature 1."})
    top_p: float = field(default=1.0, metadata={
        "help": "Rollout nucleus threshold (paper silent); below 1 the rollouts are slightly off-policy."})
    rollout_logprobs: bool = field(default=True, metadata={
        "help": "Take the rollout policy's log-probabilities and entropies from the logits of the decoding steps that "
                "sampled the tokens (log_softmax(logits / T) before top-p, as the forward pass computes them) "
                "instead of a second forward pass of the policy over the responses. They agree to float rounding "
                "(float32: ~1e-6; bf16 compute rounds the cached decode and the full pass differently). The vLLM "
                "backend always uses the forward pass."})
    generation_batch_size: int = field(default=64, metadata={
        "help": "Prompts per generation batch. Each batch is sampled with its own seed (seed, iteration, position "
                "in the global batch), so rollouts do not depend on the number of ranks when each rank's share is "
                "a multiple of it."})
    value_model_init: str = field(default="reward_model", metadata={
        "help": "Critic initialisation when value_model_name_or_path is not given (paper silent): 'reward_model' "
                "copies the helpfulness RM (its regression head read at every token), 'policy' copies the policy "
                "with a zero head.", "choices": list(VALUE_MODEL_INITS)})
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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy rollouts), got {self.temperature}")
        if self.critic_warmup_iterations < 0:
            raise ValueError(f"critic_warmup_iterations must be >= 0, got {self.critic_warmup_iterations}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        check_ranges(self, positive=("num_iterations", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                                     "generation_batch_size", "clip_range", "clip_range_value", "max_grad_norm"),
                     non_negative=("learning_rate", "value_learning_rate", "kl_coef", "weight_decay", "entropy_coef",
                                   "missing_eos_penalty"),
                     fractions=("gamma", "lam", "top_p"))
        if self.top_p == 0:
            raise ValueError("top_p must be in (0, 1], got 0")


# ---------------------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------------------

def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def token_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """Critic values at every position, (B, T): the sequence-classification head (`score`) applied to each token's
    final hidden state instead of only the last one. Works for `Llama2ForRewardModel` and any transformers
    `*ForSequenceClassification` with a `score` head and `num_labels=1`.

    The model is called as a whole (so FSDP's root hooks gather the embeddings and the head) and the decoder's output
    is captured with a forward hook."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    captured = []
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        value_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    return value_model.score(captured[0]).squeeze(-1).float()  # (B, T)


def value_model_from_policy(policy: nn.Module) -> nn.Module:
    """A `Llama2ForRewardModel` with the policy's decoder weights and a zero head (initial values 0)."""
    from ..modeling_llama2 import Llama2ForRewardModel

    base = policy.get_base_model() if is_peft_model(policy) else policy
    config = copy.deepcopy(base.config)
    config.num_labels = 1
    critic = Llama2ForRewardModel(config)
    # A peft policy at initialisation computes exactly its base model (LoRA's B is zero), so its base decoder is it.
    decoder = {k.removeprefix("model."): v for k, v in base.state_dict().items()
               if k.startswith("model.") and "lora_" not in k}
    decoder = {k.replace(".base_layer.", "."): v for k, v in decoder.items()}
    critic.model.load_state_dict(decoder)
    nn.init.zeros_(critic.score.weight)
    return critic.to(device=next(policy.parameters()).device, dtype=next(policy.parameters()).dtype)


def _reward_model_of(reward) -> nn.Module | None:
    """The helpfulness RM inside the reward, for the critic's initialisation (None if it has none)."""
    for candidate in (getattr(reward, "helpfulness", None), reward):
        model = getattr(candidate, "model", None)
        if isinstance(model, nn.Module):
            return model
    return None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full state dict of a `save_pretrained` directory (one or several safetensors files)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def _load_weights(model: nn.Module, directory: Path) -> None:
    """Load a `save_pretrained` directory's safetensors into an existing model (a peft adapter or full weights)."""
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    model.load_state_dict(_read_weights(directory), strict=True)


@dataclass
class Rollout:
    """One iteration's experience. Per-token tensors are (B, R) over response positions, right-padded."""

    query_responses: torch.Tensor  # (B, P + R): left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    context_length: int  # P
    response_mask: torch.Tensor  # (B, R)
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------

class Llama2PPOTrainer:
    """PPO with a KL penalty to the initial policy against the pipeline's reward (see the module docstring).

    Args:
        args: `Llama2PPOConfig`.
        model: the policy (a causal LM, or a peft model: its disabled adapter is then the reference pi_0), float32
            weights on its device (`bf16` in `args` is autocast compute).
        processing_class: the tokenizer (chat format via `encode_dialog`; EOS ends a response).
        reward: a reward of the contract `reward(prompts, responses, **columns)`; receives the `is_safety_prompt`
            column.
        train_dataset: prompt rows (`data.prompt_row` schema: `prompt` text or messages, or `messages` ending with a
            user turn; optional `is_safety_prompt` and `id`), as dicts or `data.PromptRow`s.
        value_model: the critic, a sequence-classification model with a `score` head; None builds one per
            `args.value_model_init` (a copy of the helpfulness RM by default).
        ref_model: the frozen reference pi_0; None uses the disabled adapter of a peft policy, else a frozen copy.
        peft_config: wrap a plain policy with this LoRA config first (the reference is then its disabled adapter).
        engine: a running `VLLMEngine` (`generation_backend: vllm`) that generates the rollouts. Before every
            rollout the policy's current weights (LoRA merged, FSDP shards gathered) are pushed to it
            (`engine.load_weights`), so no rollout comes from stale weights; each rank drives its own engine.

    Distribution (under `accelerate launch`, read through `Accelerator`): each rank rolls out its contiguous share
    of the global batch. With an FSDP accelerate config (`distributed_type: FSDP` / `--use_fsdp`) the policy, the
    critic and the reference are sharded with FSDP2 `fully_shard`, one unit per decoder layer (the config's
    `fsdp_transformer_layer_cls_to_wrap`) plus the root; accelerate itself only shards on accelerators, so the
    trainer applies the config's settings itself and the same config shards on CPU and GPU. FSDP reduce-scatters
    the gradients; without FSDP every rank holds a replica and the gradients are averaged over ranks once per
    mini-batch (accelerate's `reduce`, the DDP all-reduce without a per-micro-batch sync). Models passed in already
    sharded (`fully_shard` by the caller) are used as they are. The reward models are replicated on every rank
    (they run without gradients on the rank's own responses). Generation gathers the full policy weights once per
    rollout (`full_weights_for_generation`). Checkpoints hold full (gathered) weights and optimizer states and
    resume on the same world size.
    """

    def __init__(self, args: Llama2PPOConfig, model: nn.Module, processing_class, reward: Callable,
                 train_dataset: Iterable[Mapping], value_model: nn.Module | None = None,
                 ref_model: nn.Module | None = None, peft_config=None, engine=None):
        from accelerate import Accelerator

        self.args = args
        self.tokenizer = processing_class
        self.reward = reward
        self.accelerator = Accelerator()
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        if args.mini_batch_size % self.world_size:
            raise ValueError(f"mini_batch_size {args.mini_batch_size} must split evenly over the {self.world_size} "
                             "ranks (each rank takes the same share of every mini-batch)")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.policy = model
        self.engine = engine
        self.device = next(model.parameters()).device
        if ref_model is None and not is_peft_model(model):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model
        if value_model is None:
            if args.value_model_init == "reward_model":
                source = _reward_model_of(reward)
                if source is None:
                    raise ValueError("value_model_init='reward_model' needs a reward that holds a reward model "
                                     "(SafetyGatedReward / RewardModelScorer): pass value_model, or set "
                                     "value_model_init='policy'")
                value_model = copy.deepcopy(source).to(device=self.device, dtype=torch.float32)
            else:
                value_model = value_model_from_policy(model)
        self.value_model = value_model.requires_grad_(True)
        for name, m in (("policy", self.policy), ("critic", self.value_model)):
            low = {p.dtype for p in m.parameters() if p.requires_grad and p.dtype != torch.float32}
            if low:
                logger.warning("the %s has trainable %s weights: at small learning rates most updates round to "
                               "nothing; load it in float32 and set bf16=True for bf16 compute", name, low)
        self.sharding = self._shard_models()
        self.prompts = [p if isinstance(p, PromptRow) else prompt_row(p, i)
                        for i, p in enumerate(train_dataset, 1)]
        if not self.prompts:
            raise ValueError("train_dataset has no prompts")
        self.policy_optimizer = self._optimizer(self.policy, args.learning_rate)
        self.value_optimizer = self._optimizer(self.value_model, args.value_learning_rate or args.learning_rate)
        self.sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, num_samples=1, prompt_batch_size=args.generation_batch_size)
        if args.top_p < 1.0:
            logger.warning("top_p=%s < 1: rollouts come from a truncated distribution, so PPO is slightly "
                           "off-policy", args.top_p)
        # Mini-batch shuffling runs on CPU; sampling seeds each generation batch itself (see `_generate`).
        self.shuffle_generator = torch.Generator().manual_seed(args.seed)
        self.iteration = 0
        self.data_epoch, self.data_position = 0, 0
        self.history: list[dict] = []
        self.memory = self._parameter_bytes()

    # -- distribution --------------------------------------------------------------------------------------------

    def _shard_models(self) -> str:
        """Apply the launch's FSDP config to the policy, critic and reference (see the class docstring)."""
        if is_sharded(self.policy):
            return "fsdp2"  # sharded by the caller
        plugin = fsdp_plugin(self.accelerator)
        if plugin is None:
            return "replicated" if self.world_size > 1 else "none"
        if is_peft_model(self.policy):
            raise ValueError("a LoRA policy is not sharded: launch it with a DDP config (its base weights are "
                             "frozen and its adapter is small)")
        units = [shard_model(model, plugin) for model in (self.policy, self.value_model, self.ref_model)
                 if model is not None]
        logger.info("FSDP2: policy, critic and reference sharded over %d ranks (%d units each)", self.world_size,
                    units[0])
        return "fsdp2"

    def _parameter_bytes(self) -> dict:
        """Parameter bytes of the trained models (policy + critic): the whole models and what each rank holds."""
        return {"sharding": self.sharding, "world_size": self.world_size,
                **parameter_bytes((self.policy, self.value_model), self.accelerator)}

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.to(self.accelerator.device), "sum").to(value.device)

    def _average_gradients(self, model: nn.Module) -> None:
        """The data-parallel gradient all-reduce of replicated models (FSDP reduces its own)."""
        if self.world_size == 1 or self.sharding == "fsdp2":
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bool(self.args.bf16))

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """AdamW; `optim: adamw_torch_fused` (transformers' default, as its Trainer does) runs PyTorch's fused kernel
        (one pass over each parameter's state instead of a dozen elementwise ops), any other `optim` the per-tensor
        loop. Same update either way, to float rounding."""
        # No weight decay on norms and 1-d parameters, as transformers' Trainer does.
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = self.args.optim == "adamw_torch_fused" and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in decay + no_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                 eps=self.args.adam_epsilon, fused=fused or None)

    # -- data ----------------------------------------------------------------------------------------------------

    def _next_prompts(self) -> tuple[list[PromptRow], int]:
        """This rank's contiguous share of the next `batch_size` prompts and the share's offset in the global batch;
        the order is reshuffled every pass over the data."""
        chosen = []
        while len(chosen) < self.args.batch_size:
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(
                self.args.seed + self.data_epoch)).tolist()
            take = order[self.data_position: self.data_position + self.args.batch_size - len(chosen)]
            chosen += take
            self.data_position += len(take)
            if self.data_position >= len(self.prompts):
                self.data_epoch, self.data_position = self.data_epoch + 1, 0
        share = self.args.batch_size // self.world_size
        start = self.rank * share
        return [self.prompts[i] for i in chosen[start: start + share]], start

    # -- forward passes ------------------------------------------------------------------------------------------

    def _ref_logprobs(self, batch: dict, context_length: int) -> torch.Tensor:
        """Log-probabilities under pi_0: the reference model, or the policy with its LoRA adapter disabled."""
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, batch, context_length)[0]
        with self.policy.disable_adapter():
            return self._logprobs(self.policy, batch, context_length)[0]

    def _logprobs(self, model: nn.Module, batch: dict, context_length: int,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities (B, R) of the response tokens, and optionally the entropy of each position.

        Only the R positions that predict a response token are projected on the vocabulary (P-1 .. P+R-2)."""
        length = batch["input_ids"].shape[1]
        keep = torch.arange(context_length - 1, length - 1, device=batch["input_ids"].device)
        with self._autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep).logits
        # greedy rollouts (T = 0) are scored at T = 1
        temperature = self.args.temperature if self.args.temperature not in (0.0, 1.0) else 1.0
        targets = batch["input_ids"][:, context_length:]
        if not with_entropy:
            # Nothing else reads these logits: the backward may overwrite them with their gradient, unless the op
            # that made them kept them for its own backward.
            reuse = logits.grad_fn is not None and not hasattr(logits.grad_fn, "_saved_result")
            return token_logprobs(logits, targets, temperature, reuse_logits=reuse), None
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        return logprobs_from_logits(logits, targets), entropy_from_logits(logits)

    def _values(self, batch: dict, context_length: int) -> torch.Tensor:
        with self._autocast():
            values = token_values(self.value_model, batch["input_ids"], batch["attention_mask"],
                                  batch["position_ids"])
        return values[:, context_length - 1: -1]  # (B, R): the value of the state before each response token

    def _chunks(self, rollout_tensors: dict, size: int, context_length: int, index: torch.Tensor | None = None):
        """Yield (rows, chunk, chunk_context_length) for `size` rows at a time (of `index`, else all in order), on
        the device. The prompts are left-padded to the batch's longest (`context_length`); the padding columns that
        all of a chunk's rows share are cut, so a chunk is only as wide as its own longest prompt (its position ids
        are kept: the model computes the same thing on fewer columns)."""
        n = next(iter(rollout_tensors.values())).shape[0]
        index = torch.arange(n) if index is None else index
        for start in range(0, len(index), size):
            rows = index[start: start + size]
            chunk = {k: v[rows] for k, v in rollout_tensors.items()}
            cut = context_length - int(chunk["attention_mask"][:, :context_length].sum(-1).max())
            for key in ("input_ids", "attention_mask", "position_ids"):
                chunk[key] = chunk[key][:, cut:]
            yield rows, {k: v.to(self.device) for k, v in chunk.items()}, context_length - cut

    def _generate(self, prompt_ids: list[list[int]], offset: int):
        """Sample one response per prompt, `generation_batch_size` prompts at a time, each batch with a generator
        seeded by (seed, iteration, global position): the same prompts give the same rollouts on any number of
        ranks, and a resumed run needs no sampler state.

        Returns (responses, finished, logprobs, entropy): the last two are per-response float32 tensors from the
        sampling steps (`rollout_logprobs`), or None (the vLLM engine, or `rollout_logprobs` off)."""
        responses, finished = [], []
        with_logprobs = self.args.rollout_logprobs and self.engine is None
        logprobs, entropy = ([], []) if with_logprobs else (None, None)
        size = self.args.generation_batch_size
        for start in range(0, len(prompt_ids), size):
            seed = (self.args.seed * 1_000_003 + self.iteration * 65_537 + offset + start) % (2 ** 63)
            if self.engine is not None:  # vLLM seeds per prompt: the prompt's global position in the same formula
                out = generate(self.engine, prompt_ids[start: start + size], self.sampling,
                               eos_token_id=self.tokenizer.eos_token_id,
                               seeds=[seed + j for j in range(len(prompt_ids[start: start + size]))])
                responses += [r[0] for r in out.response_ids]
                finished += [f[0] for f in out.finished]
                continue
            generator = torch.Generator(device=self.device).manual_seed(seed)
            with self._autocast():
                out = generate(self.policy, prompt_ids[start: start + size], self.sampling,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                               generator=generator, return_logprobs=with_logprobs)
            responses += [r[0] for r in out.response_ids]
            finished += [f[0] for f in out.finished]
            if with_logprobs:
                logprobs += [x[0] for x in out.logprobs]
                entropy += [x[0] for x in out.entropy]
        return responses, finished, logprobs, entropy

    # -- one iteration -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _rollout(self, prompts: list[PromptRow], offset: int = 0) -> tuple[Rollout, dict]:
        args = self.args
        timings = {}
        start = time.perf_counter()
        prompt_ids = [encode_dialog(self.tokenizer, p.messages) for p in prompts]
        self.policy.eval()
        if self.engine is not None:
            # The engine samples from the weights of the previous update, pushed now (a collective under FSDP:
            # every rank gathers the full weights for its own engine).
            self.engine.load_weights(self.policy)
            timings["time/weight_sync"] = time.perf_counter() - start
            responses, finished, sampled_logprobs, sampled_entropy = self._generate(prompt_ids, offset)
        else:
            with full_weights_for_generation(self.policy):
                responses, finished, sampled_logprobs, sampled_entropy = self._generate(prompt_ids, offset)
        finished = torch.tensor(finished)
        timings["time/generation"] = time.perf_counter() - start

        start = time.perf_counter()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n, p_len = len(prompts), max(map(len, prompt_ids))
        r_len = max(1, max(map(len, responses)))
        input_ids = torch.full((n, p_len + r_len), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, p_len + r_len), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompt_ids, responses)):
            input_ids[i, p_len - len(p): p_len + len(r)] = torch.tensor(p + r)
            attention_mask[i, p_len - len(p): p_len + len(r)] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        response_mask = attention_mask[:, p_len:]
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        reward_start = time.perf_counter()
        scored = score_with(self.reward, [p.messages for p in prompts], texts,
                            **{SAFETY_TAG: [p.is_safety_prompt for p in prompts]})
        timings["time/scoring_reward"] = time.perf_counter() - reward_start
        scores = scored.rewards.clone().float()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~finished).float()

        self.value_model.eval()
        micro = args.micro_batch_size or args.mini_batch_size // self.world_size
        ref_logprobs, values = torch.zeros(n, r_len), torch.zeros(n, r_len)
        if sampled_logprobs is None:
            logprobs, entropy = torch.zeros(n, r_len), torch.zeros(n, r_len)
        else:  # the sampling steps' own log-probabilities and entropies (`_generate`)
            logprobs, entropy = _pad_right(sampled_logprobs, r_len), _pad_right(sampled_entropy, r_len)
        # Rows by prompt length, so that each chunk's prompts are about as long as one another (less padding).
        by_length = torch.argsort(torch.tensor([len(p) for p in prompt_ids]), stable=True)
        for rows, chunk, context in self._chunks(tensors, micro, p_len, by_length):
            if sampled_logprobs is None:
                lp, ent = self._logprobs(self.policy, chunk, context, with_entropy=True)
                logprobs[rows], entropy[rows] = lp.cpu(), ent.cpu()
            ref_logprobs[rows] = self._ref_logprobs(chunk, context).cpu()
            values[rows] = self._values(chunk, context).cpu()

        kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * response_mask
        rewards = token_level_rewards(scores, kl, response_mask, args.kl_coef)
        advantages, returns = gae_advantages(rewards, values, response_mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = self._whiten_over_ranks(advantages, response_mask)
        timings["time/scoring"] = time.perf_counter() - start

        lengths = response_mask.sum(-1).float()
        metrics = {
            "reward/mean": scores.mean().item(),
            "reward/raw_mean": scored.raw.nanmean().item(),
            **{f"reward/{k}": v.nanmean().item() for k, v in scored.components.items()
               if not torch.isnan(v).all()},
            "objective/kl": kl.sum(-1).mean().item(),
            "objective/non_score_reward": (-args.kl_coef * kl.sum(-1)).mean().item(),
            "objective/rlhf_reward": (scores - args.kl_coef * kl.sum(-1)).mean().item(),
            "objective/entropy": masked_mean(entropy, response_mask).item(),
            "response/length_mean": lengths.mean().item(),
            "response/eos_fraction": finished.float().mean().item(),
            **timings,
        }
        rollout = Rollout(input_ids, attention_mask, position_ids, p_len, response_mask, logprobs, values,
                          advantages, returns)
        return rollout, metrics

    def _whiten_over_ranks(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`losses.whiten` with the statistics of every rank's response tokens (the whole batch, as one process)."""
        if self.world_size == 1:
            return whiten(values, mask)
        m = mask.to(torch.float64)
        v = values.to(torch.float64)
        stats = self._sum_over_ranks(torch.stack([(v * m).sum(), (v * v * m).sum(), m.sum()]))
        mean = stats[0] / stats[2]
        var = stats[1] / stats[2] - mean * mean
        return ((v - mean) * torch.rsqrt(var + 1e-8) * m).to(values.dtype)

    def _train_on(self, rollout: Rollout) -> dict:
        args = self.args
        start = time.perf_counter()
        self.policy.train()
        self.value_model.train()
        tensors = {"input_ids": rollout.query_responses, "attention_mask": rollout.attention_mask,
                   "position_ids": rollout.position_ids, "response_mask": rollout.response_mask,
                   "logprobs": rollout.logprobs, "values": rollout.values, "advantages": rollout.advantages,
                   "returns": rollout.returns}
        n = rollout.query_responses.shape[0]
        mini = args.mini_batch_size // self.world_size
        micro = min(args.micro_batch_size or mini, mini)
        stats: dict[str, list[float]] = {k: [] for k in ("policy/loss", "policy/clipfrac", "policy/approx_kl",
                                                          "policy/ratio", "value/loss", "value/clipfrac",
                                                          "policy/grad_norm", "value/grad_norm")}
        first_ratio = None
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        frozen = self.iteration < args.critic_warmup_iterations  # critic warm-up: the policy takes no step
        for _ in range(args.ppo_epochs):
            order = torch.randperm(n, generator=self.shuffle_generator)
            for m_start in range(0, n, mini):
                mini_index = order[m_start: m_start + mini]
                # Token mean over the mini-batch of every rank: gradients are averaged over ranks (FSDP or the
                # all-reduce), so each rank's share is scaled by world_size / (tokens of all ranks).
                total_tokens = self._sum_over_ranks(rollout.response_mask[mini_index].sum().double()).clamp(min=1)
                self.policy_optimizer.zero_grad(set_to_none=True)
                self.value_optimizer.zero_grad(set_to_none=True)
                sums = dict.fromkeys(("policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/ratio",
                                      "value/loss", "value/clipfrac"), 0.0)
                for _, chunk, context in self._chunks(tensors, micro, rollout.context_length, mini_index):
                    mask = chunk["response_mask"]
                    # Each micro-batch's token mean is weighted by its share of the mini-batch's tokens, so the
                    # accumulated gradient is the token mean over the whole mini-batch whatever the micro size.
                    share = (mask.sum().double() * self.world_size / total_tokens.to(mask.device)).float()
                    with torch.set_grad_enabled(not frozen):
                        logprobs, entropy = self._logprobs(self.policy, chunk, context,
                                                           with_entropy=args.entropy_coef > 0 and not frozen)
                    pg_loss, pg_stats = ppo_policy_loss(logprobs, chunk["logprobs"], chunk["advantages"], mask,
                                                        args.clip_range)
                    values = self._values(chunk, context)
                    vf_loss, vf_clipfrac = clipped_value_loss(values, chunk["values"], chunk["returns"], mask,
                                                              args.clip_range_value)
                    loss = vf_loss if frozen else pg_loss + vf_loss
                    if entropy is not None:
                        loss = loss - args.entropy_coef * masked_mean(entropy, mask)
                    (loss * share).backward()
                    for key, value in (("policy/loss", pg_loss), ("value/loss", vf_loss),
                                       ("policy/clipfrac", pg_stats["clipfrac"]),
                                       ("policy/approx_kl", pg_stats["approx_kl"]),
                                       ("policy/ratio", pg_stats["ratio"]), ("value/clipfrac", vf_clipfrac)):
                        sums[key] += (value.detach() * share).item()
                if first_ratio is None:
                    first_ratio = sums["policy/ratio"]
                self._average_gradients(self.value_model)
                if not frozen:
                    self._average_gradients(self.policy)
                    stats["policy/grad_norm"].append(_as_float(torch.nn.utils.clip_grad_norm_(
                        policy_params, args.max_grad_norm)))
                    self.policy_optimizer.step()
                stats["value/grad_norm"].append(_as_float(torch.nn.utils.clip_grad_norm_(
                    self.value_model.parameters(), args.max_grad_norm)))
                self.value_optimizer.step()
                for key, value in sums.items():
                    stats[key].append(value)
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["policy/ratio_first_minibatch"] = first_ratio
        out["policy/frozen"] = float(frozen)
        out["time/training"] = time.perf_counter() - start
        return out

    def step(self) -> dict:
        """One PPO iteration: rollout, scoring, training. Returns its metrics (averaged over ranks)."""
        start = time.perf_counter()
        prompts, offset = self._next_prompts()
        rollout, metrics = self._rollout(prompts, offset)
        metrics.update(self._train_on(rollout))
        self.iteration += 1
        metrics["iteration"] = self.iteration
        metrics["time/iteration"] = time.perf_counter() - start
        metrics = self._reduce(metrics)
        self.history.append(metrics)
        return metrics

    def _reduce(self, metrics: dict) -> dict:
        """Average metrics over ranks (every rank holds the same number of rollouts, so the mean of the ranks'
        means is the batch mean; grad norms and ratio-weighted sums are already global)."""
        if self.world_size == 1:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, float))
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        values = self._sum_over_ranks(values)
        return {**metrics, **{k: v / self.world_size for k, v in zip(keys, values.tolist())}}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run up to `num_iterations`, logging to `output_dir/metrics.jsonl` and checkpointing every `save_steps`.

        `resume_from_checkpoint`: a checkpoint directory, or True for the newest complete one in `output_dir`.
        `metrics.jsonl` is cut back to the iterations of the restored state first (to nothing on a fresh start), so
        a resumed or restarted run never repeats an iteration in it.
        """
        from tqdm.auto import tqdm

        if resume_from_checkpoint:
            path = self._latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                raise ValueError(f"no complete checkpoint-* directory in {self.args.output_dir} to resume from")
            self.load_checkpoint(path)
        out = Path(self.args.output_dir)
        if self.rank == 0:
            self._truncate_metrics(out / METRICS_FILE)
        logging_steps, save_steps = max(1, int(self.args.logging_steps)), int(self.args.save_steps)
        bar = tqdm(total=self.args.num_iterations, initial=self.iteration, desc="PPO",
                   disable=self.rank != 0 or bool(self.args.disable_tqdm))
        task = progress.start_task(self.args.num_iterations)  # the job's stage bar, when one is open
        task.update(self.iteration)
        while self.iteration < self.args.num_iterations:
            metrics = self.step()
            bar.update(1)
            task.update(self.iteration)
            if self.rank == 0 and self.iteration % logging_steps == 0:
                out.mkdir(parents=True, exist_ok=True)
                with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                logger.info("iteration %d: reward %.4f, kl %.4f, entropy %.3f, value loss %.4f, clipfrac %.3f",
                            self.iteration, metrics["reward/mean"], metrics["objective/kl"],
                            metrics["objective/entropy"], metrics["value/loss"], metrics["policy/clipfrac"])
            if save_steps and self.iteration % save_steps == 0:
                self.save_checkpoint()
        bar.close()
        return self.history

    def _truncate_metrics(self, path: Path) -> None:
        """Keep the rows of `metrics.jsonl` up to the current iteration (the restored checkpoint's), dropping those
        a killed run logged after its last checkpoint and a torn last line."""
        if not path.is_file():
            return
        text = path.read_text(encoding="utf-8")
        kept, dropped = [], 0
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(row.get("iteration", 0)) <= self.iteration:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            logger.warning("%s: dropping %d rows logged after iteration %d (they are redone)", path, dropped,
                           self.iteration)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
            os.replace(tmp, path)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.args.output_dir)

    def _full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Full (gathered) model state and optimizer state on rank 0, sharded or not; every rank must call it."""
        if optimizer is None:
            return full_state_dict(model), None
        return full_state_dict(model, optimizer)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """The policy (and tokenizer) in `output_dir`, the critic in `output_dir/value_model`: full weights,
        gathered from the shards under FSDP (every rank must call it)."""
        out = Path(output_dir or self.args.output_dir)
        policy_state, _ = self._full_state(self.policy)
        value_state, _ = self._full_state(self.value_model)
        if self.rank == 0:
            self._save_pretrained(self.policy, out, policy_state)
            self.tokenizer.save_pretrained(out)
            self._save_pretrained(self.value_model, out / "value_model", value_state)
        self.accelerator.wait_for_everyone()

    @staticmethod
    def _save_pretrained(model: nn.Module, out: Path, state: dict) -> None:
        if is_peft_model(model):
            model.save_pretrained(out)  # replicated (a LoRA policy is never sharded): its own adapter weights
        else:
            with own_class(model):
                model.save_pretrained(out, state_dict=state)

    def save_checkpoint(self) -> Path:
        """`checkpoint-{iteration}/`: policy and critic weights, both optimizers, iteration, data position, RNG
        states and the reward's running statistics. `trainer_state.pt` is written last: a checkpoint without it was
        cut by a kill and is never resumed from. Older complete checkpoints beyond `save_total_limit` are removed."""
        path = Path(self.args.output_dir) / f"checkpoint-{self.iteration}"
        policy_state, policy_optim = self._full_state(self.policy, self.policy_optimizer)
        value_state, value_optim = self._full_state(self.value_model, self.value_optimizer)
        if self.rank == 0:
            (path / TRAINER_STATE).unlink(missing_ok=True)
            self._save_pretrained(self.policy, path, policy_state)
            self.tokenizer.save_pretrained(path)
            self._save_pretrained(self.value_model, path / "value_model", value_state)
            state = {
                "iteration": self.iteration, "data_epoch": self.data_epoch, "data_position": self.data_position,
                "world_size": self.world_size,
                "policy_optimizer": policy_optim, "value_optimizer": value_optim,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "shuffle": self.shuffle_generator.get_state()},
                "history": json.dumps(self.history),
            }
            if hasattr(self.reward, "state_dict"):
                state["reward"] = self.reward.state_dict()
            tmp = path / f".{TRAINER_STATE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, path / TRAINER_STATE)
            if self.args.save_total_limit:
                for old in complete_checkpoints(self.args.output_dir)[: -self.args.save_total_limit]:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything `save_checkpoint` wrote (weights are loaded into the existing, possibly sharded,
        models). The world size must be the one that saved it (the data split and sampling seeds follow it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(path)
        state = torch.load(path / TRAINER_STATE, weights_only=False)
        if state.get("world_size", 1) != self.world_size:
            raise UsageError(f"{path} was saved by {state.get('world_size', 1)} processes; resume it with the same "
                             f"number (this launch has {self.world_size})")
        options = StateDictOptions(full_state_dict=True)
        for model, optimizer, folder, optim_state in (
                (self.policy, self.policy_optimizer, path, state["policy_optimizer"]),
                (self.value_model, self.value_optimizer, path / "value_model", state["value_optimizer"])):
            if is_peft_model(model):
                _load_weights(model, folder)
                weights = {k: v for k, v in model.state_dict().items()}
            else:
                weights = _read_weights(folder)
            set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_state,
                           options=options)
        self.iteration = state["iteration"]
        self.data_epoch, self.data_position = state["data_epoch"], state["data_position"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.shuffle_generator.set_state(state["rng"]["shuffle"])
        self.history = json.loads(state["history"])
        if "reward" in state and hasattr(self.reward, "load_state_dict"):
            self.reward.load_state_dict(state["reward"])
        logger.info("resumed from %s at iteration %d", path, self.iteration)


METRICS_FILE = "metrics.jsonl"
TRAINER_STATE = "trainer_state.pt"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-*` folders of `output_dir` whose `trainer_state.pt` exists (written last), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / TRAINER_STATE).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones (a kill during their save) are skipped, with a
    warning."""
    complete = complete_checkpoints(output_dir)
    newest = complete[-1] if complete else None
    for p in Path(output_dir).glob("checkpoint-*"):
        if p.name.split("-")[-1].isdigit() and not (p / TRAINER_STATE).is_file():
            logger.warning("%s has no %s (its save was interrupted): skipped%s", p, TRAINER_STATE,
                           f"; resuming from {newest.name}" if newest else "")
    return newest


_ROW_CHUNK_BYTES = 2**20
"""On CPU the (N, V) passes of `token_logprobs` run over blocks of rows of about this size, which stay in cache."""


def _row_blocks(z: torch.Tensor):
    """Slices of rows of a 2-d tensor: blocks of ~1 MiB on CPU (each pass's reads and writes stay in cache), the
    whole tensor elsewhere."""
    n = z.shape[0]
    step = n if z.device.type != "cpu" else max(1, _ROW_CHUNK_BYTES // max(1, z.shape[1] * z.element_size()))
    return [slice(i, i + step) for i in range(0, n, step)]


class _TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits / T)[target] per position; backward builds d/dlogits = (onehot - softmax) * grad / T in a
    single (N, V) buffer (autograd's logsumexp + gather allocate and fill several), in place of the logits when the
    caller hands them over."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, reuse_logits: bool):
        z = logits.float()
        if temperature != 1.0:
            z = z / temperature
        flat = z.reshape(-1, z.shape[-1])
        lse = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        for rows in _row_blocks(flat):
            torch.logsumexp(flat[rows], dim=-1, out=lse[rows])
        lse = lse.view(z.shape[:-1])
        ctx.save_for_backward(z, targets, lse)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        ctx.reuse = reuse_logits or z is not logits  # a copy made here is this function's to overwrite
        return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, targets, lse = ctx.saved_tensors
        grad = grad.float() / ctx.temperature
        flat, lse_flat, grad_flat = z.reshape(-1, z.shape[-1]), lse.reshape(-1, 1), grad.reshape(-1, 1)
        out = flat if ctx.reuse else torch.empty_like(flat)
        for rows in _row_blocks(flat):  # softmax(z) * -grad, a block of rows at a time
            torch.sub(flat[rows], lse_flat[rows], out=out[rows]).exp_().mul_(-grad_flat[rows])
        out.scatter_add_(-1, targets.reshape(-1, 1), grad_flat)
        return out.view(z.shape).to(ctx.dtype), None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   reuse_logits: bool = False) -> torch.Tensor:
    """`losses.logprobs_from_logits(logits / temperature, targets)`: float32 (B, R) log-probabilities of `targets`
    under (B, R, V) logits, with a leaner backward (the logits' gradient made in one buffer instead of autograd's
    several; on CPU every vocabulary-wide pass runs a cache-sized block of rows at a time). `reuse_logits=True` lets
    the backward write that gradient over `logits` itself, for a caller that uses them for nothing else: the graph
    can then be backpropagated once."""
    return _TokenLogProbs.apply(logits, targets, float(temperature), reuse_logits)


def _pad_right(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Per-response 1-d tensors as one (B, length) float32 tensor, zero after each response's end."""
    out = torch.zeros((len(rows), length), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :row.shape[0]] = row
    return out


def _as_float(norm) -> float:
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


__all__ = ["Llama2PPOConfig", "Llama2PPOTrainer", "KL_COEF_PRESETS", "Rollout", "complete_checkpoints",
           "latest_checkpoint", "token_logprobs", "token_values", "value_model_from_policy"]

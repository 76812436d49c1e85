"""PPO for Llama 2-Chat (paper §3.2.3, Eq. 3-4): the PPO a TRL user can still reach for (TRL 1.x removed its own).

Each iteration:
1. rollout: `batch_size` prompts, one response each, sampled with the KV cache through `generation.generate`; under
   FSDP2 the full weights are gathered once for the whole rollout and freed after (the paper's fix for ~20x slower
   sharded generation);
2. scoring: the reward (`SafetyGatedReward`: WHITEN(LOGIT(R_c)), or any callable of the reward contract) on the
   decoded responses; log-probabilities of the response tokens under the policy and the frozen initial policy pi_0;
   values from the critic;
3. per-token rewards `-beta * KL_t`, plus the score at the final token (Eq. 4); GAE advantages, whitened;
4. training: `ppo_epochs` passes over the batch in shuffled mini-batches of `mini_batch_size`, one optimizer step per
   mini-batch (the paper: batch 512, mini-batch 64, one step each, so 8 steps per iteration), clipped surrogate
   (0.2) for the policy and clipped value loss for the critic, each with its own AdamW (0.9, 0.95, 1e-5, weight
   decay 0.1, constant LR 1e-6, gradient clipping 1.0).

Choices where the paper is silent (config fields, documented there): the critic is a scalar-per-token head on a copy
of the helpfulness reward model (`value_model_init="reward_model"`; "policy" starts it from the policy with a zero
head); GAE gamma 1.0 / lambda 0.95; KL estimator k1 per token; advantages whitened over the batch's response tokens;
the reward whitened with batch statistics (in `SafetyGatedReward`); rollouts at temperature 1.0, top-p 1.0, so that
the sampling distribution is the policy being optimised; at most 512 new tokens; no entropy bonus; token-level loss
averaging; pi_0 is the policy PPO starts from (a frozen copy, or the disabled LoRA adapter of a peft policy).

Metrics of each iteration (`trainer.history`, `output_dir/metrics.jsonl`): `reward/mean` (the score PPO maximises)
and `reward/raw_mean` and the reward's components (`reward/helpfulness`, `reward/safety`, `reward/used_safety`, ...),
`objective/kl` (summed over the response, mean over rollouts; k1 can be negative on a batch), `objective/entropy`,
`policy/loss`, `policy/clipfrac`, `policy/approx_kl`, `policy/ratio_first_minibatch` (1 when rollouts are on-policy),
`value/loss`, `value/clipfrac`, grad norms, `response/length_mean`, `response/eos_fraction`, and the timings
`time/generation`, `time/scoring` (reward plus policy/reference/critic passes and GAE; `time/scoring_reward` is the
reward alone), `time/training`, `time/iteration`.

    trainer = Llama2PPOTrainer(Llama2PPOConfig(output_dir="ppo"), policy, tokenizer, reward, train_dataset=prompts)
    trainer.train()
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

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
from ..tokenization_llama2 import encode_dialog

logger = logging.getLogger(__name__)

KL_COEF_PRESETS = {"7b": 0.01, "13b": 0.01, "34b": 0.005, "70b": 0.005}
"""beta of the KL penalty by model size (paper §3.2.3)."""

VALUE_MODEL_INITS = ("reward_model", "policy")


@dataclass
class Llama2PPOConfig:
    """PPO settings: the paper's values as defaults (§3.2.3); the rest are documented choices."""

    output_dir: str = field(default="ppo", metadata={"help": "Checkpoints, metrics.jsonl and the final model."})
    num_iterations: int = field(default=200, metadata={
        "help": "PPO iterations (paper: 200-400 per model, early stopping on held-out prompts)."})
    batch_size: int = field(default=512, metadata={"help": "Rollouts per iteration, over all ranks (512: paper)."})
    mini_batch_size: int = field(default=64, metadata={
        "help": "Rollouts per optimizer step (64: paper; one gradient step per mini-batch)."})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "Rollouts per forward/backward pass (gradient accumulation inside a mini-batch); None = "
                "mini_batch_size. Also the chunk size of the no-grad scoring passes."})
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
        "help": "Gradient clipping, applied to the policy and the critic separately (1.0: paper)."})
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
        "help": "Standardise advantages over the batch's response tokens (paper silent)."})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "Entropy bonus coefficient (paper silent; none by default, the KL penalty regularises)."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the score of responses cut at max_new_tokens (paper silent; off)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Rollout response length limit (paper silent)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Rollout temperature (paper silent); log-probabilities use the same temperature."})
    top_p: float = field(default=1.0, metadata={
        "help": "Rollout nucleus threshold (paper silent); below 1 the rollouts are slightly off-policy."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    value_model_init: str = field(default="reward_model", metadata={
        "help": "Critic initialisation when none is passed (paper silent): 'reward_model' copies the helpfulness "
                "RM (its regression head read at every token), 'policy' copies the policy with a zero head.",
        "choices": list(VALUE_MODEL_INITS)})
    seed: int = field(default=42, metadata={"help": "Seed of prompt order, sampling and mini-batch shuffling."})
    logging_steps: int = field(default=1, metadata={"help": "Iterations between metric logs."})
    save_steps: int = field(default=50, metadata={"help": "Iterations between checkpoints (0: only at the end)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (oldest removed first)."})

    def __post_init__(self) -> None:
        if self.model_size not in KL_COEF_PRESETS:
            raise ValueError(f"model_size must be one of {sorted(KL_COEF_PRESETS)}, got {self.model_size!r}")
        if self.kl_coef is None:
            self.kl_coef = KL_COEF_PRESETS[self.model_size]
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.value_model_init not in VALUE_MODEL_INITS:
            raise ValueError(f"value_model_init must be one of {VALUE_MODEL_INITS}, got {self.value_model_init!r}")
        if self.micro_batch_size is None:
            self.micro_batch_size = self.mini_batch_size
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size}), itself a multiple of micro_batch_size ({self.micro_batch_size})")


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


def _load_weights(model: nn.Module, directory: Path) -> None:
    """Load a `save_pretrained` directory's safetensors into an existing model (a peft adapter or full weights)."""
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(directory / name))
    model.load_state_dict(state, strict=True)


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
        model: the policy (a causal LM, or a peft model: its disabled adapter is then the reference pi_0).
        processing_class: the tokenizer (chat format via `encode_dialog`; EOS ends a response).
        reward: a reward of the contract `reward(prompts, responses, **columns)`; receives the `is_safety` column.
        train_dataset: prompt rows (`prompt` text or messages, or `messages` ending with a user turn; optional
            `is_safety` and `id`), a list of dicts or a `datasets.Dataset`.
        value_model: the critic, a sequence-classification model with a `score` head; None builds one per
            `args.value_model_init` (a copy of the helpfulness RM by default).
        ref_model: the frozen reference pi_0; None uses the disabled adapter of a peft policy, else a frozen copy.
        peft_config: wrap a plain policy with this LoRA config first (the reference is then its disabled adapter).

    Multi-process: launch with torchrun and pass the policy, `ref_model` and `value_model` sharded with `fully_shard`
    (FSDP2; the defaults copy unsharded weights); each rank rolls out `batch_size / world_size` prompts with the full
    weights gathered once, whitens with its own statistics, and FSDP reduces the gradients. Checkpoints
    (`save_checkpoint`) assume unsharded models.
    """

    def __init__(self, args: Llama2PPOConfig, model: nn.Module, processing_class, reward: Callable,
                 train_dataset: Iterable[Mapping], value_model: nn.Module | None = None,
                 ref_model: nn.Module | None = None, peft_config=None):
        from ..rejection_sampling import read_prompts

        self.args = args
        self.tokenizer = processing_class
        self.reward = reward
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.batch_size % (self.world_size * args.mini_batch_size):
            raise ValueError(f"batch_size {args.batch_size} must split into {self.world_size} ranks x whole "
                             f"mini-batches of {args.mini_batch_size}")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.policy = model
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
        self.prompts = read_prompts(train_dataset)
        if not self.prompts:
            raise ValueError("train_dataset has no prompts")
        self.policy_optimizer = self._optimizer(self.policy, args.learning_rate)
        self.value_optimizer = self._optimizer(self.value_model, args.value_learning_rate or args.learning_rate)
        self.sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, num_samples=1, prompt_batch_size=args.generation_batch_size)
        if args.top_p < 1.0:
            logger.warning("top_p=%s < 1: rollouts come from a truncated distribution, so PPO is slightly "
                           "off-policy", args.top_p)
        # Generation needs a generator on the policy's device; shuffling and prompt order run on CPU.
        self.sample_generator = torch.Generator(device=self.device).manual_seed(args.seed + self.rank)
        self.shuffle_generator = torch.Generator().manual_seed(args.seed)
        self.iteration = 0
        self.data_epoch, self.data_position = 0, 0
        self.history: list[dict] = []

    def _optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        # No weight decay on norms and 1-d parameters, as transformers' Trainer does.
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                 eps=self.args.adam_epsilon)

    # -- data ----------------------------------------------------------------------------------------------------

    def _next_prompts(self) -> list:
        """This rank's share of the next `batch_size` prompts; the order is reshuffled every pass over the data."""
        chosen = []
        while len(chosen) < self.args.batch_size:
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(
                self.args.seed + self.data_epoch)).tolist()
            take = order[self.data_position: self.data_position + self.args.batch_size - len(chosen)]
            chosen += take
            self.data_position += len(take)
            if self.data_position >= len(self.prompts):
                self.data_epoch, self.data_position = self.data_epoch + 1, 0
        return [self.prompts[i] for i in chosen[self.rank:: self.world_size]]

    # -- forward passes ------------------------------------------------------------------------------------------

    def _ref_logprobs(self, batch: dict, context_length: int) -> torch.Tensor:
        """Log-probabilities under pi_0: the reference model, or the policy with its LoRA adapter disabled."""
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, batch, context_length)[0]
        with self.policy.disable_adapter():
            return self._logprobs(self.policy, batch, context_length)[0]

    def _logprobs(self, model: nn.Module, batch: dict, context_length: int,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities (B, R) of the response tokens, and optionally the entropy of each position."""
        response_length = batch["input_ids"].shape[1] - context_length
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False,
                       logits_to_keep=response_length + 1).logits[:, :-1]  # (B, R, V): positions P-1 .. P+R-2
        logits = logits.float() / self.args.temperature
        logprobs = logprobs_from_logits(logits, batch["input_ids"][:, context_length:])
        return logprobs, entropy_from_logits(logits) if with_entropy else None

    def _values(self, batch: dict, context_length: int) -> torch.Tensor:
        values = token_values(self.value_model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return values[:, context_length - 1: -1]  # (B, R): the value of the state before each response token

    def _chunks(self, rollout_tensors: dict, size: int, index: torch.Tensor | None = None):
        n = next(iter(rollout_tensors.values())).shape[0]
        index = torch.arange(n) if index is None else index
        for start in range(0, len(index), size):
            rows = index[start: start + size].to(self.device)
            yield {k: v[rows] for k, v in rollout_tensors.items()}

    # -- one iteration -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _rollout(self, prompts: list) -> tuple[Rollout, dict]:
        args = self.args
        timings = {}
        start = time.perf_counter()
        prompt_ids = [encode_dialog(self.tokenizer, p.messages) for p in prompts]
        self.policy.eval()
        with full_weights_for_generation(self.policy):
            out = generate(self.policy, prompt_ids, self.sampling, eos_token_id=self.tokenizer.eos_token_id,
                           pad_token_id=self.tokenizer.pad_token_id, generator=self.sample_generator)
        responses = [r[0] for r in out.response_ids]
        finished = torch.tensor([f[0] for f in out.finished])
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
                            is_safety=[p.is_safety for p in prompts])
        timings["time/scoring_reward"] = time.perf_counter() - reward_start
        scores = scored.rewards.clone().float()
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~finished).float()

        self.value_model.eval()
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for chunk in self._chunks(tensors, args.micro_batch_size):
            lp, ent = self._logprobs(self.policy, chunk, p_len, with_entropy=True)
            logprobs.append(lp.cpu())
            ref_logprobs.append(self._ref_logprobs(chunk, p_len).cpu())
            entropy.append(ent.cpu())
            values.append(self._values(chunk, p_len).cpu())
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, entropy = torch.cat(values), torch.cat(entropy)

        kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator) * response_mask
        rewards = token_level_rewards(scores, kl, response_mask, args.kl_coef)
        advantages, returns = gae_advantages(rewards, values, response_mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, response_mask)
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
        mini = args.mini_batch_size // self.world_size if self.world_size > 1 else args.mini_batch_size
        micro = min(args.micro_batch_size, mini)
        stats: dict[str, list[float]] = {k: [] for k in ("policy/loss", "policy/clipfrac", "policy/approx_kl",
                                                          "policy/ratio", "value/loss", "value/clipfrac",
                                                          "policy/grad_norm", "value/grad_norm")}
        first_ratio = None
        for _ in range(args.ppo_epochs):
            order = torch.randperm(n, generator=self.shuffle_generator)
            for m_start in range(0, n, mini):
                mini_index = order[m_start: m_start + mini]
                total_tokens = rollout.response_mask[mini_index].sum().clamp(min=1)
                self.policy_optimizer.zero_grad(set_to_none=True)
                self.value_optimizer.zero_grad(set_to_none=True)
                sums = dict.fromkeys(("policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/ratio",
                                      "value/loss", "value/clipfrac"), 0.0)
                for chunk in self._chunks(tensors, micro, mini_index):
                    mask = chunk["response_mask"]
                    # Each micro-batch's token mean is weighted by its share of the mini-batch's tokens, so the
                    # accumulated gradient is the token mean over the whole mini-batch whatever the micro size.
                    share = mask.sum() / total_tokens.to(mask.device)
                    logprobs, entropy = self._logprobs(self.policy, chunk, rollout.context_length,
                                                       with_entropy=args.entropy_coef > 0)
                    pg_loss, pg_stats = ppo_policy_loss(logprobs, chunk["logprobs"], chunk["advantages"], mask,
                                                        args.clip_range)
                    values = self._values(chunk, rollout.context_length)
                    vf_loss, vf_clipfrac = clipped_value_loss(values, chunk["values"], chunk["returns"], mask,
                                                              args.clip_range_value)
                    loss = pg_loss + vf_loss
                    if args.entropy_coef > 0:
                        loss = loss - args.entropy_coef * masked_mean(entropy, mask)
                    (loss * share).backward()
                    for key, value in (("policy/loss", pg_loss), ("value/loss", vf_loss),
                                       ("policy/clipfrac", pg_stats["clipfrac"]),
                                       ("policy/approx_kl", pg_stats["approx_kl"]),
                                       ("policy/ratio", pg_stats["ratio"]), ("value/clipfrac", vf_clipfrac)):
                        sums[key] += (value.detach() * share).item()
                if first_ratio is None:
                    first_ratio = sums["policy/ratio"]
                stats["policy/grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(
                    [p for p in self.policy.parameters() if p.requires_grad], args.max_grad_norm)))
                stats["value/grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(
                    self.value_model.parameters(), args.max_grad_norm)))
                self.policy_optimizer.step()
                self.value_optimizer.step()
                for key, value in sums.items():
                    stats[key].append(value)
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["policy/ratio_first_minibatch"] = first_ratio
        out["time/training"] = time.perf_counter() - start
        return out

    def step(self) -> dict:
        """One PPO iteration: rollout, scoring, training. Returns its metrics."""
        start = time.perf_counter()
        rollout, metrics = self._rollout(self._next_prompts())
        metrics.update(self._train_on(rollout))
        self.iteration += 1
        metrics["iteration"] = self.iteration
        metrics["time/iteration"] = time.perf_counter() - start
        metrics = self._reduce(metrics)
        self.history.append(metrics)
        return metrics

    def _reduce(self, metrics: dict) -> dict:
        """Average metrics over ranks."""
        if self.world_size == 1:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, float))
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        return {**metrics, **{k: v / self.world_size for k, v in zip(keys, values.tolist())}}

    def train(self, resume_from_checkpoint: str | bool | None = None) -> list[dict]:
        """Run up to `num_iterations`, logging to `output_dir/metrics.jsonl` and checkpointing every `save_steps`.

        `resume_from_checkpoint`: a checkpoint directory, or True for the latest one in `output_dir`.
        """
        from tqdm.auto import tqdm

        if resume_from_checkpoint:
            path = self._latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                raise ValueError(f"no checkpoint-* directory in {self.args.output_dir} to resume from")
            self.load_checkpoint(path)
        out = Path(self.args.output_dir)
        bar = tqdm(total=self.args.num_iterations, initial=self.iteration, desc="PPO", disable=self.rank != 0)
        while self.iteration < self.args.num_iterations:
            metrics = self.step()
            bar.update(1)
            if self.rank == 0 and self.iteration % self.args.logging_steps == 0:
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                logger.info("iteration %d: reward %.4f, kl %.4f, entropy %.3f, value loss %.4f, clipfrac %.3f",
                            self.iteration, metrics["reward/mean"], metrics["objective/kl"],
                            metrics["objective/entropy"], metrics["value/loss"], metrics["policy/clipfrac"])
            if self.args.save_steps and self.iteration % self.args.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        found = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return found[-1] if found else None

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """The policy (and tokenizer) in `output_dir`, the critic in `output_dir/value_model`."""
        out = Path(output_dir or self.args.output_dir)
        if self.rank != 0:
            return
        self.policy.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        self.value_model.save_pretrained(out / "value_model")

    def save_checkpoint(self) -> Path:
        """`checkpoint-{iteration}/`: policy and critic weights, both optimizers, iteration, data position, RNG
        states and the reward's running statistics; older checkpoints beyond `save_total_limit` are removed."""
        path = Path(self.args.output_dir) / f"checkpoint-{self.iteration}"
        if self.rank == 0:
            self.save_model(path)
            state = {
                "iteration": self.iteration, "data_epoch": self.data_epoch, "data_position": self.data_position,
                "policy_optimizer": self.policy_optimizer.state_dict(),
                "value_optimizer": self.value_optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "sample": self.sample_generator.get_state(), "shuffle": self.shuffle_generator.get_state()},
                "history": json.dumps(self.history),
                "config": json.dumps(asdict(self.args)),
            }
            if hasattr(self.reward, "state_dict"):
                state["reward"] = self.reward.state_dict()
            torch.save(state, path / "trainer_state.pt")
            if self.args.save_total_limit:
                found = sorted(Path(self.args.output_dir).glob("checkpoint-*"),
                               key=lambda p: int(p.name.split("-")[-1]))
                for old in found[: -self.args.save_total_limit]:
                    import shutil

                    shutil.rmtree(old)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore everything `save_checkpoint` wrote (weights are loaded into the existing models)."""
        path = Path(path)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        _load_weights(self.policy, path)
        _load_weights(self.value_model, path / "value_model")
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.iteration = state["iteration"]
        self.data_epoch, self.data_position = state["data_epoch"], state["data_position"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.sample_generator.set_state(state["rng"]["sample"])
        self.shuffle_generator.set_state(state["rng"]["shuffle"])
        self.history = json.loads(state["history"])
        if "reward" in state and hasattr(self.reward, "load_state_dict"):
            self.reward.load_state_dict(state["reward"])
        logger.info("resumed from %s at iteration %d", path, self.iteration)


# ---------------------------------------------------------------------------------------------------------------------
# CLI: llama2-hf ppo
# ---------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2-hf ppo", description=(
        "PPO against the safety-gated reward with a per-token KL penalty to the initial policy (paper §3.2.3). "
        "Every Llama2PPOConfig field is an option; defaults are the paper's values."))
    p.add_argument("--model", required=True, help="policy directory (usually the rejection-sampling model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--prompts", required=True, help="prompt file (.jsonl/.json/.parquet) or Hub dataset: rows with "
                   "'prompt' (text or messages) or 'messages', optional bool 'is_safety' and 'id'")
    p.add_argument("--helpfulness-rm", required=True, help="helpfulness reward model directory")
    p.add_argument("--safety-rm", default=None, help="safety reward model directory (without it: helpfulness only)")
    p.add_argument("--threshold", type=float, default=0.15, help="safety gate on sigmoid(R_s) (paper: 0.15)")
    p.add_argument("--reward-whitening", choices=["batch", "running", "none"], default="batch",
                   help="statistics of WHITEN(LOGIT(R_c)) (paper silent)")
    p.add_argument("--value-model", default=None, help="critic directory (default: per --value-model-init)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank for the policy (0: full fine-tuning); the "
                   "disabled adapter is the reference model")
    p.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    p.add_argument("--device", default=None, help="policy and critic device (default: cuda if available)")
    p.add_argument("--rm-device", default=None, help="reward models' device (default: the policy's)")
    p.add_argument("--rm-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="reward models' dtype")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'latest'")
    defaults = Llama2PPOConfig()
    for f in fields(Llama2PPOConfig):
        default = getattr(defaults, f.name) if f.name != "kl_coef" else None
        help_ = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                           help=f"{help_} (true/false, default {default})")
        elif f.name in ("kl_coef", "value_learning_rate", "clip_range_value", "missing_eos_penalty"):
            p.add_argument(flag, type=lambda s: None if s.lower() == "none" else float(s), default=default,
                           help=f"{help_} (default {default})")
        elif f.name in ("micro_batch_size", "save_total_limit"):
            p.add_argument(flag, type=lambda s: None if s.lower() == "none" else int(s), default=None
                           if f.name == "micro_batch_size" else default, help=f"{help_} (default {default})")
        else:
            p.add_argument(flag, type=type(default), default=default, choices=f.metadata.get("choices"),
                           help=f"{help_} (default {default})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..data import load_any
    from ..rejection_sampling import load_reward

    config = Llama2PPOConfig(**{f.name: getattr(args, f.name) for f in fields(Llama2PPOConfig)})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    policy = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    reward = load_reward(args.helpfulness_rm, args.safety_rm, tokenizer, args.threshold, args.reward_whitening,
                         args.rm_device or device, args.rm_dtype, config.micro_batch_size)
    value_model = None
    if args.value_model:
        value_model = AutoModelForSequenceClassification.from_pretrained(args.value_model, num_labels=1).to(device)
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = Llama2PPOTrainer(config, policy, tokenizer, reward, list(load_any(args.prompts)),
                               value_model=value_model, peft_config=peft_config)
    resume = True if args.resume == "latest" else args.resume
    history = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    out = Path(config.output_dir)
    run = {"stage": "ppo", "config": {**vars(args), "ppo": asdict(config)},
           "metrics": history[-1] if history else {}}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    print(json.dumps(history[-1] if history else {}))
    return 0


__all__ = ["Llama2PPOConfig", "Llama2PPOTrainer", "KL_COEF_PRESETS", "Rollout", "token_values",
           "value_model_from_policy", "main"]

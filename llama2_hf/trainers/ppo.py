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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import progress
from ..data import SAFETY_TAG, PromptRow, prompt_row
from ..distributed import fsdp_plugin, is_sharded, parameter_bytes, shard_model
from ..losses import (
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
from ..sampling import Sampler, SamplingConfig, derive_seed

from .ppo_config import KL_COEF_PRESETS, VALUE_MODEL_INITS, Llama2PPOConfig, PPOSampling  # noqa: F401
from .ppo_parts import (  # noqa: F401  (the public names)
    METRICS_FILE, TRAINER_STATE, PPOCheckpointing, _as_float, _pad_right, _reward_model_of, complete_checkpoints,
    is_peft_model, latest_checkpoint, token_logprobs, token_values, value_model_from_policy,
)

logger = logging.getLogger(__name__)

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

class Llama2PPOTrainer(PPOCheckpointing):
    """PPO with a KL penalty to the initial policy against the pipeline's reward (see the module docstring).

    Args:
        args: `Llama2PPOConfig`.
        model: the policy (a causal LM, or a peft model: its disabled adapter is then the reference pi_0), float32
            weights on its device (`bf16` in `args` is autocast compute).
        processing_class: the tokenizer (its chat format encodes the prompts; EOS ends a response).
        reward: a reward of the contract `reward(prompts, responses, **columns)`; receives the `is_safety_prompt`
            column.
        train_dataset: prompt rows (`data.prompt_row` schema: `prompt` text or messages, or `messages` ending with a
            user turn; optional `is_safety_prompt` and `id`), as dicts or `data.PromptRow`s.
        value_model: the critic, a sequence-classification model with a `score` head; None builds one per
            `args.value_model_init` (a copy of the helpfulness RM by default).
        ref_model: the frozen reference pi_0; None uses the disabled adapter of a peft policy, else a frozen copy.
        peft_config: wrap a plain policy with this LoRA config first (the reference is then its disabled adapter).
        sampler: what rolls out: a `sampling.Sampler` (e.g. `open_sampler(policy, tokenizer, config, backend)`), or
            a `SamplingConfig` for the PyTorch backend over the policy; None: `PPOSampling()`'s defaults. Before every
            rollout the policy's current weights go to it (`update_weights`: a vLLM engine receives them, LoRA
            merged and FSDP shards gathered), so no rollout comes from stale weights; each rank has its own.

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
                 ref_model: nn.Module | None = None, peft_config=None, sampler: Sampler | SamplingConfig | None = None):
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
        if not isinstance(sampler, Sampler):
            from ..sampling.torch_backend import TorchSampler

            sampler = TorchSampler(model, processing_class, sampler or PPOSampling().sampling_config())
        self.sampler = sampler
        self.device = next(model.parameters()).device
        if ref_model is None and not is_peft_model(model):
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model
        if value_model is None:
            if args.value_model_init == "reward_model":
                source = _reward_model_of(reward, processing_class)
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
        self.sampling = sampler.config
        if self.sampling.num_samples != 1:
            raise ValueError(f"PPO rolls out one response per prompt: num_samples must be 1, got "
                             f"{self.sampling.num_samples}")
        if self.sampling.top_p < 1.0:
            logger.warning("top_p=%s < 1: rollouts come from a truncated distribution, so PPO is slightly "
                           "off-policy", self.sampling.top_p)
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
        temperature = self.sampling.temperature if self.sampling.temperature not in (0.0, 1.0) else 1.0
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
        """Sample one response per prompt, `prompt_batch_size` prompts at a time, each batch seeded by (seed,
        iteration, global position): the same prompts give the same rollouts on any number of ranks, and a resumed
        run needs no sampler state.

        Returns (responses, finished, logprobs, entropy): the last two are per-response float32 tensors from the
        sampling steps (`rollout_logprobs` on a sampler that returns them), else None."""
        responses, finished = [], []
        with_logprobs = self.args.rollout_logprobs and self.sampler.supports_logprobs
        logprobs, entropy = ([], []) if with_logprobs else (None, None)
        size = self.sampling.prompt_batch_size
        for start in range(0, len(prompt_ids), size):
            with self._autocast():
                out = self.sampler.sample_ids(prompt_ids[start: start + size], return_logprobs=with_logprobs,
                                              seed=derive_seed(self.args.seed, "ppo", self.iteration, offset + start))
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
        prompt_ids = [self.sampler.encode(p.messages) for p in prompts]
        self.policy.eval()
        # The sampler samples from the weights of the previous update, given now (a vLLM engine receives a copy: a
        # collective under FSDP, every rank gathers the full weights for its own engine).
        self.sampler.update_weights(self.policy)
        timings["time/weight_sync"] = time.perf_counter() - start
        with self.sampler.generating():
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


__all__ = ["Llama2PPOConfig", "Llama2PPOTrainer", "KL_COEF_PRESETS", "Rollout", "complete_checkpoints",
           "latest_checkpoint", "token_logprobs", "token_values", "value_model_from_policy"]

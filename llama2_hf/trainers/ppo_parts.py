"""What `Llama2PPOTrainer` is built from besides its loop: the critic and reward-model helpers, the checkpoint files and
their writing and restoring (`PPOCheckpointing`, mixed into the trainer), and the fused token log-probability kernel
(`token_logprobs`, whose backward builds the logits' gradient in place)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from ..distributed import full_state_dict, own_class
from ..errors import UsageError


logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------------------

def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def value_head(value_model: nn.Module) -> nn.Module:
    """The scalar head of a critic or reward model (`score`, as `Llama2ForRewardModel` and transformers'
    `*ForSequenceClassification` of the Llama, Mistral, Qwen2, Gemma families name it), refused in one line
    otherwise."""
    head = getattr(value_model, "score", None)
    if not isinstance(head, nn.Module):
        raise UsageError(f"critic {type(value_model).__name__}: it has no `score` head, so values cannot be read at "
                         "every token; give a sequence classifier whose head is `score` (value_model_name_or_path), "
                         "or set value_model_init: policy")
    return head


def token_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """Critic values at every position, (B, T): the sequence-classification head (`score`) applied to each token's
    final hidden state instead of only the last one. Works for `Llama2ForRewardModel` and any transformers
    `*ForSequenceClassification` with a `score` head and `num_labels=1` (its decoder is the `base_model_prefix`
    attribute, `model` for Llama, Mistral and Qwen2).

    The model is called as a whole (so FSDP's root hooks gather the embeddings and the head) and the decoder's output
    is captured with a forward hook."""
    head = value_head(value_model)
    backbone = getattr(value_model, value_model.base_model_prefix)
    captured = []
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        value_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    return head(captured[0]).squeeze(-1).float()  # (B, T)


def value_model_from_policy(policy: nn.Module) -> nn.Module:
    """A critic of the policy's own family with the policy's decoder weights and a zero head (initial values 0): a
    `Llama2ForRewardModel` for a `Llama2ForCausalLM`, the family's sequence classifier (`num_labels=1`) for a
    transformers causal LM (`trainers.reward.new_reward_model`)."""
    from .reward import new_reward_model

    base = policy.get_base_model() if is_peft_model(policy) else policy
    critic = new_reward_model(base)
    # A peft policy at initialisation computes exactly its base model (LoRA's B is zero), so its base decoder is it.
    prefix = f"{base.base_model_prefix}."
    decoder = {k.removeprefix(prefix).replace(".base_layer.", "."): v for k, v in base.state_dict().items()
               if k.startswith(prefix) and "lora_" not in k}
    getattr(critic, critic.base_model_prefix).load_state_dict(decoder)
    head = value_head(critic)
    nn.init.zeros_(head.weight)
    if getattr(head, "bias", None) is not None:
        nn.init.zeros_(head.bias)
    return critic.to(device=next(policy.parameters()).device, dtype=next(policy.parameters()).dtype)


def _reward_model_of(reward, tokenizer=None) -> nn.Module | None:
    """The helpfulness RM inside the reward, for the critic's initialisation (None if it has none). The critic reads
    the policy's token ids, so an RM that scores with another vocabulary than `tokenizer` (the policy's) cannot start
    it: refused in one line."""
    for candidate in (getattr(reward, "helpfulness", None), reward):
        model = getattr(candidate, "model", None)
        if isinstance(model, nn.Module):
            own = getattr(candidate, "tokenizer", None)
            if tokenizer is not None and own is not None and own is not tokenizer \
                    and own.get_vocab() != tokenizer.get_vocab():
                name = getattr(model.config, "_name_or_path", "") or type(model).__name__
                raise UsageError(f"value_model_init=reward_model: the helpfulness reward model {name} has another "
                                 "vocabulary than the policy's tokenizer, so it cannot read the policy's tokens as "
                                 "critic; set value_model_init: policy, or give value_model_name_or_path")
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


class PPOCheckpointing:
    """Saving and restoring a `Llama2PPOTrainer`: the final model, `checkpoint-<iteration>` folders (the trainer state
    written last, so an interrupted save is never taken for a complete one) and `metrics.jsonl` cut back to the
    restored iteration. Mixed into the trainer, whose attributes it uses."""

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

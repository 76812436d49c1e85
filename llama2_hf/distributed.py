"""FSDP2 sharding from accelerate's settings, on CPU as on accelerators, for PPO and the Trainer-based stages.

`accelerate launch --config_file recipes/accelerate/fsdp.yaml` exports the FSDP settings (`ACCELERATE_USE_FSDP`,
`FSDP_*`), but accelerate 1.15 only switches to `DistributedType.FSDP` on accelerator devices: a CPU launch is
MULTI_CPU, the plugin is dropped and a Trainer wraps the whole model in DDP on every rank. The helpers here rebuild
the plugin from that environment and apply it with torch's `fully_shard` (one unit per decoder layer plus the root),
so one config shards the same way everywhere. Where accelerate enabled FSDP itself, the Trainer's own path is kept.

    plugin = fsdp_plugin(accelerator)          # None: not an FSDP launch
    shard_model(model, plugin)                 # in place: parameters become DTensor shards
    parameter_bytes([model], accelerator)      # {"param_bytes_full": ..., "param_bytes_per_rank": [...]}
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from torch import nn

from .runner import UsageError

logger = logging.getLogger(__name__)


def fsdp_plugin(accelerator):
    """accelerate's FSDP settings of this launch, or None (one process, or not an FSDP launch). On accelerators
    `Accelerator` builds the plugin; on CPU it is rebuilt from the `FSDP_*` environment that `accelerate launch
    --config_file fsdp.yaml` (or `--use_fsdp ...`) sets."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.num_processes == 1:
        return None
    if accelerator.state.distributed_type == DistributedType.FSDP:
        return accelerator.state.fsdp_plugin
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return None


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` or one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: nn.Module, plugin) -> int:
    """Apply `plugin`'s settings with FSDP2: `fully_shard` on every module of the classes named by
    `fsdp_transformer_layer_cls_to_wrap` (default: the model's `_no_split_modules`), then on the root. Returns the
    number of layer units. `reshard_after_forward` follows the config (FULL_SHARD frees gathered layers after
    forward; SHARD_GRAD_OP keeps them until backward)."""
    from torch.distributed.fsdp import fully_shard

    if getattr(plugin, "fsdp_version", 2) != 2:
        logger.warning("FSDP version %s requested: sharding with FSDP2 (fully_shard)", plugin.fsdp_version)
    names = plugin.transformer_cls_names_to_wrap
    names = set([names] if isinstance(names, str) else names or [])
    names = names or set(getattr(model, "_no_split_modules", None) or [])
    reshard = plugin.reshard_after_forward
    reshard = reshard if isinstance(reshard, bool) else reshard in (1, "FULL_SHARD", "1")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"FSDP: no module of {sorted(names)} in {type(model).__name__} to shard "
                         "(fsdp_transformer_layer_cls_to_wrap)")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    # The root keeps its own parameters (embeddings, final norm, head) after forward (torch's default for a root,
    # None): PPO's critic applies its head outside the model's forward.
    fully_shard(model, reshard_after_forward=None if reshard else False)
    return len(layers)


def parameter_bytes(models, accelerator) -> dict:
    """Parameter bytes of `models`: the whole models and what each rank holds (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    full = local = 0
    for model in models:
        for p in model.parameters():
            full += p.numel() * p.element_size()
            local += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    per_rank = [local]
    if accelerator.num_processes > 1:
        mine = torch.zeros(accelerator.num_processes, dtype=torch.float64, device=accelerator.device)
        mine[accelerator.process_index] = local
        per_rank = [int(x) for x in accelerator.reduce(mine, "sum").tolist()]
    return {"param_bytes_full": full, "param_bytes_per_rank": per_rank}


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """The full (unsharded) weights, and optimizer state when given, on CPU on rank 0 (empty dicts elsewhere).
    A collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


@contextmanager
def own_class(model: nn.Module):
    """`model` under its own class for the duration. `fully_shard` swaps a module's class for a generated
    `FSDP<Name>` subclass; `save_pretrained` would write that name into config.json's `auto_map` and copy torch's
    FSDP sources next to the weights instead of the model's code."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded_class


class FullyShardedTrainerMixin:
    """FSDP2 for a transformers `Trainer` on launches where accelerate did not enable FSDP itself (CPU).

    Put it before the Trainer class and call `_shard_for_launch()` at the end of `__init__`. The model is sharded
    before the optimizer is built, and marked as prepared so that accelerate does not wrap it in DDP (the Trainer
    only gets autocast from accelerate, as for models that transformers shards at load time). Gradients are
    reduce-scattered by FSDP; the gradient norm is reduced over the mesh; `save_model` writes a normal safetensors
    folder on rank 0; Trainer checkpoints hold the full weights and the full optimizer state keyed by parameter
    name, so a sharded run resumes from them on any number of processes (a run without this sharding cannot). `self.sharding` is "fsdp2" (sharded here), "fsdp" (accelerate's own FSDP),
    "replicated" (DDP) or "none"; `parameter_memory()` measures the parameter bytes per rank.
    """

    sharding = "none"

    def _shard_for_launch(self) -> None:
        from accelerate.utils import is_peft_model

        plugin = None if self.is_fsdp_enabled else fsdp_plugin(self.accelerator)
        if self.is_fsdp_enabled:
            self.sharding = "fsdp"
        elif plugin is not None:
            if is_peft_model(self.model):
                raise UsageError("a LoRA model is not sharded on CPU: launch it with a DDP config (its base weights "
                                 "are frozen and its adapter is small)")
            if torch.distributed.is_initialized():
                # DDP broadcasts rank 0's weights when it wraps a model; fully_shard keeps each rank's own slice,
                # so broadcast first: a freshly initialised head (a reward model from a causal LM) is one model.
                with torch.no_grad():
                    for tensor in [*self.model.parameters(), *self.model.buffers()]:
                        torch.distributed.broadcast(tensor.data, src=0)
            units = shard_model(self.model, plugin)
            self.model = self.model_wrapped = self.accelerator.prepare_model(
                self.model, device_placement=False, evaluation_mode=True)
            self.sharding = "fsdp2"
            logger.info("FSDP2: model sharded over %d ranks (%d layer units)", self.accelerator.num_processes, units)
        elif self.accelerator.num_processes > 1:
            self.sharding = "replicated"

    def parameter_memory(self) -> dict:
        """Sharding mode, world size and parameter bytes (whole model, each rank) of the model as it is trained now:
        call it after training, when accelerate's own FSDP has sharded too (a collective: every rank calls it)."""
        return {"sharding": self.sharding, "world_size": self.accelerator.num_processes,
                **parameter_bytes([self.model], self.accelerator)}

    def _has_mixed_mesh_grads(self, model) -> bool:
        # accelerate's `clip_grad_norm_` does not reduce DTensor norms over the mesh outside its own FSDP path;
        # the Trainer's per-mesh norm does (one mesh here).
        return True if self.sharding == "fsdp2" else super()._has_mixed_mesh_grads(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.sharding != "fsdp2":
            return super().save_model(output_dir, _internal_call)
        state = full_state_dict(self.model)
        if self.args.should_save:
            with own_class(self.model):
                self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.sharding != "fsdp2":
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        _, optim = full_state_dict(self.model, _unwrapped(self.optimizer))
        if self.args.should_save:
            torch.save(optim, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.sharding != "fsdp2":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from transformers.trainer import SAFE_WEIGHTS_NAME

        path = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: a sharded run resumes from the full weights its checkpoints hold")
        # Rank 0 reads the file and broadcasts: the other ranks never hold the whole model.
        weights = load_file(path) if self.accelerator.is_main_process else {}
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True,
                                                                           broadcast_from_rank0=True))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self.sharding != "fsdp2" or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        files = [os.path.join(checkpoint, name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"cannot resume the sharded run from {checkpoint}: missing {missing}")
        optim = torch.load(files[0], weights_only=True) if self.accelerator.is_main_process else {}
        if optim and not all(isinstance(p, str) for group in optim["param_groups"] for p in group["params"]):
            # Unsharded Trainer checkpoints key the optimizer state by position, sharded ones by parameter name.
            raise UsageError(f"{checkpoint} was written by a run without FSDP2 sharding: resume it with the launch "
                             "config that wrote it, or start in a new output_dir")
        set_optimizer_state_dict(self.model, _unwrapped(self.optimizer), optim,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.lr_scheduler.load_state_dict(torch.load(files[1], weights_only=True))


def _unwrapped(optimizer):
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (the state-dict helpers read its groups)."""
    return getattr(optimizer, "optimizer", optimizer)

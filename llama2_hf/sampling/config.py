"""How to sample, declared once: `SamplingConfig` (the value every sampler call takes), `BackendArguments` (which
engine samples) and `SamplingArguments` (the command-line face of both, embedded by every sampling stage, each with
its own defaults through `sampling_arguments`)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field

BACKENDS = ("torch", "vllm")


@dataclass
class SamplingConfig:
    """How to sample. Defaults are Meta's chat defaults (`chat_completion`: temperature 0.6, top-p 0.9)."""

    max_new_tokens: int = 256
    """Most tokens generated per sample (EOS included); also capped by the model's context length."""
    temperature: float = 0.6
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (1.0 disables)."""
    num_samples: int = 1
    """K, the samples drawn per prompt, all sharing the prompt's prefill."""
    prompt_batch_size: int = 8
    """Prompts per forward pass; each batch decodes prompt_batch_size * num_samples rows."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1 or self.prompt_batch_size < 1:
            raise ValueError(f"num_samples and prompt_batch_size must be >= 1, got {self.num_samples} and "
                             f"{self.prompt_batch_size}")


@dataclass
class BackendArguments:
    """Which engine samples: this process's PyTorch model, or a vLLM engine in vLLM's own environment.

    Distributed: under `accelerate launch` every process starts its own engine over its own copy of the weights and
    samples its share of the prompts (one engine per rank: what a CPU machine or one GPU per rank needs; the engine
    of a rank with `vllm_tensor_parallel_size` > 1 spans that many GPUs, so launch one process per engine group)."""

    generation_backend: str = field(default="torch", metadata={
        "help": "torch (this process) or vllm (a vLLM engine in its own environment; build it with "
                "`llama2-hf setup-vllm`).", "choices": list(BACKENDS)})
    vllm_python: str | None = field(default=None, metadata={
        "help": "Python of vLLM's environment (default: $LLAMA2_HF_VLLM_ENV/bin/python, else "
                "~/.cache/llama2_hf/vllm-env/bin/python)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={
        "help": "GPUs per engine (tensor parallelism; 70B: 8). Under accelerate launch every process starts one "
                "engine for its share of the prompts."})
    vllm_kv_cache_gib: float = field(default=2.0, metadata={
        "help": "KV-cache size of a CPU engine, GiB (rounded up to whole GiB, as vLLM reads it)."})
    vllm_gpu_memory_utilization: float = field(default=0.5, metadata={
        "help": "Share of GPU memory the engine may take (the rest is left to training when colocated)."})
    vllm_startup_timeout: float = field(default=900.0, metadata={"help": "Seconds to wait for the engine to start."})

    def __post_init__(self):
        if self.generation_backend not in BACKENDS:
            raise ValueError(f"generation_backend must be one of {BACKENDS}, got {self.generation_backend!r}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")

    @property
    def backend(self) -> str:
        return self.generation_backend

    @property
    def use_vllm(self) -> bool:
        return self.generation_backend == "vllm"

    def check_installed(self) -> None:
        """Raise `VLLMNotInstalled` now (before any model is loaded) when the vLLM backend is chosen but missing."""
        if self.use_vllm:
            from .vllm_engine import vllm_python

            vllm_python(self.vllm_python)


@dataclass
class SamplingArguments(BackendArguments):
    """The sampling settings of a stage: how (temperature, top-p, length, batch) and with which engine. Defaults:
    Meta's chat defaults; each stage sets its own through `sampling_arguments`."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per sample (EOS included)."})
    temperature: float = field(default=0.6, metadata={"help": "Softmax temperature (0 = greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold (1.0 disables it)."})
    prompt_batch_size: int = field(default=8, metadata={
        "help": "Prompts per generation batch: the unit of seeding and of the split across processes."})

    def __post_init__(self):
        super().__post_init__()
        self.sampling_config()  # the same checks as SamplingConfig, at parse time

    def sampling_config(self, num_samples: int = 1, **overrides) -> SamplingConfig:
        """The `SamplingConfig` of these settings, K samples per prompt (`overrides`: e.g. a sweep's temperature)."""
        values = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                      num_samples=num_samples, prompt_batch_size=self.prompt_batch_size)
        return SamplingConfig(**{**values, **overrides})


def sampling_arguments(name: str, doc: str, base: type[SamplingArguments] = SamplingArguments,
                       **defaults) -> type[SamplingArguments]:
    """`base` (a `SamplingArguments`) with a stage's own defaults, e.g. `sampling_arguments("PPOSampling", "...",
    temperature=1.0, top_p=1.0)`: the fields and their help stay declared once; only the defaults differ."""
    hints = typing.get_type_hints(base)
    by_name = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(defaults) - set(by_name))
    if unknown:
        raise TypeError(f"{unknown} are not fields of {base.__name__} ({sorted(by_name)})")
    own = [(key, hints[key], field(default=value, metadata=by_name[key].metadata)) for key, value in defaults.items()]
    cls = dataclasses.make_dataclass(name, own, bases=(base,))
    cls.__doc__ = doc
    cls.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)  # pickled and named as the stage's own
    return cls


__all__ = ["BACKENDS", "BackendArguments", "SamplingArguments", "SamplingConfig", "sampling_arguments"]

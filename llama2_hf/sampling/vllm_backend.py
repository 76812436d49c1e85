"""The vLLM backend: samples with a vLLM engine in vLLM's own environment (`vllm_engine.VLLMEngine`), over an export
of the model's weights; new weights are pushed to it before the next call."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from .base import Sampler
from .config import BackendArguments, SamplingConfig
from .seeds import derive_seed

logger = logging.getLogger(__name__)


class VLLMSampler(Sampler):
    """A `Sampler` over a running `VLLMEngine`. A call seeded with `seed` seeds prompt i with
    `derive_seed(seed, i)` (vLLM seeds its sample k with that + k). Prompts are the ids of our chat format, so the
    engine sees exactly what the PyTorch backend would. No log-probabilities: PPO takes them from a forward pass."""

    backend = "vllm"
    supports_logprobs = False

    def __init__(self, engine, tokenizer, config: SamplingConfig | None = None):
        super().__init__(tokenizer, config)
        self.engine = engine

    @classmethod
    def start(cls, model: torch.nn.Module, tokenizer, config: SamplingConfig | None, backend: BackendArguments, *,
              seed: int = 0) -> VLLMSampler:
        """An engine started over `model`'s current weights (gathered first when FSDP-sharded), computing in the
        model's own precision (a bf16 evaluation model stays bf16, fp32 weights fp32)."""
        from ..generation import full_weights_for_generation
        from .vllm_engine import VLLMEngine

        logger.info("starting the vLLM engine")
        start = time.perf_counter()
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
            next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32), "float32")
        with full_weights_for_generation(model):
            engine = VLLMEngine.start_for_model(model, backend, seed=seed, dtype=dtype)
        logger.info("vLLM engine ready in %.1f s", time.perf_counter() - start)
        return cls(engine, tokenizer, config)

    @property
    def max_length(self) -> int | None:
        return getattr(self.engine.config, "max_position_embeddings", None)

    def sample_ids(self, prompt_ids: Sequence[Sequence[int]], *, seed: int | None, config: SamplingConfig | None = None,
                   return_logprobs: bool = False):
        if return_logprobs:
            raise ValueError("the vLLM backend returns no log-probabilities: take them from a forward pass")
        from ..generation import PromptTooLong

        limit = self.max_length
        for i, ids in enumerate(prompt_ids):
            if limit is not None and len(ids) >= limit:
                raise PromptTooLong(f"prompt_ids[{i}] has {len(ids)} tokens, no room left in the model's context of "
                                    f"{limit} (shorten or drop the prompt)")
        seeds = None if seed is None else [derive_seed(seed, i) for i in range(len(prompt_ids))]
        return self.engine.generate_output(prompt_ids, config or self.config, seeds=seeds, eos_token_id=self.eos_ids())

    def model_eos_ids(self) -> list[int]:
        return self.engine.eos_ids

    def update_weights(self, model) -> None:
        """Push `model`'s current weights (LoRA merged; a collective under FSDP: every rank gathers the full
        weights for its own engine)."""
        self.engine.load_weights(model)

    def close(self) -> None:
        self.engine.close()


__all__ = ["VLLMSampler"]

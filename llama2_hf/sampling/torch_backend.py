"""The PyTorch backend: samples with the model in this process, through `generation.generate` (batched, KV-cached,
one prefill shared by a prompt's K samples, Meta's sampling semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Sampler
from .config import SamplingConfig


class TorchSampler(Sampler):
    """A `Sampler` over a causal LM of this process (any transformers decoder, a peft model, an FSDP2-sharded one).

    A call seeded with `seed` draws from one `torch.Generator` on the model's device seeded with it. Samples come
    with their log-probabilities on request (what PPO reads instead of a second forward pass). The model is put in
    eval mode for a call and put back as it was."""

    backend = "torch"
    supports_logprobs = True

    def __init__(self, model: torch.nn.Module, tokenizer, config: SamplingConfig | None = None):
        super().__init__(tokenizer, config)
        self.model = model

    @property
    def max_length(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def model_eos_ids(self) -> int | list[int] | None:
        return getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)

    def sample_ids(self, prompt_ids: Sequence[Sequence[int]], *, seed: int | None, config: SamplingConfig | None = None,
                   return_logprobs: bool = False):
        from .. import generation

        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        training = self.model.training
        self.model.eval()
        try:
            return generation.generate(self.model, prompt_ids, config or self.config, eos_token_id=self.eos_ids(),
                                       pad_token_id=self.tokenizer.pad_token_id, generator=generator,
                                       return_logprobs=return_logprobs)
        finally:
            self.model.train(training)

    def update_weights(self, model) -> None:
        self.model = model  # the same module (its weights are read at every step) or its replacement

    def generating(self):
        from ..generation import full_weights_for_generation

        return full_weights_for_generation(self.model)


__all__ = ["TorchSampler"]

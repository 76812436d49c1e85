"""The `Sampler` interface: sample K continuations of chat prompts, take new weights. Every sampling site of the
package (rejection sampling, PPO rollouts, the RLHF loop's pairs and win rates, GAtt, distillation, refusals, the
generative evaluation tasks) holds a `Sampler` and never asks which engine is behind it; `open_sampler` is the one
place that chooses (`sampling.torch_backend.TorchSampler` or `sampling.vllm_backend.VLLMSampler`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

from .config import BackendArguments, SamplingConfig


def end_ids(tokenizer, model_eos: int | Sequence[int] | None) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS, then the model's own (its generation config's
    `eos_token_id`: an id, a list or None), without repeats."""
    extra = [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *extra] if i is not None))


class Sampler:
    """Samples from one causal LM with its tokenizer's chat format.

    Subclasses implement `sample_ids` (token ids in, `generation.GenerationOutput` out) and `update_weights`; the
    rest is shared. `seed` seeds one call: the same prompts, config and seed give the same samples on a backend,
    whatever ran before (each backend draws its own random stream, so torch and vLLM samples differ)."""

    backend: str = ""
    """The engine's name, recorded with the samples it draws ("torch", "vllm")."""
    supports_logprobs: bool = False
    """Whether `sample_ids(..., return_logprobs=True)` returns the sampling steps' log-probabilities."""

    def __init__(self, tokenizer, config: SamplingConfig | None = None):
        from ..chat_format import chat_format_for

        self.tokenizer = tokenizer
        self.config = config if config is not None else SamplingConfig()
        self.chat_format = chat_format_for(tokenizer)

    # -- what a backend implements ---------------------------------------------------------------------------------

    @property
    def max_length(self) -> int | None:
        """The model's context length (prompt + answer), if known."""
        raise NotImplementedError

    def sample_ids(self, prompt_ids: Sequence[Sequence[int]], *, seed: int | None, config: SamplingConfig | None = None,
                   return_logprobs: bool = False):
        """`config.num_samples` responses per prompt (`generation.GenerationOutput`, indexed [prompt][sample])."""
        raise NotImplementedError

    def update_weights(self, model) -> None:
        """Sample from `model`'s current weights from the next call on (the same architecture as before)."""
        raise NotImplementedError

    def model_eos_ids(self) -> int | list[int] | None:
        """The EOS id(s) the model's own configuration names (a chat model whose turns end with another token than
        the tokenizer's EOS lists it in its generation config)."""
        return None

    def generating(self) -> contextlib.AbstractContextManager:
        """A frame around many calls that sample from unchanged weights (the torch backend gathers FSDP-sharded
        weights once for it)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Release what the sampler started (an engine's process)."""

    # -- shared --------------------------------------------------------------------------------------------------------

    def eos_ids(self) -> list[int]:
        """The ids that end an answer: the tokenizer's EOS and the model's own (`model_eos_ids`)."""
        return end_ids(self.tokenizer, self.model_eos_ids())

    def with_config(self, **changes) -> SamplingConfig:
        """This sampler's config with some fields changed (e.g. a temperature sweep's value, or K)."""
        return dataclasses.replace(self.config, **changes)

    def encode(self, messages: Sequence[dict]) -> list[int]:
        """The ids of a chat prompt (ending with a user turn) in the tokenizer's chat format, generation prompt
        included."""
        return self.chat_format.prompt_ids(messages)

    def decode(self, ids: Sequence[int]) -> str:
        """An answer's text: special tokens skipped and stripped, as Meta's `chat_completion` returns it."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def sample(self, prompts: Sequence, *, seed: int | None, config: SamplingConfig | None = None) -> list[list[str]]:
        """Chat prompts (a string is one user message) in, decoded answers out, indexed [prompt][sample]."""
        from ..generation import as_messages

        out = self.sample_ids([self.encode(as_messages(p)) for p in prompts], seed=seed, config=config)
        return [[self.decode(ids) for ids in samples] for samples in out.response_ids]

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def open_sampler(model, tokenizer, config: SamplingConfig | None = None, backend: BackendArguments | None = None, *,
                 seed: int = 0) -> Iterator[Sampler]:
    """The sampler of `backend` over `model`'s current weights (closed on exit): the torch backend samples with
    `model` itself; the vLLM backend starts an engine over a copy of its weights (`seed`: the engine's own seed).
    The one place in the package that chooses a backend."""
    if backend is None or not backend.use_vllm:
        from .torch_backend import TorchSampler

        yield TorchSampler(model, tokenizer, config)
        return
    from .vllm_backend import VLLMSampler

    with VLLMSampler.start(model, tokenizer, config, backend, seed=seed) as sampler:
        yield sampler


@contextlib.contextmanager
def engine_sampler(model, tokenizer, backend: BackendArguments | None, *, seed: int = 0) -> Iterator[Sampler | None]:
    """A sampler on an engine outside this process when `backend` names one (vLLM), else None: for a caller whose
    in-process path is not a `Sampler` (the evaluation's lm-eval protocol decodes with transformers' `generate`)."""
    if backend is None or not backend.use_vllm:
        yield None
        return
    with open_sampler(model, tokenizer, None, backend, seed=seed) as sampler:
        yield sampler


__all__ = ["Sampler", "end_ids", "engine_sampler", "open_sampler"]

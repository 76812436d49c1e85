"""What the chat-sampling stages (`gatt`, `gatt-eval`, `gatt-lists`, `distill`, `refusals`) share: their sampling
arguments, the sampler over the model of TRL's `ModelConfig` on the chosen backend, work chunks, and the model input
that may be a previous stage's folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..sampling import ChatSampler, SamplingArguments, open_sampler
from .common import load_model, load_tokenizer

T = TypeVar("T")


@dataclass
class ChatSamplingArguments(SamplingArguments):
    """Sampling of a stage that answers chat conversations once each (GAtt, distillation, refusals). Defaults:
    Meta's chat defaults (`chat_completion`: temperature 0.6, top-p 0.9)."""

    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})


@contextlib.contextmanager
def chat_sampling(model_args, tokenizer_name_or_path: str | None, sampling: SamplingArguments,
                  seed: int) -> Iterator[ChatSampler]:
    """A `ChatSampler` over the model of `model_args` (frozen: bf16 weights allowed) on this rank's device, on the
    backend `sampling` names (a vLLM engine is stopped on exit). The stage reseeds it per chunk of work
    (`ChatSampler.reseed(derive_seed(seed, first row))`), so a resumed or rank-split run redraws the same answers
    for the same rows. The stage checks `sampling.check_installed()` first, with its other inputs."""
    from accelerate import PartialState

    from ..modeling_llama2 import Llama2ForCausalLM

    source = stage_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(tokenizer_name_or_path or source)
    model = load_model(Llama2ForCausalLM, model_args, source, role="chat model", trainable=False)
    model.to(PartialState().device)
    with open_sampler(model, tokenizer, sampling.sampling_config(), sampling, seed=seed) as sampler:
        del model  # a vLLM engine holds its own copy of the weights
        yield ChatSampler(sampler, seed=seed)


def stage_model(path: str | None) -> str | None:
    """A model input that may be a previous stage's folder (its `model` output) or a folder / Hub id."""
    from ..runner import RUN_RECORD, stage_output

    if path and (Path(path) / RUN_RECORD).is_file():
        return str(stage_output(path, "model"))
    return path


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `size` items: the unit of work a rank finishes and records before the next."""
    for start in range(0, len(items), max(1, size)):
        yield items[start: start + size]

"""What the chat-sampling stages (`gatt`, `gatt-eval`, `gatt-lists`, `distill`, `refusals`) share: the sampler built
from TRL's `ModelConfig` on the chosen generation backend (`VLLMArguments`), work chunks, and the atomic JSONL
writer of their filtered outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from ..generation import ChatSampler, ChatSamplingArguments
from .common import load_model, load_tokenizer

T = TypeVar("T")


def chat_sampler(model_args, tokenizer_name_or_path: str | None, sampling: ChatSamplingArguments,
                 seed: int) -> ChatSampler:
    """A `ChatSampler` over the model of `model_args` (frozen: bf16 weights allowed), on this rank's device."""
    from accelerate import PartialState

    from ..modeling_llama2 import Llama2ForCausalLM

    source = stage_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(tokenizer_name_or_path or source)
    model = load_model(Llama2ForCausalLM, model_args, source, role="chat model", trainable=False)
    model.to(PartialState().device)
    return ChatSampler(model, tokenizer, sampling.sampling_config(), seed=seed)


@contextlib.contextmanager
def chat_sampling(model_args, tokenizer_name_or_path: str | None, sampling: ChatSamplingArguments, seed: int,
                  vllm_args=None) -> Iterator[ChatSampler]:
    """`chat_sampler` on the backend of `vllm_args`: with `generation_backend: vllm` the model's weights go to this
    process's vLLM engine (stopped on exit) and the PyTorch copy is freed. Either way the stage reseeds the sampler
    per chunk (`ChatSampler.reseed`): the engine then gets per-prompt seeds drawn from that seed, so a resumed or
    rank-split run redraws the same answers for the same rows."""
    from ..vllm_engine import generation_engine

    sampler = chat_sampler(model_args, tokenizer_name_or_path, sampling, seed)
    if vllm_args is None or not vllm_args.use_vllm:
        yield sampler
        return
    with generation_engine(sampler.model, vllm_args, seed=seed) as engine:
        tokenizer = sampler.tokenizer
        del sampler  # the engine holds the weights now
        yield ChatSampler(engine, tokenizer, sampling.sampling_config(), seed=seed)


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

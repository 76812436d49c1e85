"""Answering conversations: `ChatSampler` (one answer per conversation, over any `Sampler`) and `rollout` (the
answers of many dialogues, turn by turn, all dialogues batched at each turn). What GAtt, distillation, refusals and
the RLHF loop sample with."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from .. import progress
from .base import Sampler
from .config import SamplingConfig
from .seeds import derive_seed

Messages = list[dict]

Answerer = Callable[[list[Messages]], list[str]]
"""`answerer(conversations) -> one answer per conversation`; each conversation ends with a user message."""


class ChatSampler:
    """Answers batches of chat conversations once each with a `Sampler` (a model and tokenizer: the PyTorch backend).

    Its calls are seeded from one stream: call n (counted from the last `reseed`) uses `derive_seed(seed, n)`, so a
    stage that reseeds per chunk of work (`reseed(derive_seed(seed, first row))`) draws the same answers for the same
    rows on a resume or under another number of processes. Also counts prompt tokens (`count_tokens`) and knows the
    model's context (`max_length`), so turn-by-turn rollouts stop at the context length.
    """

    def __init__(self, sampler, tokenizer=None, config: SamplingConfig | None = None, seed: int | None = None):
        if not isinstance(sampler, Sampler):  # a model: the PyTorch backend over it
            from .torch_backend import TorchSampler

            sampler = TorchSampler(sampler, tokenizer, config)
        elif config is not None:  # the same engine or model with this config; the caller's sampler is left as it is
            sampler = copy.copy(sampler)
            sampler.config = config
        if sampler.config.num_samples != 1:
            raise ValueError(f"ChatSampler answers once per conversation: num_samples must be 1, got "
                             f"{sampler.config.num_samples}")
        self.sampler = sampler
        self.seed, self.calls = seed, 0

    @property
    def config(self) -> SamplingConfig:
        return self.sampler.config

    @property
    def tokenizer(self):
        return self.sampler.tokenizer

    @property
    def max_length(self) -> int | None:
        return self.sampler.max_length

    @property
    def max_new_tokens(self) -> int:
        return self.sampler.config.max_new_tokens

    def reseed(self, seed: int) -> None:
        """Restart the stream of call seeds at `seed`."""
        self.seed, self.calls = seed, 0

    def count_tokens(self, messages: Messages) -> int:
        return len(self.sampler.encode(messages))

    def __call__(self, conversations: list[Messages]) -> list[str]:
        if not conversations:
            return []
        seed = None if self.seed is None else derive_seed(self.seed, self.calls)
        self.calls += 1
        return [samples[0] for samples in self.sampler.sample(conversations, seed=seed)]


def rollout(sampler: Answerer, num_turns: Sequence[int], build_messages: Callable[[int, int, list[str]], Messages],
            max_length: int | None = None, token_counter: Callable[[Messages], int] | None = None,
            reserve_tokens: int = 0, desc: str = "turns") -> list[list[str]]:
    """Generate the assistant's answers of many dialogues turn by turn, batching all dialogues at each turn.

    `build_messages(i, k, answers)` returns the conversation of dialogue i up to its user turn k (0-based), given its
    answers to turns 0..k-1. Dialogue i runs for `num_turns[i]` turns, or stops early once the prompt plus
    `reserve_tokens` exceeds `max_length` tokens (when `max_length` and `token_counter` are given). Returns each
    dialogue's answers (possibly fewer than its turns).
    """
    answers: list[list[str]] = [[] for _ in num_turns]
    stopped = [False] * len(num_turns)
    for k in tqdm(range(max(num_turns, default=0)), desc=desc, disable=len(num_turns) < 2 or progress.active()):
        batch, conversations = [], []
        for i, n in enumerate(num_turns):
            if stopped[i] or k >= n:
                continue
            messages = build_messages(i, k, answers[i])
            if max_length is not None and token_counter is not None and \
                    token_counter(messages) + reserve_tokens > max_length:
                stopped[i] = True
                continue
            batch.append(i)
            conversations.append(messages)
        if not batch:
            break
        responses = sampler(conversations)
        if len(responses) != len(batch):
            raise ValueError(f"the sampler returned {len(responses)} answers for {len(batch)} conversations")
        for i, response in zip(batch, responses):
            answers[i].append(response)
    return answers


def sampler_limits(sampler, max_length: int | None, token_counter):
    """Context limit, token counter and reserved answer length, from the arguments or the sampler."""
    max_length = max_length if max_length is not None else getattr(sampler, "max_length", None)
    token_counter = token_counter or getattr(sampler, "count_tokens", None)
    return max_length, token_counter, getattr(sampler, "max_new_tokens", 0)


__all__ = ["Answerer", "ChatSampler", "Messages", "rollout", "sampler_limits"]

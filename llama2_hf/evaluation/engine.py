"""Batched log-likelihoods and batched generation: the two model calls every task is built from.

Both reproduce lm-evaluation-harness 0.4.13's `hf` backend request by request (same token ids, same truncation,
same stop-string handling) and differ only in how the work is scheduled:

- `loglikelihoods` encodes each (context, continuation) pair as lm-eval does (`encode_pair`), runs each distinct
  model input once, sorts inputs by length into batches, and computes the part of the input that all requests of a
  *prefix group* share (an MMLU subject's header and five exemplars, TruthfulQA's primer) once: its KV cache is
  broadcast over every batch of the group, so each row only runs its own suffix. Logits are computed only at the
  continuation positions, not over the whole sequence.
- `generate_until` left-pads length-sorted batches and calls `model.generate` (KV cache on), stopping a row as soon
  as one of the stop strings appears in its text, and cuts the text at the first stop string.

The model must be a causal LM whose logits are `get_output_embeddings()(base_model(...).last_hidden_state)`
(true of Llama 2 and transformers' Llama); its `base_model` must accept the KV cache (`past_key_values`, `cache` from
transformers 5.25) and `position_ids`.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicLayer

from ..modeling_llama2 import CACHE_NAME
from ..sampling.base import end_ids

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither the config nor the tokenizer gives a context length
MIN_SHARED_PREFIX = 8  # shorter common prefixes are recomputed per row: not worth a cache
_TRUNCATED = object()  # prefix group of requests cut from the left: they no longer start with their group's prefix


def model_max_length(model, tokenizer=None) -> int:
    """Context length as lm-eval resolves it: config `n_positions` / `max_position_embeddings` / `n_ctx`, then the
    tokenizer's `model_max_length` when it is a real limit, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**12:
        return limit
    return DEFAULT_MAX_LENGTH


def encode_pair(tokenizer, context: str, continuation: str,
                context_cache: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a scored (context, continuation) pair, exactly as lm-eval's `TemplateLM` makes them.

    Trailing whitespace of the context moves to the continuation; the concatenation is encoded (BOS as the tokenizer
    adds it) and split after the ids of the context alone, so a SentencePiece continuation " A" after "Answer:" is
    the single piece "▁A" it is inside the full text, not "▁" + "▁A". An empty context becomes the BOS token.
    `context_cache` (context text -> ids) saves re-encoding a context shared by several continuations.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx, cont = ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = tokenizer.encode(context + continuation)
        ctx = context_cache.get(context) if context_cache is not None else None
        if ctx is None:
            ctx = tokenizer.encode(context)
            if context_cache is not None:
                context_cache[context] = ctx
        cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context ...{context[-40:]!r}")
    return ctx, cont


# ---------------------------------------------------------------------------------------------------------------------
# Log-likelihoods
# ---------------------------------------------------------------------------------------------------------------------

class _SharedPrefixLayer(DynamicLayer):
    """One layer of a read-only prefix cache: every forward sees `prefix + its own keys/values`, broadcast over the
    batch, and nothing is stored, so the same prefix serves every batch of its group."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # (1, n_kv, P, d)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch = key_states.shape[0]
        keys = torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2)  # (B, n_kv, P + S, d)
        values = torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2)
        return keys, values


@dataclass
class _Forward:
    """One distinct model input and the requests scored from it (lm-eval groups requests by context + cont[:-1])."""

    tokens: list[int]
    members: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation ids)

    @property
    def n_positions(self) -> int:  # trailing positions whose logits are needed
        return max(len(cont) for _, cont in self.members)


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   prefix_groups: Sequence[Hashable] | None = None, max_length: int | None = None,
                   share_prefix: bool = True, progress: bool = True,
                   desc: str = "log-likelihoods") -> list[tuple[float, bool]]:
    """`(sum of log p(continuation tokens | context), greedy)` per request, in request order.

    `greedy` is True when every continuation token is the argmax at its position. `prefix_groups` (one key per
    request, e.g. the MMLU subject) says which requests may share a cached common prefix; None puts all requests in
    one group. Sequences longer than `max_length + 1` (default: the model's context length) are cut from the left
    as lm-eval does, and logged. Log-softmax is taken in float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefix_groups is not None and len(prefix_groups) != len(requests):
        raise ValueError(f"prefix_groups has {len(prefix_groups)} entries for {len(requests)} requests")
    max_length = max_length or model_max_length(model, tokenizer)

    groups: dict[Hashable, dict[tuple[int, ...], _Forward]] = {}
    n_truncated, context_ids = 0, {}
    for i, (context, continuation) in enumerate(tqdm(requests, desc=f"{desc}: tokenizing", disable=not progress)):
        ctx, cont = encode_pair(tokenizer, context, continuation, context_ids)
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}")
        full = ctx + cont
        group = prefix_groups[i] if prefix_groups is not None else 0
        if len(full) > max_length + 1:
            full = full[-(max_length + 1):]
            n_truncated += 1
            group = _TRUNCATED
        tokens = full[:-1]
        fwd = groups.setdefault(group, {}).setdefault(tuple(tokens), _Forward(tokens))
        fwd.members.append((i, cont))
    if n_truncated:
        logger.warning("%d of %d requests exceed %d tokens and were cut from the left", n_truncated, len(requests),
                       max_length + 1)

    results: list[tuple[float, bool] | None] = [None] * len(requests)
    base, head = model.base_model, model.get_output_embeddings()
    device = next(model.parameters()).device
    bar = tqdm(total=len(requests), desc=desc, disable=not progress)
    for forwards in groups.values():
        fwds = list(forwards.values())
        shared = 0
        if share_prefix and len(fwds) > 1:
            # The positions whose logits are needed must stay in the per-row suffix.
            shared = min(_common_prefix_length([f.tokens for f in fwds]),
                         min(len(f.tokens) - f.n_positions for f in fwds))
            shared = shared if shared >= MIN_SHARED_PREFIX else 0
        prefix_kv = None
        if shared:
            out = base(input_ids=torch.tensor([fwds[0].tokens[:shared]], device=device), use_cache=True)
            prefix_kv = [(layer.keys, layer.values) for layer in getattr(out, CACHE_NAME).layers]
        # Longest first, as lm-eval: padding stays small and any out-of-memory error shows up at once.
        fwds.sort(key=lambda f: (-len(f.tokens), f.tokens))
        for start in range(0, len(fwds), batch_size):
            batch = fwds[start:start + batch_size]
            _score_batch(base, head, batch, shared, prefix_kv, device, results)
            bar.update(sum(len(f.members) for f in batch))
    bar.close()
    return results  # type: ignore[return-value]


def _score_batch(base, head, batch: list[_Forward], shared: int, prefix_kv, device, results) -> None:
    suffixes = [f.tokens[shared:] for f in batch]
    width = max(len(s) for s in suffixes)
    # Right padding: causal attention keeps real positions blind to it, so no attention mask is needed (as lm-eval).
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    for r, s in enumerate(suffixes):
        input_ids[r, :len(s)] = torch.tensor(s)
    input_ids = input_ids.to(device)
    position_ids = torch.arange(shared, shared + width, device=device)[None]  # (1, S)
    cache = Cache(layers=[_SharedPrefixLayer(k, v) for k, v in prefix_kv]) if prefix_kv else None
    hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=cache is not None,
                  **{CACHE_NAME: cache}).last_hidden_state  # (B, S, D)

    n_pos = max(f.n_positions for f in batch)
    # Row r needs the hidden states that predict its continuation: positions len - n_r .. len - 1 of its suffix.
    index = torch.zeros(len(batch), n_pos, dtype=torch.long)
    for r, (f, s) in enumerate(zip(batch, suffixes)):
        index[r, :f.n_positions] = torch.arange(len(s) - f.n_positions, len(s))
    index = index.to(device)
    selected = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, N, D)
    logprobs = F.log_softmax(head(selected).float(), dim=-1)  # (B, N, V)
    greedy = logprobs.argmax(-1)  # (B, N)
    for r, f in enumerate(batch):
        for i, cont in f.members:
            cols = torch.arange(f.n_positions - len(cont), f.n_positions, device=device)
            target = torch.tensor(cont, device=device)
            ll = logprobs[r, cols, target].sum().item()
            results[i] = (ll, bool((greedy[r, cols] == target).all()))


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------

def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any non-empty stop string (lm-eval's `postprocess_generated_text`)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


class _StopStrings(StoppingCriteria):
    """Marks a row finished once a stop string appears in the text it has generated (checked on a window of its
    last tokens wide enough to hold any stop string)."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, [s for s in stop if s], prompt_length
        self.window = max([len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop] + [1]) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_length:][:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


@dataclass
class TaskDecoding:
    """Decoding of a generation task as lm-evaluation-harness runs it (transformers' `generate`, stop strings):
    greedy by default (`temperature=0`). On an engine backend it becomes the sampler's `SamplingConfig`."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    def generation_config(self, tokenizer) -> GenerationConfig:
        special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, max_new_tokens=self.max_new_tokens)
        if self.temperature == 0:
            return GenerationConfig(do_sample=False, **special)
        # top_k=0: pure nucleus sampling as Meta's `sample_top_p` (transformers would otherwise add top-k 50).
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0, **special)


@torch.inference_mode()
def generate_until(model, tokenizer, contexts: Sequence[str], *, stop: Sequence[str],
                   sampling: TaskDecoding | None = None, batch_size: int = 8, max_length: int | None = None,
                   seed: int | None = None, progress: bool = True, desc: str = "generate",
                   sampler=None) -> list[str]:
    """Continuation text of each context, cut at the first stop string (the EOS string is always a stop string).

    Contexts are encoded as lm-eval does (tokenizer defaults, so BOS), sorted longest first, left-padded with the
    tokenizer's pad token and left-truncated to `max_length - max_new_tokens` tokens (logged). Decoding skips special
    tokens. `seed` seeds torch before the first batch so that sampled runs repeat.

    `sampler`: a `sampling.Sampler` on an engine over `model`'s weights (`sampling.engine_sampler`: vLLM) generates
    instead (the same encoded, truncated contexts; stop strings are applied to the decoded text afterwards, since the
    engine stops only at EOS; the call is seeded with `seed`).
    """
    sampling = sampling or TaskDecoding()
    if tokenizer.pad_token_id is None:
        raise ValueError("generate_until needs a tokenizer with a pad token (e.g. tokenizer.pad_token = unk_token)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    stop = list(stop) + ([eos] if eos not in stop else [])
    max_context = (max_length or model_max_length(model, tokenizer)) - sampling.max_new_tokens
    if max_context <= 0:
        raise ValueError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a context")
    encoded = [tokenizer.encode(c) for c in contexts]
    n_cut = sum(len(e) > max_context for e in encoded)
    if n_cut:
        logger.warning("%d of %d contexts exceed %d tokens and were cut from the left", n_cut, len(encoded),
                       max_context)
    encoded = [e[-max_context:] for e in encoded]
    if sampler is not None:
        config = sampler.with_config(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                     top_p=sampling.top_p, num_samples=1, prompt_batch_size=batch_size)
        out = sampler.sample_ids(encoded, config=config, seed=seed)
        return [truncate_at_stop(tokenizer.decode(r[0], skip_special_tokens=True), stop) for r in out.response_ids]
    order = sorted(range(len(contexts)), key=lambda i: (-len(encoded[i]), contexts[i]))
    gen_config = sampling.generation_config(tokenizer)
    # A chat model may end its turns with another token than the tokenizer's EOS: its generation config lists it.
    ends = end_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if ends != [tokenizer.eos_token_id]:
        gen_config.eos_token_id = ends
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    outputs: list[str | None] = [None] * len(contexts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attention_mask[r, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=gen_config,
                             stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer, stop, width)]))
        for r, i in enumerate(rows):
            text = tokenizer.decode(out[r, width:].tolist(), skip_special_tokens=True)
            outputs[i] = truncate_at_stop(text, stop)
    return outputs  # type: ignore[return-value]

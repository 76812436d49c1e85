"""The one sampling helper of the pipeline: batched, KV-cached, K samples per prompt from one prefill.

Every stage that samples from a policy (rejection sampling, PPO rollouts, Ghost Attention data, safety context
distillation, evaluation) goes through `generate` (token ids in, token ids out) or `generate_text` (chat messages in,
strings out), so that a faster backend can later be swapped in here, in one place.

How it works, per batch of prompts:
1. the prompts are left-padded and run through the model once (the prefill), filling a `DynamicCache`;
2. the cache, the last logits and the attention mask are repeated K times (`repeat_interleave`), so the K samples of a
   prompt share its prefill instead of recomputing it (what `generate(num_return_sequences=K)` does not do);
3. one token per row per step is sampled with Meta's semantics (`llama/generation.py`): logits / temperature,
   softmax, nucleus (top-p) filtering by sorted cumulative probability, renormalise, multinomial; temperature 0 is
   greedy;
4. a row stops at the EOS id; the batch stops when every row has, or after `max_new_tokens`.

Example:
    >>> cfg = SamplingConfig(max_new_tokens=64, temperature=1.0, top_p=0.9, num_samples=8)
    >>> out = generate(model, [encode_dialog(tok, [{"role": "user", "content": "Hi"}])], cfg)
    >>> out.response_ids[0][3]   # 4th sample of the 1st prompt, ending with EOS if it finished
    >>> texts = generate_text(model, tok, ["Hi", [{"role": "user", "content": "Bye"}]], cfg)  # [prompt][sample]

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) wrap the calls in `full_weights_for_generation(model)`: the
paper's fix for slow sharded generation (gather the full weights once, generate, free them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Messages = list[dict]
Prompt = str | Sequence[dict]


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
class GenerationOutput:
    """Sampled responses, indexed `[prompt][sample]`, in the order the prompts were given.

    `response_ids[i][k]` holds only the generated tokens (no prompt, no padding), ending with the EOS id when the
    sample finished; `finished[i][k]` is False when it was cut at `max_new_tokens` instead.
    """

    response_ids: list[list[list[int]]]
    finished: list[list[bool]]


def as_messages(prompt: Prompt) -> Messages:
    """A chat prompt as a message list: a plain string becomes one user message; a message list is copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r}")


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling exactly as Meta's `sample_top_p`: (N, V) probabilities -> (N,) token ids.

    Sort descending, zero every token whose preceding cumulative mass already exceeds top_p (so the token that
    crosses the threshold is kept), renormalise, draw one token.
    """
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # (N, 1)
    return torch.gather(sorted_idx, -1, choice).squeeze(-1)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (N, V) logits: greedy at temperature 0, else softmax(logits / T) with top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        return sample_top_p(probs, top_p, generator)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _generation_ids(model: torch.nn.Module, eos_token_id: int | Sequence[int] | None,
                    pad_token_id: int | None) -> tuple[list[int], int]:
    config = getattr(model, "config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if eos is None:
        raise ValueError("no EOS id: pass eos_token_id or set model.config.eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    # Padding ids are never attended to (the attention mask hides them); any id of the vocabulary does.
    return eos_ids, 0 if pad is None else pad


@torch.no_grad()
def _generate_batch(model, prompts: list[list[int]], config: SamplingConfig, eos_ids: list[int], pad_id: int,
                    max_context: int | None, generator: torch.Generator | None) -> tuple[list[list[int]], list[bool]]:
    """Decode K samples for each of a few prompts; rows come out prompt-major (prompt i, sample k at i*K + k)."""
    device = _model_device(model)
    k = config.num_samples
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
        input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long, device=device)
        attention_mask[i, length - len(ids):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (n, L): positions restart after the padding

    max_new = config.max_new_tokens
    if max_context is not None:
        max_new = min(max_new, max_context - length)

    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    if k > 1:  # share the prefill: copy the cache K times instead of recomputing it
        cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].repeat_interleave(k, dim=0)  # (n*K, V)
    attention_mask = attention_mask.repeat_interleave(k, dim=0)  # (n*K, L)
    next_position = position_ids[:, -1:].repeat_interleave(k, dim=0) + 1  # (n*K, 1)

    rows = logits.shape[0]
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new):
        token = sample_next_token(logits, config.temperature, config.top_p, generator)
        token = token.masked_fill(done, pad_id)  # (n*K,)
        tokens.append(token)
        done = done | torch.isin(token, eos)
        if bool(done.all()) or step == max_new - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        next_position = next_position + 1

    generated = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(rows)]  # (n*K, T)
    eos_set = set(eos_ids)
    responses, finished = [], []
    for row in generated:
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos_set), None)
        responses.append(row if end is None else row[:end])
        finished.append(end is not None)
    return responses, finished


def generate(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], config: SamplingConfig | None = None, *,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, progress: bool = False) -> GenerationOutput:
    """Sample `config.num_samples` responses for every prompt.

    Args:
        model: a causal LM returning `.logits` and `.past_key_values` (any transformers decoder, a peft model).
            Put it in eval mode yourself if it has dropout; its device is used for every tensor.
        prompt_ids: token ids of each prompt, e.g. `encode_dialog(tokenizer, messages)` (ends after `[/INST]`).
        config: sampling settings (`SamplingConfig()` if None).
        eos_token_id: id(s) that end a sample; default `model.config.eos_token_id`.
        pad_token_id: id used for padding rows; default `model.config.pad_token_id`, else 0.
        generator: a `torch.Generator` on the model's device, for reproducible sampling.
        progress: show a progress bar over prompt batches.

    Prompts are processed in batches of `config.prompt_batch_size`, longest first (less padding), and returned in
    the input order. A prompt longer than the model's context raises ValueError; generation stops at the context.
    """
    config = config or SamplingConfig()
    eos_ids, pad_id = _generation_ids(model, eos_token_id, pad_token_id)
    max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompts = [list(p) for p in prompt_ids]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt_ids[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        if max_context is not None and len(ids) >= max_context:
            raise ValueError(f"prompt_ids[{i}] has {len(ids)} tokens, no room left in the model's context of "
                             f"{max_context}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: list[list[list[int]] | None] = [None] * len(prompts)
    finished: list[list[bool] | None] = [None] * len(prompts)
    k = config.num_samples
    batches = [order[s: s + config.prompt_batch_size] for s in range(0, len(order), config.prompt_batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress):
        ids, done = _generate_batch(model, [prompts[i] for i in batch], config, eos_ids, pad_id, max_context,
                                    generator)
        for j, i in enumerate(batch):
            responses[i] = ids[j * k: (j + 1) * k]
            finished[i] = done[j * k: (j + 1) * k]
    return GenerationOutput(response_ids=responses, finished=finished)


def generate_text(model: torch.nn.Module, tokenizer, prompts: Sequence[Prompt], config: SamplingConfig | None = None,
                  *, generator: torch.Generator | None = None, progress: bool = False) -> list[list[str]]:
    """Chat prompts in, decoded answers out, indexed `[prompt][sample]`.

    Each prompt is a string (one user message) or a message list ending with a user turn; its ids are Meta's chat
    format (`encode_dialog`). Answers are decoded without special tokens and stripped, as Meta's `chat_completion`.
    """
    from .tokenization_llama2 import encode_dialog

    ids = [encode_dialog(tokenizer, as_messages(p)) for p in prompts]
    out = generate(model, ids, config, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   generator=generator, progress=progress)
    return [[tokenizer.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in out.response_ids]


@contextlib.contextmanager
def full_weights_for_generation(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Gather the full weights of an FSDP2-sharded model once for generation, free them on exit (paper §3.2.3).

    Sharded generation all-gathers every layer at every decoding step (the paper measured ~20x slower); here every
    `FSDPModule` in `model` is unsharded once and told not to reshard after its forward, then resharded and
    restored on exit. Needs the memory of one full copy of the weights per rank. A model without FSDP2 modules
    passes through unchanged. FSDP1 (`FullyShardedDataParallel`) is not handled: its forward keeps gathering per
    layer (correct, just slow).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        yield model
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield model
        return
    saved = []
    for module in modules:
        state = module._get_fsdp_state()
        # Private fields: the public setter can only set, not read, whether a module reshards after forward.
        saved.append((state._auto_reshard_after_forward,
                      [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        for module, (auto, infos) in zip(modules, saved):
            module.reshard()
            state = module._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info


__all__ = [
    "SamplingConfig", "GenerationOutput", "as_messages", "sample_top_p", "sample_next_token", "generate",
    "generate_text", "full_weights_for_generation",
]

"""The PyTorch decoding kernel of the package: batched, KV-cached, K samples per prompt from one prefill.

The sampling sites do not call it directly: they hold a `sampling.Sampler`, whose PyTorch backend
(`sampling.torch_backend.TorchSampler`) runs `generate` (token ids in, token ids out); `generate_text` (chat
messages in, strings out) is the short path for scripts and notebooks.

How it works, per batch of prompts:
1. the prompts are left-padded and run through the model once (the prefill), filling a `DynamicCache`;
2. the cache, the last logits and the attention mask are repeated K times (`repeat_interleave`), so the K samples of a
   prompt share its prefill instead of recomputing it (what `generate(num_return_sequences=K)` does not do);
3. one token per row per step is sampled with Meta's semantics (`llama/generation.py`): logits / temperature,
   softmax, nucleus (top-p) filtering by sorted cumulative probability, renormalise, draw one token; temperature 0 is
   greedy. The draw inverts the cumulative distribution with one uniform number per row (`sample_categorical`)
   instead of `torch.multinomial`'s single-sample path, which draws one exponential number per vocabulary entry
   (measured on one CPU core, 32 rows x 32k vocabulary: 35 ms per step against about 1 ms);
4. a row stops at the EOS id; the batch stops when every row has, or after `max_new_tokens`.

With `return_logprobs=True` each sampled token also comes with its log-probability under `softmax(logits / T)` (the
policy at the sampling temperature, before any top-p truncation; T = 1 for greedy decoding) and that distribution's
entropy, taken from the decoding step's own logits: what PPO needs as the rollout policy's log-probabilities, without
a second forward pass over the responses.

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

from .errors import UsageError
from .modeling_llama2 import CACHE_NAME
from .sampling.config import SamplingConfig

logger = logging.getLogger(__name__)

Messages = list[dict]
Prompt = str | Sequence[dict]


class PromptTooLong(UsageError):
    """A prompt that fills the model's context: nothing can be generated after it. A user's data error (one line on
    the command line); stages that read prompt files name the file and line before sampling."""


@dataclass
class GenerationOutput:
    """Sampled responses, indexed `[prompt][sample]`, in the order the prompts were given.

    `response_ids[i][k]` holds only the generated tokens (no prompt, no padding), ending with the EOS id when the
    sample finished; `finished[i][k]` is False when it was cut at `max_new_tokens` instead. With
    `generate(..., return_logprobs=True)`, `logprobs[i][k]` and `entropy[i][k]` are float32 CPU tensors of the
    response's length: each token's log-probability under `log_softmax(logits / T)` at its step and that
    distribution's entropy (None otherwise).
    """

    response_ids: list[list[list[int]]]
    finished: list[list[bool]]
    logprobs: list[list[torch.Tensor]] | None = None
    entropy: list[list[torch.Tensor]] | None = None


def as_messages(prompt: Prompt) -> Messages:
    """A chat prompt as a message list: a plain string becomes one user message; a message list is copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r}")


_SAMPLING_BLOCK = 256
"""Vocabulary entries per block of `sample_categorical`'s two-level search."""


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of (N, V) non-negative weights (normalised or not) -> (N,) token ids.

    Inverse transform sampling with one uniform number u in [0, total) per row, in two levels so that no
    vocabulary-sized cumulative sum is built: the weights are summed per block of 256 entries, u picks a block on the
    blocks' cumulative sum, then the rest of u picks a token on that block's own cumulative sum (both cumulative sums
    in float64 where the device has it, so a 1e-9 probability keeps its share). A token of weight 0 is never drawn.
    The distribution is `torch.multinomial(probs, 1)`'s; the random stream is not (one uniform number per row instead
    of one exponential number per vocabulary entry, which was most of the time of a decoding step on CPU).
    """
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    n, vocab = probs.shape
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    block = min(_SAMPLING_BLOCK, vocab)
    n_blocks = -(-vocab // block)
    padded = probs if vocab % block == 0 else torch.nn.functional.pad(probs, (0, n_blocks * block - vocab))
    blocks = padded.view(n, n_blocks, block)
    mass = blocks.sum(-1).to(dtype)  # (N, n_blocks)
    cdf = mass.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        raise ValueError("sampling weights must be finite, non-negative and not all zero in every row")
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=dtype) * total  # (N, 1)
    # right=True: the first index whose cumulative mass exceeds u, so a block (token) of weight 0 is never chosen.
    chosen = torch.searchsorted(cdf, u, right=True).clamp_(max=n_blocks - 1)  # (N, 1)
    u = (u - (cdf.gather(1, chosen) - mass.gather(1, chosen))).clamp_(min=0)  # u's rest inside the block
    inner = blocks.gather(1, chosen[:, :, None].expand(n, 1, block)).squeeze(1).cumsum(-1, dtype=dtype)
    token = torch.searchsorted(inner, u, right=True)
    # Rounding can leave u at the block's total: take the block's last token of positive weight, never padding.
    token = torch.minimum(token, (inner < inner[:, -1:]).sum(-1, keepdim=True))
    return (chosen * block + token).squeeze(-1)


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling with Meta's `sample_top_p` semantics: (N, V) probabilities -> (N,) token ids.

    Sort descending, zero every token whose preceding cumulative mass already exceeds top_p (so the token that
    crosses the threshold is kept), renormalise, draw one token.
    """
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)
    choice = sample_categorical(sorted_probs, generator)  # renormalised by the draw itself
    return torch.gather(sorted_idx, -1, choice[:, None]).squeeze(-1)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (N, V) logits: greedy at temperature 0, else softmax(logits / T) with top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    return _draw(torch.softmax(logits.float() / temperature, dim=-1), top_p, generator)


def _draw(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (N, V) probabilities, with top-p when top_p < 1."""
    if top_p < 1.0:
        return sample_top_p(probs, top_p, generator)
    return sample_categorical(probs, generator)


def sample_next_token_with_logprobs(logits: torch.Tensor, temperature: float, top_p: float,
                                    generator: torch.Generator | None = None, with_entropy: bool = True
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`sample_next_token`, plus each drawn token's log-probability (N,) and the entropy (N,) (None unless
    `with_entropy`) of `softmax(logits / T)`: the untruncated distribution at the sampling temperature, whatever
    top_p (nucleus filtering only changes which tokens can be drawn), and at T = 1 for greedy decoding. All float32,
    from one log-softmax of the step's logits; the draw consumes the generator exactly as `sample_next_token`."""
    z = logits.float()
    if temperature not in (0.0, 1.0):
        z = z / temperature
    logp = torch.log_softmax(z, dim=-1)  # (N, V)
    probs = logp.exp()
    token = logits.argmax(-1) if temperature == 0 else _draw(probs, top_p, generator)
    token_logp = logp.gather(-1, token[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -torch.linalg.vecdot(probs, logp)  # -sum p log p
        if bool(entropy.isnan().any()):  # a -inf logit: its p = 0 adds 0, not 0 * -inf = NaN
            entropy = -torch.linalg.vecdot(probs, logp.clamp(min=torch.finfo(logp.dtype).min))
    return token, token_logp, entropy


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
                    max_context: int | None, generator: torch.Generator | None, return_logprobs: bool = False):
    """Decode K samples for each of a few prompts; rows come out prompt-major (prompt i, sample k at i*K + k).

    Returns (responses, finished), plus per-row float32 CPU tensors of the tokens' log-probabilities and entropies
    when `return_logprobs`."""
    device = _model_device(model)
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

    with _decoding_head(model):
        return _decode(model, input_ids, attention_mask, position_ids, config, eos_ids, pad_id, max_new, generator,
                       return_logprobs)


@contextlib.contextmanager
def _decoding_head(model) -> Iterator[None]:
    """On CPU, run a plain bias-free `nn.Linear` LM head as `torch.mm(weight, x.T).T` while decoding: the same
    product, which MKL computes faster for a few rows against a large vocabulary than `F.linear`'s layout (measured
    on one core, 32 rows x 256 -> 32,000: 22 ms against 29 ms, most of a decoding step). Any other head (a LoRA or
    quantised layer, a bias, a sharded weight) and other devices are left as they are."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if (type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head)
            or type(head.weight) not in (torch.nn.Parameter, torch.Tensor) or head.weight.device.type != "cpu"):
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return torch.mm(head.weight, rows.t()).t().contiguous().view(*x.shape[:-1], -1)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            config: SamplingConfig, eos_ids: list[int], pad_id: int, max_new: int, generator: torch.Generator | None,
            return_logprobs: bool):
    """`_generate_batch` after its inputs are built: prefill, then one sampled token per row per step."""
    device = input_ids.device
    k = config.num_samples
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, CACHE_NAME)
    if k > 1:  # share the prefill: copy the cache K times instead of recomputing it
        cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].repeat_interleave(k, dim=0)  # (n*K, V)
    attention_mask = attention_mask.repeat_interleave(k, dim=0)  # (n*K, L)
    next_position = position_ids[:, -1:].repeat_interleave(k, dim=0) + 1  # (n*K, 1)

    rows = logits.shape[0]
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logprobs, entropies = [], [], []
    for step in range(max_new):
        if return_logprobs:
            token, logp, entropy = sample_next_token_with_logprobs(logits, config.temperature, config.top_p,
                                                                   generator)
            logprobs.append(logp.masked_fill(done, 0.0))
            entropies.append(entropy.masked_fill(done, 0.0))
        else:
            token = sample_next_token(logits, config.temperature, config.top_p, generator)
        token = token.masked_fill(done, pad_id)  # (n*K,)
        tokens.append(token)
        done = done | torch.isin(token, eos)
        if bool(done.all()) or step == max_new - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **{CACHE_NAME: cache})
        cache = getattr(out, CACHE_NAME)
        logits = out.logits[:, -1]
        next_position = next_position + 1

    generated = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(rows)]  # (n*K, T)
    eos_set = set(eos_ids)
    responses, finished = [], []
    for row in generated:
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos_set), None)
        responses.append(row if end is None else row[:end])
        finished.append(end is not None)
    if not return_logprobs:
        return responses, finished
    logprobs = torch.stack(logprobs, dim=1).cpu() if logprobs else torch.zeros(rows, 0)  # (n*K, T)
    entropies = torch.stack(entropies, dim=1).cpu() if entropies else torch.zeros(rows, 0)
    return (responses, finished, [logprobs[i, :len(r)] for i, r in enumerate(responses)],
            [entropies[i, :len(r)] for i, r in enumerate(responses)])


def generate(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], config: SamplingConfig | None = None, *,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, progress: bool = False,
             return_logprobs: bool = False) -> GenerationOutput:
    """Sample `config.num_samples` responses for every prompt.

    Args:
        model: a causal LM returning `.logits` and its KV cache (`.past_key_values`, `.cache` from transformers
            5.25: any transformers decoder, a peft model).
            Put it in eval mode yourself if it has dropout; its device is used for every tensor.
        prompt_ids: token ids of each prompt, e.g. `encode_dialog(tokenizer, messages)` (ends after `[/INST]`).
        config: sampling settings (`SamplingConfig()` if None).
        eos_token_id: id(s) that end a sample; default `model.config.eos_token_id`.
        pad_token_id: id used for padding rows; default `model.config.pad_token_id`, else 0.
        generator: a `torch.Generator` on the model's device, for reproducible sampling.
        progress: show a progress bar over prompt batches.
        return_logprobs: also return each token's log-probability under `log_softmax(logits / T)` (T = 1 when
            greedy; before top-p) and the entropy of that distribution (`GenerationOutput.logprobs`, `.entropy`),
            computed from the decoding step's logits.

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
            raise PromptTooLong(f"prompt_ids[{i}] has {len(ids)} tokens, no room left in the model's context of "
                                f"{max_context} (shorten or drop the prompt)")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: list[list[list[int]] | None] = [None] * len(prompts)
    finished: list[list[bool] | None] = [None] * len(prompts)
    logprobs: list[list[torch.Tensor] | None] | None = [None] * len(prompts) if return_logprobs else None
    entropy: list[list[torch.Tensor] | None] | None = [None] * len(prompts) if return_logprobs else None
    k = config.num_samples
    batches = [order[s: s + config.prompt_batch_size] for s in range(0, len(order), config.prompt_batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress):
        out = _generate_batch(model, [prompts[i] for i in batch], config, eos_ids, pad_id, max_context, generator,
                              return_logprobs)
        for j, i in enumerate(batch):
            rows = slice(j * k, (j + 1) * k)
            responses[i], finished[i] = out[0][rows], out[1][rows]
            if return_logprobs:
                logprobs[i], entropy[i] = out[2][rows], out[3][rows]
    return GenerationOutput(response_ids=responses, finished=finished, logprobs=logprobs, entropy=entropy)


def generate_text(model: torch.nn.Module, tokenizer, prompts: Sequence[Prompt], config: SamplingConfig | None = None,
                  *, generator: torch.Generator | None = None, progress: bool = False) -> list[list[str]]:
    """Chat prompts in, decoded answers out, indexed `[prompt][sample]`.

    Each prompt is a string (one user message) or a message list ending with a user turn; its ids are the
    tokenizer's chat format (`chat_format.chat_format_for`: Meta's for Llama 2). Answers are decoded without special
    tokens and stripped, as Meta's `chat_completion`.
    """
    from .chat_format import chat_format_for

    chat_format = chat_format_for(tokenizer)
    ids = [chat_format.prompt_ids(as_messages(p)) for p in prompts]
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
    "SamplingConfig", "GenerationOutput", "PromptTooLong", "Messages", "Prompt", "as_messages", "sample_categorical",
    "sample_top_p", "sample_next_token", "sample_next_token_with_logprobs", "generate", "generate_text",
    "full_weights_for_generation",
]

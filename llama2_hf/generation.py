"""The one sampling helper of the pipeline: batched, KV-cached, K samples per prompt from one prefill.

Every stage that samples from a policy (rejection sampling, PPO rollouts, Ghost Attention data, safety context
distillation, evaluation) goes through `generate` (token ids in, token ids out) or `generate_text` (chat messages in,
strings out), so that a faster backend can later be swapped in here, in one place.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import progress
from .errors import UsageError
from .modeling_llama2 import CACHE_NAME

logger = logging.getLogger(__name__)

Messages = list[dict]
Prompt = str | Sequence[dict]


class PromptTooLong(UsageError):
    """A prompt that fills the model's context: nothing can be generated after it. A user's data error (one line on
    the command line); stages that read prompt files name the file and line before sampling."""


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
class ChatSamplingArguments:
    """Sampling settings of a stage that answers chat conversations once each (GAtt, distillation, refusals): the
    command-line face of `SamplingConfig` with `num_samples=1`. Defaults: Meta's chat defaults."""

    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per answer (EOS included)."})
    temperature: float = field(default=0.6, metadata={
        "help": "Softmax temperature (0 = greedy). 0.6 / top-p 0.9: Meta's chat_completion defaults."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold (1.0 disables it)."})
    prompt_batch_size: int = field(default=8, metadata={"help": "Conversations per generation forward pass."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})

    def __post_init__(self) -> None:
        self.sampling_config()  # the same checks as SamplingConfig, at parse time

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              num_samples=1, prompt_batch_size=self.prompt_batch_size)


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


def is_engine(model) -> bool:
    """True for a generation engine (`VLLMEngine`) rather than a PyTorch model: it samples with per-prompt seeds."""
    return callable(getattr(model, "generate_output", None))


def engine_seeds(generator: torch.Generator | None, n: int) -> list[int] | None:
    """Per-prompt seeds for an engine, drawn from the caller's seeded generator: a stage that reseeds its generator
    per chunk of work gets the same samples for the same rows on either backend's resume. None: unseeded."""
    if generator is None:
        return None
    return torch.randint(0, 2 ** 62, (n,), generator=generator, device=generator.device).tolist()


def _model_device(model: torch.nn.Module) -> torch.device:
    if is_engine(model):  # an engine runs in its own process; the caller's tensors stay on the CPU
        return torch.device("cpu")
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
             seeds: Sequence[int] | None = None, return_logprobs: bool = False) -> GenerationOutput:
    """Sample `config.num_samples` responses for every prompt.

    Args:
        model: a causal LM returning `.logits` and its KV cache (`.past_key_values`, `.cache` from transformers
            5.25: any transformers decoder, a peft model).
            Put it in eval mode yourself if it has dropout; its device is used for every tensor. Or a running
            `VLLMEngine`: the prompts go to vLLM, seeded per prompt (`seeds`, else drawn from `generator`).
        prompt_ids: token ids of each prompt, e.g. `encode_dialog(tokenizer, messages)` (ends after `[/INST]`).
        config: sampling settings (`SamplingConfig()` if None).
        eos_token_id: id(s) that end a sample; default `model.config.eos_token_id`.
        pad_token_id: id used for padding rows; default `model.config.pad_token_id`, else 0.
        generator: a `torch.Generator` on the model's device, for reproducible sampling.
        progress: show a progress bar over prompt batches.
        seeds: engine only: one seed per prompt (its K samples use seed, seed+1, ... inside vLLM).
        return_logprobs: also return each token's log-probability under `log_softmax(logits / T)` (T = 1 when
            greedy; before top-p) and the entropy of that distribution (`GenerationOutput.logprobs`, `.entropy`),
            computed from the decoding step's logits. PyTorch models only (an engine raises ValueError).

    Prompts are processed in batches of `config.prompt_batch_size`, longest first (less padding), and returned in
    the input order. A prompt longer than the model's context raises ValueError; generation stops at the context.
    """
    config = config or SamplingConfig()
    if is_engine(model):
        if return_logprobs:
            raise ValueError("return_logprobs is for PyTorch models: an engine's samples come without them")
        if seeds is None:
            seeds = engine_seeds(generator, len(prompt_ids))
        return model.generate_output(prompt_ids, config, seeds=seeds, eos_token_id=eos_token_id)
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


# ---------------------------------------------------------------------------------------------------------------------
# Chat samplers: one answer per conversation, and turn-by-turn rollouts of many dialogues
# ---------------------------------------------------------------------------------------------------------------------

Sampler = Callable[[list[Messages]], list[str]]
"""`sampler(conversations) -> one answer per conversation`; each conversation ends with a user message."""


class ChatSampler:
    """Answers a batch of chat conversations with a causal LM through the pipeline's `generation.generate_text`.

    `config` is a `generation.SamplingConfig` with `num_samples=1` (default: Meta's chat defaults, temperature 0.6,
    top-p 0.9; temperature 0 is greedy). Also counts prompt tokens (`count_tokens`) and knows the model's context
    (`max_length`), so turn-by-turn rollouts can stop at the context length.
    """

    def __init__(self, model, tokenizer, config=None, seed: int | None = None, progress: bool = False):
        self.config = config if config is not None else SamplingConfig()
        if self.config.num_samples != 1:
            raise ValueError(f"ChatSampler answers once per conversation: num_samples must be 1, got "
                             f"{self.config.num_samples}")
        self.model = model if is_engine(model) else model.eval()  # an engine: see `generate`
        self.tokenizer = tokenizer
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=_model_device(model)).manual_seed(seed)
        self.progress = progress

    def reseed(self, seed: int) -> None:
        """Restart the random stream at `seed`: a stage reseeds per chunk of work (seed + the chunk's first row), so
        a resumed or rank-split run draws the same samples for the same rows."""
        self.generator = torch.Generator(device=_model_device(self.model)).manual_seed(seed)

    @classmethod
    def from_pretrained(cls, model_dir: str, tokenizer_dir: str | None = None, config=None,
                        **kwargs) -> "ChatSampler":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        return cls(model, tokenizer, config, **kwargs)

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def count_tokens(self, messages: Messages) -> int:
        from .tokenization_llama2 import encode_dialog

        return len(encode_dialog(self.tokenizer, messages))

    def __call__(self, conversations: list[Messages]) -> list[str]:
        if not conversations:
            return []
        out = generate_text(self.model, self.tokenizer, conversations, self.config, generator=self.generator,
                            progress=self.progress)
        return [samples[0] for samples in out]


def rollout(sampler: Sampler, num_turns: Sequence[int], build_messages: Callable[[int, int, list[str]], Messages],
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


__all__ = [
    "SamplingConfig", "GenerationOutput", "PromptTooLong", "as_messages", "is_engine", "engine_seeds", "sample_categorical",
    "sample_top_p", "sample_next_token", "sample_next_token_with_logprobs", "generate", "generate_text",
    "full_weights_for_generation", "ChatSamplingArguments", "ChatSampler", "Sampler", "rollout", "sampler_limits",
]

"""Llama 2 decoder, causal-LM head and the paper's scalar reward head.

The maths is Meta's `llama/model.py` (pre-norm RMSNorm, SwiGLU, RoPE with theta 10000, GQA by repeating K/V heads,
no biases, untied output projection), written in transformers' rotate-half RoPE layout so that the parameter names and
tensors of a `meta-llama/Llama-2-*-hf` checkpoint load unchanged. Attention kernels (eager / sdpa / flex / flash),
masks (causal, padding, packed rows), the KV cache and `generate()` are transformers' own, plugged in by name.

This file is copied next to the weights by `save_pretrained`: it imports only torch, transformers and its siblings
`configuration_llama2` and `fused_linear_ce` (relative imports, which `save_pretrained` copies along).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_llama2 import Llama2Config
from .fused_linear_ce import causal_lm_loss

logger = logging.get_logger(__name__)

# transformers 5.25 renamed the KV cache `past_key_values` -> `cache`: in model outputs and in the arguments `generate`
# passes (the old name is deprecated until 5.40, earlier releases know only it). The name of the installed version,
# told by the output class itself: the models here take either name and return the cache under this one.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The KV cache given under either name (see `CACHE_NAME`); both at once must be the same object."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`")
    return cache if cache is not None else past_key_values


class Llama2RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * weight`, normalised in float32 as Meta's code does."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = self.weight.shape
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused kernel (same maths in fp32), and fewer tensors kept for backward.
            return F.rms_norm(hidden_states, shape, self.weight, self.variance_epsilon)
        # Lower precision: normalise in fp32, round to the input dtype, then scale, as Meta's code rounds.
        normed = F.rms_norm(hidden_states.float(), shape, eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Llama2RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions.

    The class name, `original_inv_freq` and `compute_default_rope_parameters` are what transformers' weight
    initialisation looks for to rebuild `inv_freq` after loading (it is a non-persistent buffer).
    """

    inv_freq: torch.Tensor

    def __init__(self, config: Llama2Config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: Llama2Config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """`1 / theta^(2i/d)` for i < d/2: Meta's `precompute_freqs_cis` frequencies."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                                   / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 whatever the model dtype: bf16 positions lose integer precision past 256.
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): rotate-half layout
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def fold_rotation_sign(sin: torch.Tensor) -> torch.Tensor:
    """(s1, s2) -> (-s1, s2), done once per forward.

    The rotate-half term `cat(-x2, x1) * sin` equals `cat(x2, x1) * cat(-s1, s2)` bit for bit (negation is exact), so
    each layer rotates with one `roll` instead of chunk + neg + cat.
    """
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, heads, T, d) by the angles of their positions: `x * cos + cat(-x2, x1) * sin`.

    cos/signed_sin are (B, T, d), the sine passed through `fold_rotation_sign`.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    signed_sin = signed_sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, dims=-1) * signed_sin, k * cos + k.roll(half, dims=-1) * signed_sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, d) -> (B, n_kv * n_rep, T, d), each KV head repeated for its group of query heads."""
    if n_rep == 1:
        return hidden_states
    batch, n_kv, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, n_kv, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, n_kv * n_rep, seq_len, head_dim)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Reference attention: softmax in float32 over an additive mask, as Meta's `Attention.forward`."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)  # (B, nh, T, d)
    return out.transpose(1, 2).contiguous(), probs  # (B, T, nh, d)


class Llama2Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings (MHA when num_key_value_heads == num_attention_heads)."""

    def __init__(self, config: Llama2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values: Cache | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]  # (B, T)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nh, T, d)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, n_kv, T, d)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, n_kv, T, d)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * d)
        return self.o_proj(attn_output), attn_weights


class Llama2MLP(nn.Module):
    """SwiGLU feed-forward: `w2(silu(w1 x) * w3 x)` with w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, config: Llama2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Llama2DecoderLayer(GradientCheckpointingLayer):
    """`h = x + attn(norm(x)); out = h + mlp(norm(h))`."""

    def __init__(self, config: Llama2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Llama2Attention(config, layer_idx)
        self.mlp = Llama2MLP(config)
        self.input_layernorm = Llama2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Llama2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                past_key_values: Cache | None = None, **kwargs) -> torch.Tensor:
        attn_out, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Llama2PreTrainedModel(PreTrainedModel):
    config: Llama2Config
    config_class = Llama2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": Llama2DecoderLayer,
        "attentions": Llama2Attention,
    }


class Llama2Model(Llama2PreTrainedModel):
    """The decoder stack: embeddings, N decoder layers, final RMSNorm. Returns the normed hidden states."""

    def __init__(self, config: Llama2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Llama2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Llama2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                cache: Cache | None = None, **kwargs) -> BaseModelOutputWithPast:
        """`position_ids` that restart at 0 inside a row mark packed samples: with no cache, transformers builds a
        block-diagonal causal mask from them, so packed samples do not attend to each other. The KV cache comes as
        `past_key_values` or `cache` (transformers >= 5.25 `generate`) and goes out under `CACHE_NAME`."""
        past_key_values = one_cache(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        # The cache goes in by position: its keyword is `past_key_values` before transformers 5.25, `cache` after.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids=position_ids)
        position_embeddings = (cos, fold_rotation_sign(sin))  # the form apply_rotary_pos_emb takes
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings,
                                  position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                  **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: past_key_values})


class Llama2ForCausalLM(Llama2PreTrainedModel, GenerationMixin):
    """Llama 2 with its (untied) next-token projection. Loads `meta-llama/Llama-2-*-hf` checkpoints as they are."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Llama2Config):
        super().__init__(config)
        self.model = Llama2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                fused_loss: bool | None = None, cache: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """`labels` are the input ids with -100 where no loss is taken; they are shifted inside the loss
        (`shift_labels`, `num_items_in_batch` and `ignore_index` are taken as transformers' `ForCausalLMLoss` takes
        them). `logits_to_keep=k` computes logits for the last k positions only (1 during generation).

        With labels, `fused_loss` (default: `config.fused_lm_loss` in training mode, off in eval mode) computes the
        loss chunk by chunk without the (B, T, V) logits: the output's `logits` is then None."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=one_cache(past_key_values, cache), inputs_embeds=inputs_embeds, use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if fused_loss is None:
            fused_loss = self.config.fused_lm_loss and self.training
        logits = loss = None
        if labels is not None and fused_loss and self._head_is_plain_linear():
            loss = causal_lm_loss(hidden_states[:, keep, :], self.lm_head.weight, labels,
                                  num_items_in_batch=kwargs.get("num_items_in_batch"),
                                  ignore_index=kwargs.get("ignore_index", -100),
                                  shift_labels=kwargs.get("shift_labels"))
        else:
            logits = self.lm_head(hidden_states[:, keep, :])  # (B, T_keep, V)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions, **{CACHE_NAME: getattr(outputs, CACHE_NAME)})

    def _head_is_plain_linear(self) -> bool:
        """Whether `lm_head.weight` is the whole projection. A PEFT-wrapped, quantised or tensor-parallel (DTensor)
        head is only correct through its own forward, so the loss then falls back to the full logits."""
        weight = getattr(self.lm_head, "weight", None)
        plain = type(self.lm_head) is nn.Linear and type(weight) in (nn.Parameter, torch.Tensor)
        if not plain and not getattr(self, "_warned_unfused_head", False):
            self._warned_unfused_head = True
            logger.warning("lm_head is %s (weight %s): the LM loss is computed from the full logits, not in chunks",
                           type(self.lm_head).__name__, type(weight).__name__)
        return plain


def last_token_index(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     pad_token_id: int | None, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Index of the last real (non-pad) token of each row, for left or right padding.

    Uses the attention mask when given, else the pad id; with neither, every row is taken as full.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.to(device=device, dtype=torch.int64)
    elif input_ids is not None and pad_token_id is not None:
        mask = (input_ids != pad_token_id).to(device=device, dtype=torch.int64)
    else:
        return torch.full((batch_size,), seq_len - 1, device=device, dtype=torch.long)
    positions = torch.arange(seq_len, device=device, dtype=torch.int64)
    # Rightmost position whose mask is 1; an all-pad row gives 0.
    return (positions * mask).argmax(-1)


class Llama2ForSequenceClassification(Llama2PreTrainedModel):
    """Llama 2 with a linear head read at the last non-pad token (`AutoModelForSequenceClassification`).

    With `num_labels=1` this is the paper's reward model: the next-token head of a chat checkpoint replaced by a
    scalar regression head. `from_pretrained(causal_lm_dir, num_labels=1)` keeps the decoder and initialises `score`.
    """

    def __init__(self, config: Llama2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        # Built directly (not via AutoModel.from_config) so that remote-code loading needs no second trust prompt.
        self.model = Llama2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, cache: Cache | None = None,
                **kwargs) -> SequenceClassifierOutputWithPast:
        """`logits` is (B, num_labels), read at each row's last non-pad token."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=one_cache(past_key_values, cache), inputs_embeds=inputs_embeds, use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, D)
        batch_size, seq_len = hidden_states.shape[:2]
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id, batch_size, seq_len,
                                hidden_states.device)
        pooled = hidden_states[torch.arange(batch_size, device=hidden_states.device), last]  # (B, D)
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                                attentions=outputs.attentions,
                                                **{CACHE_NAME: getattr(outputs, CACHE_NAME)})


class Llama2ForRewardModel(Llama2ForSequenceClassification):
    """The paper's reward model: one scalar per sequence (`num_labels` is always 1).

    Same parameters and checkpoint layout as `Llama2ForSequenceClassification(num_labels=1)`, so TRL's
    `RewardTrainer` and `AutoModelForSequenceClassification` use the same weights.
    """

    def __init__(self, config: Llama2Config):
        if config.num_labels != 1:
            config.num_labels = 1
        config.problem_type = "regression"
        super().__init__(config)

    @torch.no_grad()
    def rewards(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar rewards, shape (B,)."""
        return self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)


__all__ = [
    "Llama2PreTrainedModel",
    "Llama2Model",
    "Llama2ForCausalLM",
    "Llama2ForSequenceClassification",
    "Llama2ForRewardModel",
]

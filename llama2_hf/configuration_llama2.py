"""Llama 2 model configuration.

Defaults reproduce Llama-2-7b (Touvron et al. 2023, Table 1 and Meta's `params.json`). This file is copied next to
the weights by `save_pretrained`, so it imports only `transformers` (remote-code contract).
"""

from __future__ import annotations

import json
import os

from transformers.configuration_utils import PreTrainedConfig

# Shapes of the released sizes. 34B was never released: its shapes are those of Code Llama 34B (which was initialised
# from Llama 2 34B) and are an inference, not a published fact. Its rope theta is Llama 2's 10000, not Code Llama's 1e6.
_PRESETS: dict[str, dict] = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               multiple_of=256, ffn_dim_multiplier=None),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                multiple_of=256, ffn_dim_multiplier=None),
    "34b": dict(hidden_size=8192, num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8,
                multiple_of=256, ffn_dim_multiplier=1.0),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                multiple_of=4096, ffn_dim_multiplier=1.3),
    # A test size: GQA (2 query heads per KV head) so every code path of the large models is exercised.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 multiple_of=32, ffn_dim_multiplier=None, vocab_size=512, max_position_embeddings=256),
}


# Written into every saved config so that one repo serves every head and the tokenizer with `trust_remote_code=True`
# (transformers' `save_pretrained` would otherwise record only the class being saved).
LLAMA2_AUTO_MAP = {
    "AutoConfig": "configuration_llama2.Llama2Config",
    "AutoModel": "modeling_llama2.Llama2Model",
    "AutoModelForCausalLM": "modeling_llama2.Llama2ForCausalLM",
    "AutoModelForSequenceClassification": "modeling_llama2.Llama2ForSequenceClassification",
    "AutoTokenizer": [None, "tokenization_llama2.Llama2Tokenizer"],
}


def compute_intermediate_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """FFN hidden size exactly as `FeedForward.__init__` in Meta's `llama/model.py` computes it.

    7B: 4096 -> 11008, 13B: 5120 -> 13824, 70B: 8192 (multiple_of 4096, x1.3) -> 28672.
    """
    hidden = 4 * dim
    hidden = int(2 * hidden / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class Llama2Config(PreTrainedConfig):
    r"""Configuration of a Llama 2 decoder (`model_type="llama2"`).

    Field names follow `transformers.LlamaConfig`, so a `config.json` of a `meta-llama/Llama-2-*-hf` checkpoint
    (model_type `llama`) loads into this class unchanged. Llama 2 has no biases and untied embeddings; a config
    asking for either is rejected rather than silently ignored.

    Example:
        >>> cfg = Llama2Config.from_preset("13b")
        >>> cfg.intermediate_size
        13824
    """

    model_type = "llama2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> MHA (7B, 13B); 8 for 34B/70B (GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (128 for every released size)
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096  # Llama 2 context length (Llama 1: 2048)
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5  # Llama 2 value for every size; 1e-6 was a Llama 1 leftover (meta-llama/llama#771)
    use_cache: bool = True
    pad_token_id: int | None = None  # Meta's tokenizer has no pad token (pad_id = -1)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None  # {"rope_type": "default", "rope_theta": 10000.0}
    attention_dropout: float = 0.0
    attention_bias: bool = False
    mlp_bias: bool = False
    pretraining_tp: int | None = 1  # accepted for compatibility with Hub configs; has no effect on the maths
    # Training forwards with labels compute the LM loss in chunks (`fused_linear_ce`) and return no logits; the
    # loss and its gradients are those of the full-logits loss. False restores the logits (and their memory).
    fused_lm_loss: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {k: v if isinstance(v, str) else list(v) for k, v in LLAMA2_AUTO_MAP.items()}
        self._check_shapes()

    def _check_shapes(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                f"({self.num_attention_heads})")
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
            if self.head_dim % 2:
                problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.attention_bias or self.mlp_bias:
            problems.append("Llama 2 has no biases: attention_bias and mlp_bias must be False")
        if self.tie_word_embeddings:
            problems.append("Llama 2 does not tie the output projection to the embeddings: tie_word_embeddings "
                            "must be False")
        if not self.rms_norm_eps > 0:
            problems.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if problems:
            raise ValueError("Invalid Llama2Config: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Llama2Config":
        """Config of a released size ("7b", "13b", "70b"), the inferred "34b", or the "tiny" test size.

        The FFN size is derived from `multiple_of` / `ffn_dim_multiplier` as Meta's code does.
        """
        key = name.lower().removeprefix("llama-2-").removeprefix("llama2-")
        if key not in _PRESETS:
            raise ValueError(f"Unknown Llama 2 preset {name!r}; expected one of {sorted(_PRESETS)}")
        shape = dict(_PRESETS[key])
        multiple_of = shape.pop("multiple_of")
        ffn_dim_multiplier = shape.pop("ffn_dim_multiplier")
        shape["intermediate_size"] = compute_intermediate_size(shape["hidden_size"], multiple_of, ffn_dim_multiplier)
        shape.update(overrides)
        return cls(**shape)

    @classmethod
    def from_meta_params(cls, params: dict | str | os.PathLike, vocab_size: int | None = None,
                         **overrides) -> "Llama2Config":
        """Build a config from Meta's `params.json` (a dict or a path to the file).

        `vocab_size: -1` in `params.json` means "from the tokenizer": pass `vocab_size` then.
        """
        if not isinstance(params, dict):
            with open(params, encoding="utf-8") as f:
                params = json.load(f)
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ValueError(f"params.json is missing required keys {missing}; got keys {sorted(params)}")
        n_vocab = params.get("vocab_size", -1)
        if n_vocab is None or n_vocab <= 0:
            if vocab_size is None:
                raise ValueError("params.json has vocab_size=-1 (taken from the tokenizer): pass vocab_size=")
            n_vocab = vocab_size
        elif vocab_size is not None and vocab_size != n_vocab:
            raise ValueError(f"params.json vocab_size={n_vocab} disagrees with the tokenizer's {vocab_size}")
        dim = params["dim"]
        kwargs = dict(
            vocab_size=n_vocab,
            hidden_size=dim,
            intermediate_size=compute_intermediate_size(dim, params.get("multiple_of", 256),
                                                        params.get("ffn_dim_multiplier")),
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
            rms_norm_eps=params.get("norm_eps", 1e-5),
            rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        )
        if "max_seq_len" in params:
            kwargs["max_position_embeddings"] = params["max_seq_len"]
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["LLAMA2_AUTO_MAP", "Llama2Config", "compute_intermediate_size"]

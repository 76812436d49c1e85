"""What several stages load the same way: the tokenizer, a model from TRL's `ModelConfig`, the precision policy.

Precision (paper §2.2 trains in bf16 with fp32 master weights): a model that an optimizer updates is loaded in
float32 (`ModelConfig.dtype`, TRL's default) and low precision is compute only (`bf16: true` in a Trainer config
-> autocast; PPO's `mixed_precision`). Loading trainable weights in bf16 is refused: at the paper's PPO learning
rate 1e-6 most bf16 parameter updates round to nothing. Frozen models (reference, reward models, evaluation) may be
loaded in bf16 to halve their memory.
"""

from __future__ import annotations

import logging

import torch

from ..runner import UsageError
from ..tokenization_llama2 import Llama2Tokenizer

logger = logging.getLogger(__name__)

LOW_PRECISION = ("bfloat16", "float16", "bf16", "fp16")


def load_tokenizer(name_or_path) -> Llama2Tokenizer:
    """The Llama 2 tokenizer saved with a model (or a tokenizer folder / Hub id); padding uses `unk` when the
    tokenizer has no pad token (its positions are masked out of every loss and attention)."""
    try:
        tokenizer = Llama2Tokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a Llama 2 tokenizer from {name_or_path!s}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def check_trainable_dtype(model_args, trainable: bool = True) -> None:
    """Refuse low-precision weights for a model an optimizer updates in full (see the module docstring)."""
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if trainable and not quantized and not model_args.use_peft and str(model_args.dtype) in LOW_PRECISION:
        raise UsageError(f"dtype={model_args.dtype} for weights that are trained: the optimizer needs float32 master "
                         "weights (keep dtype: float32 and set bf16: true for bf16 compute)")


def model_init_kwargs(model_args) -> dict:
    """`from_pretrained` keyword arguments from TRL's `ModelConfig`: dtype, attention kernel, revision, 4/8-bit."""
    from trl import get_quantization_config

    kwargs = {"revision": model_args.model_revision}
    if model_args.dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, str(model_args.dtype))
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return kwargs


def load_model(cls, model_args, name_or_path=None, *, trainable: bool = True, **overrides):
    """`cls.from_pretrained(name_or_path or model_args.model_name_or_path, ...)` with a clear error for a missing
    folder (instead of the Hub's repo-id message)."""
    from pathlib import Path

    source = str(name_or_path or model_args.model_name_or_path or "")
    if not source:
        raise UsageError("model_name_or_path is required")
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix or source.count("/") > 1
    if looks_local and not Path(source).expanduser().exists():
        raise UsageError(f"model {source}: no such folder")
    check_trainable_dtype(model_args, trainable)
    try:
        return cls.from_pretrained(source, **{**model_init_kwargs(model_args), **overrides})
    except OSError as e:
        raise UsageError(f"cannot load {cls.__name__} from {source}: {e}") from None


def peft_config(model_args):
    """`peft.LoraConfig` from TRL's `ModelConfig` (None unless `use_peft`)."""
    from trl import get_peft_config

    return get_peft_config(model_args)

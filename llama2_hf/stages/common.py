"""What several stages load the same way: the tokenizer, a model from TRL's `ModelConfig`, the precision policy.

Precision (our policy; the paper does not state its training precision): a model that an optimizer updates is loaded in
float32 (`ModelConfig.dtype`, TRL's default) and low precision is compute only (`bf16: true` in a Trainer config
-> autocast; PPO's `mixed_precision`). Loading trainable weights in bf16 is refused: at the paper's PPO learning
rate 1e-6 most bf16 parameter updates round to nothing. Frozen models (reference, reward models, evaluation) may be
loaded in bf16 to halve their memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..rewards import SAFETY_THRESHOLD, WHITEN_MODES
from ..errors import UsageError
from ..loading import has_tokenizer, load_pretrained, load_tokenizer

logger = logging.getLogger(__name__)

LOW_PRECISION = ("bfloat16", "float16", "bf16", "fp16")


def check_prompt_lengths(prompts, tokenizer, model_source) -> None:
    """Refuse, before any model is loaded, a prompt that leaves the model no room to answer: its ids in the
    tokenizer's chat format (`chat_format_for`) fill the model's context (`max_position_embeddings` of its config).
    The error names the prompt's file and line."""
    from transformers import AutoConfig

    from ..chat_format import chat_format_for

    try:
        context = AutoConfig.from_pretrained(str(model_source)).max_position_embeddings
    except (OSError, ValueError, AttributeError):
        return  # the model load reports what is wrong with it
    chat_format = chat_format_for(tokenizer)
    for row in prompts:
        n = len(chat_format.prompt_ids(row.messages))
        if n >= context:
            where = row.source or f"prompt {row.id!r}"
            raise UsageError(f"{where}: the prompt has {n} tokens in the chat format, the model's whole context is "
                             f"{context}: no room is left for an answer (shorten or drop it)")


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


def load_model(cls, model_args, name_or_path=None, *, role: str = "model", trainable: bool = True,
               new_head: bool = False, **overrides):
    """`cls.from_pretrained(name_or_path or model_args.model_name_or_path, ...)` for the model playing `role`, with a
    clear error for a missing folder (instead of the Hub's repo-id message) and for weights that do not fit `cls`
    (`llama2_hf.loading`; `new_head=True` where the stage documents a new head)."""
    source = str(name_or_path or model_args.model_name_or_path or "")
    if not source:
        raise UsageError("model_name_or_path is required")
    check_trainable_dtype(model_args, trainable)
    return load_pretrained(cls, source, role, new_head=new_head, **{**model_init_kwargs(model_args), **overrides})


# The LoRA targets of a Llama 2 model (`model_type: llama2`, which peft's per-family table does not know) when
# `lora_target_modules` is unset: every linear layer of the decoder, attention and SwiGLU, as the *-lora.yaml recipes.
LLAMA2_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_model_type(source) -> str | None:
    """The `model_type` of the model LoRA wraps (a folder, a stage folder's model output, or a cached Hub id)."""
    from ..loading import checkpoint_model_type
    from ..runner import stage_output

    if not source:
        return None
    try:
        return checkpoint_model_type(stage_output(source, "model"))
    except UsageError:  # a stage folder without a model output: the stage itself reports it
        return checkpoint_model_type(source)


def peft_config(model_args):
    """`peft.LoraConfig` from TRL's `ModelConfig` (None unless `use_peft`). Without `lora_target_modules` (and
    `lora_target_parameters`) the adapted layers are the family's: `LLAMA2_LORA_TARGET_MODULES` for a Llama 2
    model, peft's own per-family default for any other (`target_modules=None`: peft's
    `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, the attention's `q_proj`/`v_proj` for Llama, Qwen2,
    Mistral, Gemma). A family peft has no default for is refused in one line asking for `lora_target_modules`."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None or model_args.lora_target_modules or model_args.lora_target_parameters:
        return config
    model_type = _lora_model_type(model_args.model_name_or_path)
    if model_type == "llama2":
        config.target_modules = set(LLAMA2_LORA_TARGET_MODULES)
        return config
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as FAMILY_DEFAULTS

    if model_type is not None and model_type not in FAMILY_DEFAULTS:
        raise UsageError(f"lora_target_modules: unset, and peft has no default for model_type {model_type!r} "
                         f"({model_args.model_name_or_path}); give lora_target_modules (names of the linear layers "
                         "to adapt, e.g. [q_proj, v_proj], or all-linear)")
    return config  # target_modules None: peft takes the family's default when it wraps the model


@dataclass
class RewardArguments:
    """The reward of the sampling and RL stages: the helpfulness RM gated by the safety RM (paper §3.2.3, Eq. 3-4).
    One definition for rejection sampling, PPO and safety context distillation."""

    helpfulness_reward_model: str | None = field(default=None, metadata={
        "help": "Helpfulness reward model: folder (a train-rm output) or Hub id (R_h, paper §3.2.2)."})
    safety_reward_model: str | None = field(default=None, metadata={
        "help": "Safety reward model: folder or Hub id (R_s). Without it the helpfulness RM alone is the reward."})
    safety_threshold: float = field(default=SAFETY_THRESHOLD, metadata={
        "help": "Safety gate on sigmoid(R_s): 0.15, precision 0.89 / recall 0.55 on Meta Safety (paper §3.2.3)."})
    reward_whitening: str = field(default="batch", metadata={
        "help": "Statistics of WHITEN(LOGIT(R_c)) (paper silent): batch, running or none. Monotone within a scored "
                "batch, so it never changes a best-of-K choice.", "choices": list(WHITEN_MODES)})
    reward_batch_size: int = field(default=8, metadata={"help": "Responses per reward-model forward pass."})
    reward_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen reward models (bfloat16 halves their memory).",
        "choices": ["float32", "bfloat16", "float16"]})

    def __post_init__(self):
        if self.reward_whitening not in WHITEN_MODES:
            raise ValueError(f"reward_whitening must be one of {WHITEN_MODES}, got {self.reward_whitening!r}")
        if not 0 < self.safety_threshold < 1:
            raise ValueError(f"safety_threshold is a probability in (0, 1), got {self.safety_threshold}")


def load_reward(args: RewardArguments, tokenizer, device: str | torch.device = "cpu"):
    """The reward callable of `args`: `SafetyGatedReward` over both RMs, or the helpfulness scorer alone. Each RM
    folder may be a `train-rm` output (its `model` output is used). Each RM loads as its own family and scores with
    the tokenizer saved with it (`tokenizer`, the policy's, where the RM folder has none): responses are re-encoded
    from their text in the RM's chat format."""
    from ..modeling_llama2 import Llama2ForRewardModel
    from ..rewards import RewardModelScorer, SafetyGatedReward
    from ..runner import stage_output

    if not args.helpfulness_reward_model:
        raise UsageError("helpfulness_reward_model is required (a train-rm output folder or a Hub id)")

    def scorer(path: str, role: str) -> RewardModelScorer:
        source = stage_output(path, "model")
        model = load_pretrained(Llama2ForRewardModel, str(source), role, dtype=getattr(torch, args.reward_dtype))
        own = tokenizer if not has_tokenizer(source) else load_tokenizer(source)
        return RewardModelScorer(model.to(device), own, batch_size=args.reward_batch_size)

    helpful = scorer(args.helpfulness_reward_model, "helpfulness reward model")
    if not args.safety_reward_model:
        return helpful
    return SafetyGatedReward(helpful, scorer(args.safety_reward_model, "safety reward model"),
                             threshold=args.safety_threshold, whiten=args.reward_whitening)

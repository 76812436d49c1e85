"""Supervised fine-tuning of Llama 2-Chat (paper §3.1) as a thin subclass of TRL's `SFTTrainer`.

What it adds to TRL: the checkpoint's chat format (`llama2_hf.chat_format`): Meta's released Llama 2-Chat token format
from `llama2_hf.tokenization_llama2` for a Llama 2 tokenizer (never a Jinja template; `sft_format="separator_token"`
gives the paper's §3.1 prompt/answer separator token instead), any other model's own chat template otherwise; the loss on
answer tokens only (every assistant turn, or only the last one for Ghost Attention), packing of whole examples
into fixed-length rows with no attention across examples (`llama2_hf.collators`), explicit bad-input policies, and the
paper's hyperparameters as defaults. LoRA / QLoRA go through TRL's `peft_config` / `quantization_config`.

    trainer = Llama2SFTTrainer(model=model_or_path, args=Llama2SFTConfig(output_dir="sft"),
                               train_dataset=Dataset.from_list([{"messages": [...]}, ...]), processing_class=tok)
    trainer.train()
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset, IterableDataset
from tokenizers import AddedToken
from trl import SFTConfig, SFTTrainer

from accelerate.utils import is_peft_model

from ..chat_format import is_llama2_tokenizer
from ..collators import (
    PACKING_STRATEGIES,
    DataCollatorForAnswerOnlyLM,
    DataCollatorForPackedLM,
    pack_dataset,
    use_packed_sdpa,
)
from ..data import ON_INVALID, ON_OVERLENGTH, DataReport, check_policies, prepare_sft_dataset
from ..distributed import FullyShardedTrainerMixin
from ..errors import UsageError, check_ranges
from ..loading import ensure_pad_token
from ..loading import load_tokenizer as load_checkpoint_tokenizer

logger = logging.getLogger(__name__)


GRADIENT_ACCUMULATION_HELP = ("Micro-batches per optimizer step. Unset: from global_batch_size (1 when that is "
                              "None). Given with global_batch_size, the two must agree.")


def apply_global_batch_size(config) -> None:
    """Check a Trainer config's batch and step settings and set `gradient_accumulation_steps` so that per-device
    batch x processes x accumulation = `global_batch_size`.

    `gradient_accumulation_steps` defaults to None in our configs so that a value the user gave is told apart from
    the default: given together with `global_batch_size`, a disagreement is refused, naming both (neither silently
    wins). Runs before TrainingArguments' own `__post_init__`, so the process count comes from the launcher's
    `WORLD_SIZE`.
    """
    check_ranges(config, positive=("per_device_train_batch_size", "per_device_eval_batch_size",
                                   "gradient_accumulation_steps", "global_batch_size", "max_length"),
                 non_negative=("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm"))
    if config.max_steps < -1 or config.max_steps == 0:
        raise ValueError(f"max_steps must be > 0 (or -1: num_train_epochs decides), got {config.max_steps}")
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        raise ValueError(f"num_train_epochs must be > 0 when max_steps is not set, got {config.num_train_epochs}")
    if config.global_batch_size is None:
        config.gradient_accumulation_steps = config.gradient_accumulation_steps or 1
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = config.per_device_train_batch_size * world_size
    if config.global_batch_size % per_step:
        raise ValueError(f"global_batch_size={config.global_batch_size} is not a multiple of per-device batch "
                         f"{config.per_device_train_batch_size} x {world_size} processes")
    steps = config.global_batch_size // per_step
    if config.gradient_accumulation_steps not in (None, steps):
        raise ValueError(f"gradient_accumulation_steps={config.gradient_accumulation_steps} contradicts "
                         f"global_batch_size={config.global_batch_size} (per-device batch "
                         f"{config.per_device_train_batch_size} x {world_size} processes x {steps} steps = "
                         f"{config.global_batch_size}): give one of them "
                         "(global_batch_size null lets gradient_accumulation_steps decide)")
    config.gradient_accumulation_steps = steps


def carry_checkpointing_default(config) -> None:
    """TRL's configs default the deprecated `gradient_checkpointing` to True, which makes TrainingArguments warn about
    a setting the user never made; carry that default over to `activation_checkpointing` first (same effect). An
    explicit `gradient_checkpointing: false` still gets transformers' deprecation warning: that one concerns the user.
    """
    if config.activation_checkpointing is None and config.gradient_checkpointing is True:
        config.activation_checkpointing = True


@dataclass
class Llama2SFTConfig(SFTConfig):
    """`SFTConfig` with the paper's SFT recipe as defaults (§3.1) and the Llama 2 data options.

    The paper gives LR, schedule, weight decay, batch, length and epochs. Its warmup, final LR and AdamW betas/eps are
    not stated: we keep no warmup and a cosine decay to 0, and take the pretraining AdamW settings (§2.2).
    On CPU pass `use_cpu=True, bf16=False, activation_checkpointing=False` (TRL defaults to bf16 and checkpointing).
    """

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (2e-5: paper §3.1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule (cosine: paper §3.1)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (0.1: paper §3.1)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95: pretraining value, §2.2)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5: pretraining value, §2.2)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs (2: paper §3.1)."})
    max_length: int | None = field(default=4096, metadata={"help": "Row length in tokens (4096: paper §3.1)."})
    packing: bool = field(default=True, metadata={
        "help": "Pack whole examples into rows of max_length tokens (paper §3.1 concatenates prompts and answers to "
                "fill the sequences), with no attention across examples (our choice: the paper does not say)."})
    packing_strategy: str = field(default="bfd_rows", metadata={
        "help": "bfd_rows (best-fit decreasing: fewest rows) or ordered_rows (next-fit in dataset order).",
        "choices": list(PACKING_STRATEGIES)})
    global_batch_size: int | None = field(default=64, metadata={
        "help": "Rows per optimizer step over all processes (64: paper §3.1); sets gradient_accumulation_steps. "
                "None leaves gradient_accumulation_steps as given."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": GRADIENT_ACCUMULATION_HELP})
    packed_attention: str = field(default="auto", metadata={
        "help": "Attention over packed rows: 'segmented' runs sdpa per example (no work on masked-out blocks; best on "
                "CPU), 'model' keeps the model's kernel (a block-diagonal mask, or FlashAttention's varlen kernel), "
                "'auto' = segmented for an sdpa model on CPU, else model.", "choices": ["auto", "segmented", "model"]})
    train_on: str = field(default="all", metadata={
        "help": "Answer tokens that carry the loss: 'all' assistant turns or only the 'last' (Ghost Attention).",
        "choices": ["all", "last"]})
    sft_format: str = field(default="llama2_chat", metadata={
        "help": "How prompt and answer are laid out. 'llama2_chat': the model's chat format: Meta's released chat "
                "format for a Llama 2 tokenizer (`<s>[INST] prompt [/INST] answer </s>`, the format Llama 2-Chat was "
                "released with and every other stage uses), the tokenizer's own chat template for other models. "
                "'separator_token': the paper's description (§3.1: 'a special token is utilized to separate the "
                "prompt and answer segments', token not named): `<s>prompt<sep>answer</s>` with separator_token added "
                "to the tokenizer as a special token and the model's embeddings resized (the new row starts at the "
                "mean embedding; under LoRA it stays there unless the embeddings are trained).",
        "choices": ["llama2_chat", "separator_token"]})
    separator_token: str = field(default="<sep>", metadata={
        "help": "The separator's text when sft_format='separator_token' (our choice; the paper does not name it). "
                "Only the added token id separates: the same characters inside a message stay plain text."})
    on_invalid: str = field(default="error", metadata={
        "help": "Invalid rows (missing fields, bad roles, empty answers): 'error' or 'drop' (counted and logged).",
        "choices": list(ON_INVALID)})
    on_overlength: str = field(default="error", metadata={
        "help": "Rows over max_length: 'error', 'truncate' (keep the start) or 'drop' (counted and logged).",
        "choices": list(ON_OVERLENGTH)})

    def __post_init__(self):
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}: "
                             "TRL's padding-free strategies flatten a batch into one row, which is not used here")
        if self.packed_attention not in ("auto", "segmented", "model"):
            raise ValueError(f"packed_attention must be 'auto', 'segmented' or 'model', got {self.packed_attention!r}")
        if self.train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {self.train_on!r}")
        if self.sft_format not in ("llama2_chat", "separator_token"):
            raise ValueError(f"sft_format must be 'llama2_chat' or 'separator_token', got {self.sft_format!r}")
        if self.sft_format == "separator_token" and not (self.separator_token or "").strip():
            raise ValueError("sft_format='separator_token' needs a non-empty separator_token")
        check_policies(self.on_invalid, self.on_overlength)
        if self.assistant_only_loss or self.completion_only_loss is False:
            raise ValueError("Llama2SFTTrainer always takes the loss on answer tokens only; choose which with "
                             "train_on ('all' or 'last') instead of assistant_only_loss / completion_only_loss")
        if self.eval_packing and not self.packing:
            raise ValueError("eval_packing=True needs packing=True (packed rows need the packed collator)")
        if self.packing and self.max_length is None:
            raise ValueError("packing needs max_length (the row length)")
        apply_global_batch_size(self)
        carry_checkpointing_default(self)
        super().__post_init__()


def example_limit(model, max_length: int | None) -> int | None:
    """The longest example a model can learn from: `max_length`, capped at the model's context
    (`max_position_embeddings`). Longer examples follow `on_overlength` (refused, truncated or dropped, and counted);
    packed rows keep `max_length` (positions restart with every example)."""
    context = None if isinstance(model, str) else getattr(model.config, "max_position_embeddings", None)
    if context is None or (max_length is not None and max_length <= context):
        return max_length
    logger.info("max_length %s is longer than the model's context (%d tokens): examples over %d tokens follow "
                "on_overlength", max_length, context, context)
    return context


def load_tokenizer(model):
    """The tokenizer saved next to a model (given as a path/id or as a model loaded from one): `Llama2Tokenizer` for
    a Llama 2 checkpoint, `AutoTokenizer` for any other (`llama2_hf.loading.load_tokenizer`)."""
    source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
    if not source:
        raise ValueError("pass processing_class: the model was not loaded from a path, so its tokenizer is unknown")
    return load_checkpoint_tokenizer(source)  # the stages' loader: missing folders named, a pad token when unset


class Llama2SFTTrainer(FullyShardedTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` on Llama 2-Chat data (see the module docstring and `llama2_hf.data` for the schema).

    `model`: a causal LM of any family (`Llama2ForCausalLM`, a transformers model), a PEFT model, or a path/id (loaded
    by TRL with `args.model_init_kwargs`, `quantization_config` for QLoRA). `processing_class` defaults to the
    tokenizer saved with the model; without a pad token, `unk` (Llama 2) or EOS (other tokenizers, as TRL) is used for
    padding (`llama2_hf.loading.ensure_pad_token`: its label is -100 and it is never attended to).
    Preparation reports (rows kept / dropped / truncated) are in `trainer.data_reports[name]`. Under an FSDP
    accelerate config on CPU the model is sharded with FSDP2 (`llama2_hf.distributed.FullyShardedTrainerMixin`).
    """

    _tag_names = ["trl", "sft", "llama2_hf"]

    def __init__(self, model, args: Llama2SFTConfig | None = None, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | dict[str, Dataset] | None = None, processing_class=None,
                 data_collator=None, **kwargs):
        if args is None:
            name = (model if isinstance(model, str) else model.config._name_or_path or "llama2").rstrip("/")
            args = Llama2SFTConfig(output_dir=f"{name.split('/')[-1]}-SFT")
        if not isinstance(args, Llama2SFTConfig):
            raise TypeError(f"args must be a Llama2SFTConfig, got {type(args).__name__}")
        if kwargs.get("formatting_func") is not None:
            raise ValueError("formatting_func is not used: pass rows in the schema of llama2_hf.data")
        if processing_class is None:
            processing_class = load_tokenizer(model)
        ensure_pad_token(processing_class)
        if args.sft_format == "separator_token" and not is_llama2_tokenizer(processing_class):
            raise UsageError(f"sft_format='separator_token' lays dialogues out around Llama 2's BOS/EOS; "
                             f"{type(processing_class).__name__} {processing_class.name_or_path} is not a Llama 2 "
                             "tokenizer: use sft_format='llama2_chat' (the model's own chat template)")
        if args.sft_format == "separator_token":
            # Added in place, so the tokenizer saved with the model carries the separator; the datasets are
            # tokenized inside super().__init__ and need its id, the embeddings are resized once TRL has the model.
            processing_class.add_tokens([AddedToken(args.separator_token, special=True, normalized=False)],
                                        special_tokens=True)
        if data_collator is None:
            collator_cls = DataCollatorForPackedLM if args.packing else DataCollatorForAnswerOnlyLM
            data_collator = collator_cls(processing_class.pad_token_id, args.pad_to_multiple_of)
        self.data_reports: dict[str, DataReport] = {}
        self._example_limit = example_limit(model, args.max_length)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        n_vocab = len(processing_class)
        if args.sft_format == "separator_token" and base.get_input_embeddings().num_embeddings < n_vocab:
            base.resize_token_embeddings(n_vocab)  # new rows: the mean embedding (transformers)
            logger.info("resized the embeddings to %d tokens for separator_token %r", n_vocab, args.separator_token)
        if args.packing and (args.packed_attention == "segmented" or (
                args.packed_attention == "auto" and args.device.type == "cpu"
                and base.config._attn_implementation == "sdpa")):
            use_packed_sdpa(base)
        self._shard_for_launch()

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """Tokenize in the model's chat format with answer-only labels (policies applied), then pack into rows."""
        if isinstance(dataset, IterableDataset):
            raise ValueError("Llama2SFTTrainer needs a map-style datasets.Dataset (packing sees the whole set)")
        if "seq_lengths" in dataset.column_names:  # already packed
            return dataset
        dataset, report = prepare_sft_dataset(
            dataset, processing_class, max_length=self._example_limit, train_on=args.train_on,
            on_invalid=args.on_invalid, on_overlength=args.on_overlength, num_proc=args.dataset_num_proc,
            name=dataset_name,
            separator_token=args.separator_token if args.sft_format == "separator_token" else None)
        self.data_reports[dataset_name] = report
        if packing:
            n_examples = len(dataset)
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy)
            logger.info("%s: packed %d examples into %d rows of <= %d tokens", dataset_name, n_examples,
                        len(dataset), args.max_length)
        return dataset

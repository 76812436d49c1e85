"""`llama2-hf pretrain`: causal-LM pretraining on plain text with the paper's optimiser settings (§2.2, Table 1).

    llama2-hf pretrain --model_preset tiny --tokenizer_name_or_path out/tokenizer --train_file data/text.jsonl \\
        --output_dir out/pretrain --use_cpu true
    llama2-hf pretrain --model_name_or_path out/pretrain --train_file data/more.jsonl --output_dir out/pretrain-2

Inputs: text rows (a `text` column: .jsonl/.json/.parquet/.csv files or Hub dataset names) and either a new model
from a `Llama2Config` preset (`model_preset`, with optional size overrides; the tokenizer gives the vocabulary) or a
model to continue (`model_name_or_path`). Output: the model and its tokenizer at the root of `output_dir`, Trainer
checkpoints beside it, and `run.json`. A rerun in a folder with checkpoints resumes from the newest one.

Packing (`pack_texts`): every document is encoded as `<s> text </s>`, the documents are concatenated and cut into
rows of `max_length` tokens, and attention crosses document boundaries inside a row. That is our choice: the paper
gives the 4096-token context and the 4M-token batch (Table 1) but does not say how documents fill the context or
whether attention is masked between them. Optimiser (paper §2.2): AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1,
gradient clipping 1.0, 2000 warmup steps, cosine decay to 10% of the peak learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator
from trl import ModelConfig

from ..configuration_llama2 import Llama2Config
from ..data import InvalidExample, read_rows
from ..modeling_llama2 import Llama2ForCausalLM
from ..runner import RunRecord, Stage, StageRun, UsageError, resolved_args, stage_output
from ..trainers.sft import GRADIENT_ACCUMULATION_HELP, apply_global_batch_size
from .common import load_model, load_tokenizer
from .training import finish_training, run_training

logger = logging.getLogger(__name__)


@dataclass
class Llama2PretrainConfig(TrainingArguments):
    """`TrainingArguments` with the paper's pretraining recipe as defaults (§2.2, Table 1)."""

    learning_rate: float = field(default=3e-4, metadata={
        "help": "Peak LR (3e-4 for 7B/13B, 1.5e-4 for 34B/70B: Table 1)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Cosine decay (paper §2.2)."})
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1}, metadata={
        "help": "Final LR = a tenth of the peak (paper §2.2)."})
    warmup_steps: float = field(default=2000, metadata={"help": "Warmup steps (2000: paper §2.2)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (0.9: paper §2.2)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95: paper §2.2)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5: paper §2.2)."})
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay (0.1: paper §2.2)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (1.0: paper §2.2)."})
    max_length: int = field(default=4096, metadata={"help": "Tokens per packed row (4096: the context, Table 1)."})
    global_batch_size: int | None = field(default=1024, metadata={
        "help": "Rows per optimizer step over all processes; sets gradient_accumulation_steps (1024 rows x 4096 "
                "tokens = the paper's 4M-token batch, Table 1). None leaves gradient_accumulation_steps as given."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={"help": GRADIENT_ACCUMULATION_HELP})
    on_invalid: str = field(default="error", metadata={
        "help": "Rows whose 'text' is missing or empty: 'error' or 'drop' (counted in run.json).",
        "choices": ["error", "drop"]})

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.on_invalid not in ("error", "drop"):
            raise ValueError(f"on_invalid must be 'error' or 'drop', got {self.on_invalid!r}")
        apply_global_batch_size(self)
        super().__post_init__()


@dataclass
class PretrainArguments:
    """Data and the model to start from."""

    train_file: list[str] = field(default_factory=list, metadata={
        "help": "Text rows with a 'text' column: .jsonl/.json/.parquet/.csv files or Hub dataset names."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id (required for a new model; else the one saved with the model)."})
    model_preset: str | None = field(default=None, metadata={
        "help": "Start a new model from a Llama2Config preset ('7b', '13b', '34b', '70b', 'tiny'); the vocabulary "
                "size comes from the tokenizer. Exclusive with model_name_or_path."})
    hidden_size: int | None = field(default=None, metadata={"help": "Preset override: model width."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Preset override: decoder layers."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Preset override: query heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Preset override: key/value heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Preset override: FFN width."})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Preset override: context."})

    PRESET_OVERRIDES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "max_position_embeddings")

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in self.PRESET_OVERRIDES if getattr(self, k) is not None}


def text_row(example: Mapping, row: int) -> str:
    """The document of a text row: a non-empty `text` string."""
    text = example.get("text")
    if "text" not in example:
        raise InvalidExample(row, "text", "missing_field", f"missing (columns present: {sorted(example)})")
    if not isinstance(text, str) or not text.strip():
        raise InvalidExample(row, "text", "empty_text", f"must be non-empty text, got {text!r}")
    return text


def pack_texts(texts: Sequence[str], tokenizer, max_length: int) -> Dataset:
    """`<s> doc </s>` for every document, concatenated and cut into rows of `max_length` tokens (see the module
    docstring: attention crosses documents, our choice). The ragged tail is kept as a last, shorter row padded with
    -100 labels, so no text is lost."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stream: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
        stream += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    rows = []
    for start in range(0, len(stream), max_length):
        chunk = stream[start:start + max_length]
        pad = max_length - len(chunk)
        rows.append({"input_ids": chunk + [tokenizer.eos_token_id] * pad,
                     "attention_mask": [1] * len(chunk) + [0] * pad,
                     "labels": chunk + [-100] * pad})
    return Dataset.from_list(rows)


def pretrain(model: torch.nn.Module, tokenizer, texts: Sequence[str], args: Llama2PretrainConfig,
             resume_from_checkpoint: str | None = None) -> Trainer:
    """Train `model` on `texts` (packed by `pack_texts`); returns the finished `Trainer` (its `state.log_history`
    holds the loss curve). The library entry of the stage, for callers that hold a model in memory."""
    trainer = Trainer(model=model, args=args, train_dataset=pack_texts(texts, tokenizer, args.max_length),
                      data_collator=default_data_collator, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def new_model(script_args: PretrainArguments, tokenizer) -> Llama2ForCausalLM:
    """A randomly initialised model of the preset (seeded by the Trainer's `seed` through `set_seed`)."""
    try:
        config = Llama2Config.from_preset(script_args.model_preset, vocab_size=len(tokenizer),
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          **script_args.overrides())
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Llama2ForCausalLM(config)


def main(script_args: PretrainArguments, config: Llama2PretrainConfig, model_args: ModelConfig) -> RunRecord:
    run = StageRun("pretrain", config.output_dir, resolved_args(script_args, config, model_args))
    if run.done:
        return run.record
    if not script_args.train_file:
        raise UsageError("train_file is required")
    if bool(script_args.model_preset) == bool(model_args.model_name_or_path):
        raise UsageError("give exactly one of model_preset (a new model) and model_name_or_path (continue one)")
    if model_args.model_name_or_path and script_args.overrides():
        raise UsageError(f"size overrides {sorted(script_args.overrides())} apply to a new model (model_preset) "
                         "only; a continued model keeps its configuration")
    tokenizer_source = script_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not tokenizer_source:
        raise UsageError("tokenizer_name_or_path is required for a new model (it sets the vocabulary)")
    # Every row is read and checked before a model exists.
    paths = [stage_output(p, "data") for p in script_args.train_file]
    rows = [row for _, _, row in read_rows(paths, text_row, config.on_invalid)]
    texts, dropped = [], 0
    for example in rows:
        try:
            texts.append(text_row(example, 0))
        except InvalidExample:  # only reached with on_invalid="drop": counted, logged, recorded
            dropped += 1
    if dropped:
        logger.warning("pretrain: dropped %d of %d rows without text (on_invalid='drop')", dropped, len(rows))
    if not texts:
        raise UsageError(f"no text rows left to train on after on_invalid={config.on_invalid!r} ({dropped} dropped)")
    tokenizer = load_tokenizer(tokenizer_source)
    for i, p in enumerate(paths):
        run.add_input(f"train_{i}", p)
    if model_args.model_name_or_path:
        run.add_input("model", model_args.model_name_or_path)
        model = load_model(Llama2ForCausalLM, model_args, role="model to pretrain")
    else:
        torch.manual_seed(config.seed)
        model = new_model(script_args, tokenizer)
    if config.max_length > model.config.max_position_embeddings:
        raise UsageError(f"max_length {config.max_length} is longer than the model's context "
                         f"({model.config.max_position_embeddings} positions): rows would use positions it has not "
                         "got; lower max_length")
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}")
    dataset = pack_texts(texts, tokenizer, config.max_length)
    trainer = Trainer(model=model, args=config, train_dataset=dataset, data_collator=default_data_collator,
                      processing_class=tokenizer)
    result = run_training(trainer)
    run.metrics["packing"] = {"documents": len(texts), "rows": len(dataset), "dropped": dropped,
                              "tokens": int(sum(sum(m) for m in dataset["attention_mask"]))}
    return finish_training(run, trainer, tokenizer, result)


STAGE = Stage("pretrain", "causal-LM pretraining on packed text with the paper's optimiser (§2.2)",
              (PretrainArguments, Llama2PretrainConfig, ModelConfig), main)

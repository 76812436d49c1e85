"""Causal-LM pretraining on plain text with the paper's optimiser settings (§2.2).

Documents are encoded as `<s> text </s>`, concatenated and cut into rows of `block_size` tokens (the paper packs its
4096-token context the same way; attention may cross document boundaries, as in standard pretraining). The schedule is
cosine with warmup, decaying to 10% of the peak learning rate; AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient
clipping 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator


@dataclass
class Llama2PretrainConfig(TrainingArguments):
    """`TrainingArguments` with the paper's pretraining recipe as defaults (§2.2, Table 1)."""

    learning_rate: float = field(default=3e-4, metadata={"help": "Peak LR (3e-4 for 7B/13B, 1.5e-4 for 34B/70B)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Cosine decay (paper §2.2)."})
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1}, metadata={
        "help": "Final LR = 10% of peak (paper §2.2)."})
    warmup_steps: float = field(default=2000, metadata={"help": "Warmup steps (2000: paper §2.2)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (0.9: paper §2.2)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95: paper §2.2)."})
    adam_epsilon: float = field(default=1e-5, metadata={"help": "AdamW epsilon (1e-5: paper §2.2)."})
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay (0.1: paper §2.2)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (1.0: paper §2.2)."})
    block_size: int = field(default=4096, metadata={"help": "Tokens per row (4096: Llama 2 context, Table 1)."})


def pack_texts(texts: Sequence[str], tokenizer, block_size: int) -> Dataset:
    """`<s> doc </s>` for every document, concatenated and cut into full rows (the ragged tail is kept as a last,
    shorter row padded with -100 labels, so no text is lost)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stream: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
        stream += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    rows = []
    for start in range(0, len(stream), block_size):
        chunk = stream[start:start + block_size]
        pad = block_size - len(chunk)
        rows.append({"input_ids": chunk + [tokenizer.eos_token_id] * pad,
                     "attention_mask": [1] * len(chunk) + [0] * pad,
                     "labels": chunk + [-100] * pad})
    return Dataset.from_list(rows)


def pretrain(model: torch.nn.Module, tokenizer, texts: Sequence[str], args: Llama2PretrainConfig) -> Trainer:
    """Train `model` on `texts`; returns the finished `Trainer` (its `state.log_history` holds the loss curve)."""
    dataset = pack_texts(texts, tokenizer, args.block_size)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=None)
    return trainer

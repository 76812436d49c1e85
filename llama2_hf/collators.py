"""Batching for Llama 2-Chat training: answer-only labels, packing into full rows, preference pairs with labels.

Packing (paper §3.1: prompts and answers are concatenated to fill the 4096-token sequences) puts several tokenized
examples in one row. `DataCollatorForPackedLM` returns `position_ids` that restart at 0 for every example and no
`attention_mask`: from those, transformers builds a block-diagonal causal mask (with `use_cache=False`), so packed
examples never attend to each other (our choice: the paper does not say how attention treats packed samples), and
each example sees the same positions as when it is alone in a row. Labels of
the first token of every example are -100, so no token is trained to predict across a boundary. Packed and padded
batches of the same examples therefore give the same loss.

On CPU, `use_packed_sdpa(model)` switches the model to an attention kernel that runs sdpa on each packed example
separately (the same maths as the block-diagonal mask, without computing the masked-out blocks), the CPU counterpart
of FlashAttention's variable-length kernel.

Typical use (any token-level mask works, e.g. Ghost Attention's last-turn-only mask)::

    enc = chat_format_for(tokenizer).encode(messages, train_on="last")   # llama2_hf.chat_format
    example = {"input_ids": enc.input_ids, "labels": answer_labels(enc.input_ids, enc.assistant_mask)}
    rows = pack_examples(examples, max_length=4096)            # or pack_dataset(dataset, 4096)
    batch = DataCollatorForPackedLM(pad_token_id=0)(rows[:8])  # input_ids, labels, position_ids: (B, T)
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import Sampler
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from trl.trainer.reward_trainer import DataCollatorForPreference

PACKING_STRATEGIES = ("bfd_rows", "ordered_rows")
"""`bfd_rows`: best-fit decreasing (fewest rows, order not kept); `ordered_rows`: next-fit in dataset order."""


def answer_labels(input_ids: Sequence[int], assistant_mask: Sequence[int]) -> list[int]:
    """Labels for answer-only loss: the token id where the mask is 1, -100 elsewhere."""
    if len(input_ids) != len(assistant_mask):
        raise ValueError(f"{len(input_ids)} input_ids but {len(assistant_mask)} mask values")
    return [t if m else -100 for t, m in zip(input_ids, assistant_mask)]


def _labels_of(example: Mapping[str, Any]) -> list[int]:
    if example.get("labels") is not None:
        return list(example["labels"])
    mask = example.get("assistant_mask", example.get("assistant_masks"))
    if mask is None:
        raise ValueError("an example needs 'labels' or 'assistant_mask' next to 'input_ids' (answer-only loss)")
    return answer_labels(example["input_ids"], mask)


# ---------------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------------

def bin_lengths(lengths: Sequence[int], capacity: int, strategy: str = "bfd_rows") -> list[list[int]]:
    """Group indices into bins whose lengths sum to at most `capacity`.

    `bfd_rows`: longest first, each into the open bin with the least room that still fits it (best-fit decreasing).
    `ordered_rows`: in order, a new bin whenever the next item does not fit (next-fit). Every length must be
    <= capacity: callers apply their over-length policy first.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"examples {too_long[:5]} are longer than the row length {capacity}; truncate or drop them "
                         "first (on_overlength)")
    bins: list[list[int]] = []
    if strategy == "ordered_rows":
        used = capacity
        for i, n in enumerate(lengths):
            if used + n > capacity:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += n
        return bins
    room: list[tuple[int, int]] = []  # (free space, bin index) of open bins, sorted
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = bisect.bisect_left(room, (lengths[i], -1))  # the tightest bin with enough space
        if k == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(k)
            bins[b].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, b))
    return bins


def pack_examples(examples: Sequence[Mapping[str, Any]], max_length: int,
                  strategy: str = "bfd_rows") -> list[dict[str, list[int]]]:
    """Pack tokenized examples (`input_ids` + `labels` or `assistant_mask`) into rows of at most `max_length` tokens.

    Each row: `input_ids`, `labels` (concatenated) and `seq_lengths` (the length of each example in it).
    """
    bins = bin_lengths([len(e["input_ids"]) for e in examples], max_length, strategy)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += examples[i]["input_ids"]
            labels += _labels_of(examples[i])
        rows.append({"input_ids": ids, "labels": labels,
                     "seq_lengths": [len(examples[i]["input_ids"]) for i in members]})
    return rows


def pack_dataset(dataset: Dataset, max_length: int, strategy: str = "bfd_rows") -> Dataset:
    """`pack_examples` over a tokenized `datasets.Dataset`; returns a dataset of packed rows."""
    columns = [c for c in ("input_ids", "labels", "assistant_mask", "assistant_masks") if c in dataset.column_names]
    examples = dataset.select_columns(columns).to_list()
    return Dataset.from_list(pack_examples(examples, max_length, strategy))


# ---------------------------------------------------------------------------------------------------------------------
# Attention over packed rows
# ---------------------------------------------------------------------------------------------------------------------

PACKED_SDPA = "llama2_packed_sdpa"


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Causal sdpa on each example of packed rows separately; an example starts where `position_ids` restart.

    query: (B, nh, T, d); key, value: (B, n_kv, T, d). Returns (B, T, nh, d). With a padding mask, a KV cache or no
    `position_ids`, this is transformers' sdpa attention unchanged.
    """
    position_ids = kwargs.get("position_ids")
    batch, n_heads, length, head_dim = query.shape
    if attention_mask is not None or position_ids is None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    positions = position_ids.expand(batch, -1)  # (B, T)
    # A new example starts each row and wherever positions do not continue by +1 (transformers' packed-row rule).
    boundary = torch.ones_like(positions, dtype=torch.bool)
    boundary[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    starts = boundary.reshape(-1).nonzero().flatten()  # in the flattened (B*T,) token order
    if len(starts) == batch:  # one example per row: plain causal sdpa over the batch
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    lengths = torch.diff(starts, append=starts.new_tensor([batch * length])).tolist()

    def pieces(x):  # (B, h, T, d) -> one (h, n, d) tensor per example; `split` keeps the backward a cheap concat
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim).split(lengths)

    outs = [
        F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                       scale=scaling, dropout_p=dropout if module.training else 0.0,
                                       enable_gqa=module.num_key_value_groups > 1).transpose(0, 1)  # (n, nh, d)
        for q, k, v in zip(pieces(query), pieces(key), pieces(value))
    ]
    return torch.cat(outs).view(batch, length, n_heads, head_dim), None


def _packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, attention_mask=None,
                      **kwargs):
    """No mask to build for full causal rows (packed or not): `packed_sdpa_attention` reads `position_ids`."""
    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def use_packed_sdpa(model) -> None:
    """Switch `model` to `packed_sdpa_attention` (registered with transformers as "llama2_packed_sdpa")."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)


# ---------------------------------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------------------------------

def _padded_length(lengths: Sequence[int], multiple: int | None) -> int:
    longest = max(lengths)
    return longest if not multiple else -(-longest // multiple) * multiple


def _check_pad(collator) -> None:
    if collator.pad_token_id is None:
        raise ValueError(f"{type(collator).__name__}: pad_token_id is None: padding needs a token id "
                         "(give the tokenizer a pad token: llama2_hf.loading.ensure_pad_token)")


def _pad(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class DataCollatorForAnswerOnlyLM:
    """Right-padded batches of unpacked examples with answer-only labels.

    Examples: `input_ids` and `labels` (or `assistant_mask`, 1 on trained tokens). Returns `input_ids`,
    `attention_mask` and `labels` (-100 on prompts and padding), each (B, T).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        _check_pad(self)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        length = _padded_length([len(x) for x in ids], self.pad_to_multiple_of)
        return {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "attention_mask": _pad([[1] * len(x) for x in ids], 0, length),
            "labels": _pad([_labels_of(e) for e in examples], -100, length),
        }


@dataclass
class DataCollatorForPackedLM:
    """Right-padded batches of packed rows, with `position_ids` restarting at every example and no attention mask.

    Rows: `input_ids`, `labels` (or `assistant_mask`) and optionally `seq_lengths` (lengths of the examples packed
    in the row, in order; absent means one example). Returns `input_ids`, `labels` and `position_ids`, each (B, T).
    The padding at the end of a row gets positions 0, 1, ... of its own, so it is a separate block that no example
    attends to, and labels -100. The first token of every example has label -100.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        _check_pad(self)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        length = _padded_length([len(x) for x in ids], self.pad_to_multiple_of)
        positions, labels = [], []
        for row, row_ids in zip(rows, ids):
            seq_lengths = list(row.get("seq_lengths") or [len(row_ids)])
            if sum(seq_lengths) != len(row_ids):
                raise ValueError(f"seq_lengths {seq_lengths} do not add up to the row length {len(row_ids)}")
            seq_lengths.append(length - len(row_ids))  # the padding block
            pos = [p for n in seq_lengths for p in range(n)]
            row_labels = _labels_of(row) + [-100] * (length - len(row_ids))
            positions.append(pos)
            labels.append([-100 if p == 0 else t for p, t in zip(pos, row_labels)])
        return {
            "input_ids": _pad(ids, self.pad_token_id, length),
            "labels": torch.as_tensor(labels, dtype=torch.long),
            "position_ids": torch.as_tensor(positions, dtype=torch.long),
        }


@dataclass
class DataCollatorForRatedPreference(DataCollatorForPreference):
    """TRL's preference collator (chosen rows first, then rejected rows; `margin` if present) that also carries the
    per-pair labels used by the Table 8 metrics: `rating_id` and `safety_bin` (each (B,), -1 when unknown)."""

    def __post_init__(self):
        _check_pad(self)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        for key in ("rating_id", "safety_bin"):
            batch[key] = torch.tensor([e.get(key, -1) for e in examples], dtype=torch.long)
        return batch


class ChunkSortedSampler(Sampler[int]):
    """A random permutation cut into chunks of `chunk_size` (one optimizer step: per-device batch x accumulation x
    processes), each chunk ordered longest first.

    Every optimizer step sees the same uniformly random set of examples as with a plain random permutation, and its
    loss is the same average over that set (micro-batches keep a fixed size), but each micro-batch holds examples of
    similar length, so much less padding is computed. The order depends only on `seed` and the epoch
    (`set_epoch`, called by the Trainer), so every process draws the same permutation.
    """

    def __init__(self, lengths: Sequence[int], chunk_size: int, seed: int = 0):
        self.lengths = torch.as_tensor(list(lengths))
        self.chunk_size, self.seed, self.epoch = chunk_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for chunk in order.split(self.chunk_size):
            yield from chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)].tolist()

"""Reward-model accuracy on held-out preference pairs, in the layout of the paper's Table 8.

A pair is counted correct when the chosen response scores strictly higher than the rejected one (ties are wrong).
Accuracy is reported overall (the paper's "Avg"), per preference rating, per safety bin (Table 29), with the reward
mean/std and, for pairs with safety labels, the unsafe-response recall and precision at a score threshold
(`sigmoid(reward) < threshold` flags a response as unsafe; paper Table 29 reports recall at 0.5).

    metrics = evaluate_reward_model(model, tokenizer, dataset)   # dataset in the preference schema
    print(format_table8({"Helpfulness RM / Meta Helpful.": table8_row(metrics)}))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from . import progress
from .collators import DataCollatorForRatedPreference
from .data import SAFETY_LABELS, prepare_preference_dataset, response_safety
from .loading import reward_pad_id
from .losses import RATINGS

logger = logging.getLogger(__name__)

TABLE8_COLUMNS = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
}


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, rating_ids: torch.Tensor,
                       safety_bins: torch.Tensor | None = None, unsafe_threshold: float = 0.5) -> dict[str, float]:
    """Accuracy and reward statistics of N pairs.

    chosen_rewards, rejected_rewards: (N,). rating_ids: (N,) index in `RATINGS` (-1 unrated). safety_bins: (N,)
    index in `SAFETY_LABELS` (-1 unknown). Keys: `accuracy`, `accuracy_<rating>` / `count_<rating>` for ratings
    present, `accuracy_<safety label>` / `count_<safety label>` for bins present, `reward_mean`, `reward_std`
    (population std over the 2N rewards) and, when responses have safety labels, `unsafe_recall` (unsafe responses
    flagged) and `unsafe_precision` (flagged responses that are unsafe; only if any is flagged).
    """
    chosen, rejected = chosen_rewards.float().flatten(), rejected_rewards.float().flatten()
    correct = (chosen > rejected).float()
    metrics = {"accuracy": correct.mean().item() if len(correct) else math.nan}
    for i, rating in enumerate(RATINGS):
        sel = rating_ids == i
        if sel.any():
            metrics[f"accuracy_{rating}"] = correct[sel].mean().item()
            metrics[f"count_{rating}"] = int(sel.sum())
    rewards = torch.cat([chosen, rejected])
    metrics["reward_mean"] = rewards.mean().item()
    metrics["reward_std"] = rewards.std(unbiased=False).item()
    if safety_bins is not None:
        for i, label in enumerate(SAFETY_LABELS):
            sel = safety_bins == i
            if sel.any():
                metrics[f"accuracy_{label}"] = correct[sel].mean().item()
                metrics[f"count_{label}"] = int(sel.sum())
        safe = torch.cat(response_safety(safety_bins))  # aligned with `rewards`
        flagged = torch.sigmoid(rewards) < unsafe_threshold
        unsafe, labelled = safe == 0, safe >= 0
        if unsafe.any():
            metrics["unsafe_recall"] = (flagged & unsafe).sum().item() / unsafe.sum().item()
            if (flagged & labelled).any():
                metrics["unsafe_precision"] = (flagged & unsafe).sum().item() / (flagged & labelled).sum().item()
    return metrics


def table8_row(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """The Table 8 columns (accuracy in %, None where the test set has no pair of that rating); "Avg" is the accuracy
    over all pairs (our reading: the paper does not define its "Avg", which is not the mean of the rating columns)."""
    row = {title: (100.0 * metrics[f"accuracy_{r}"] if f"accuracy_{r}" in metrics else None)
           for r, title in TABLE8_COLUMNS.items()}
    row["Avg"] = 100.0 * metrics["accuracy"]
    return row


def format_table8(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """A Markdown table with one line per (reward model, test set) name, columns as in the paper's Table 8."""
    columns = [*TABLE8_COLUMNS.values(), "Avg"]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = ["-" if row.get(c) is None else f"{row[c]:.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def score_pairs(model, prepared: Dataset, pad_token_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Rewards of every pair of a prepared dataset (`prepare_preference_dataset` output), batched by length.

    Returns `chosen`, `rejected`, `rating_id`, `safety_bin`, each (N,) in dataset order.
    """
    model.eval()
    collate = DataCollatorForRatedPreference(pad_token_id=pad_token_id)
    lengths = [max(len(c), len(r)) for c, r in zip(prepared["chosen_ids"], prepared["rejected_ids"])]
    order = sorted(range(len(prepared)), key=lengths.__getitem__)  # similar lengths together: less padding
    chosen = torch.empty(len(prepared))
    rejected = torch.empty(len(prepared))
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="Scoring pairs", disable=progress.active()):
        idx = order[start: start + batch_size]
        batch = collate([prepared[i] for i in idx])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits.squeeze(-1).float().cpu()  # (2b,): chosen rows then rejected rows
        chosen[idx], rejected[idx] = logits.chunk(2)
    return {"chosen": chosen, "rejected": rejected, "rating_id": torch.tensor(prepared["rating_id"]),
            "safety_bin": torch.tensor(prepared["safety_bin"])}


def evaluate_reward_model(model, tokenizer, dataset: Dataset, batch_size: int = 8, max_length: int | None = None,
                          unsafe_threshold: float = 0.5, on_invalid: str = "error",
                          on_overlength: str = "error") -> dict[str, float]:
    """`preference_metrics` of a reward model on a preference set (schema of `llama2_hf.data`, or prepared), each
    dialogue in the tokenizer's chat format and padded with the id the model's head skips (`reward_pad_id`)."""
    if "chosen_ids" not in dataset.column_names or "rating_id" not in dataset.column_names:
        dataset, _ = prepare_preference_dataset(dataset, tokenizer, max_length=max_length, margins="none",
                                                on_invalid=on_invalid, on_overlength=on_overlength, name="eval")
    scores = score_pairs(model, dataset, reward_pad_id(model, tokenizer), batch_size)
    return preference_metrics(scores["chosen"], scores["rejected"], scores["rating_id"], scores["safety_bin"],
                              unsafe_threshold)

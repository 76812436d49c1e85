"""Preference data from files and other formats, and the paper's reward-model data mixes.

- `load_preference_files`: the stages' reader of preference files in the schema of `llama2_hf.data` (unrated pairs
  only when asked: `allow_unrated`); `load_preference_data`: a file or Hub dataset in our schema, HH-RLHF's
  transcripts or TRL's preference formats, brought to ours (`from_hh_rlhf`, `from_trl_preference`,
  `standardize_preferences`);
- `mix_helpfulness_rm_data`, `mix_safety_rm_data`: the training mixes of paper §3.2.2.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, concatenate_datasets

from .data import (
    PREFERENCE_FEATURES, DataReport, InvalidDataFile, InvalidExample, _require, check_policies,
    load_any, read_rows, rows_dataset, validate_preference,
)
from .losses import RATINGS

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Adapters for common Hub formats
# ---------------------------------------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[dict]:
    """An Anthropic HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`) as messages (Human -> user,
    Assistant -> assistant), contents stripped. Raises ValueError if the text does not start with a turn marker."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"not an HH-RLHF transcript (expected '\\n\\nHuman: ...'): {text[:60]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _as_preference_dataset(rows: list[dict], report: DataReport) -> tuple[Dataset, DataReport]:
    report.kept = len(rows)
    report.log()
    columns = {name: [r[name] for r in rows] for name in PREFERENCE_FEATURES}
    return Dataset.from_dict(columns, features=PREFERENCE_FEATURES), report


def from_hh_rlhf(dataset: Dataset, is_safety_prompt: bool | None = None, on_invalid: str = "error",
                 name: str = "hh-rlhf") -> tuple[Dataset, DataReport]:
    """Anthropic HH-RLHF (`chosen` / `rejected` full transcripts) -> the preference schema.

    The prompt is every turn before the final assistant turn; both transcripts must share it. HH-RLHF has no
    strength labels, so `rating` is null (margin 0). `is_safety_prompt` tags the whole set (e.g. True for
    `harmless-base`). Role order and empty responses are checked later, by `prepare_preference_dataset`.
    """
    check_policies(on_invalid, "error")
    report, rows = DataReport(name=name, total=len(dataset)), []
    for row, example in enumerate(dataset):
        try:
            turns = {}
            for key in ("chosen", "rejected"):
                text = _require(example, row, key)
                try:
                    turns[key] = parse_hh_transcript(text)
                except ValueError as err:
                    raise InvalidExample(row, key, "bad_transcript", str(err)) from None
                if turns[key][-1]["role"] != "assistant":
                    raise InvalidExample(row, key, "bad_transcript",
                                         "the transcript does not end with an Assistant turn")
            if turns["chosen"][:-1] != turns["rejected"][:-1]:
                raise InvalidExample(row, "rejected", "prompt_mismatch",
                                     "chosen and rejected transcripts differ before their final Assistant turn")
        except InvalidExample as err:
            if on_invalid == "error":
                raise
            report.dropped[err.reason] += 1
            continue
        rows.append({"prompt": turns["chosen"][:-1], "chosen": turns["chosen"][-1]["content"],
                     "rejected": turns["rejected"][-1]["content"], "rating": None, "safety_label": None,
                     "is_safety_prompt": is_safety_prompt})
    return _as_preference_dataset(rows, report)


def _response_text(value: Any, row: int, name: str) -> str:
    """TRL responses are text or a message list whose last message is the assistant's answer."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], Mapping):
        if value[-1].get("role") != "assistant":
            raise InvalidExample(row, name, "bad_roles", "the last message of the response is not from the assistant")
        return value[-1].get("content")
    raise InvalidExample(row, name, "bad_type", f"expected text or messages, got {type(value).__name__}")


def from_trl_preference(dataset: Dataset, rating: str | None = None, on_invalid: str = "error",
                        name: str = "trl-preference") -> tuple[Dataset, DataReport]:
    """TRL's preference formats -> the preference schema.

    Accepts an explicit prompt (`prompt` + `chosen` + `rejected`, as text or as messages) or an implicit one
    (`chosen` / `rejected` full conversations sharing every message before the last). `rating` tags every row
    (TRL sets have none: null by default). A `rating`/`safety_label`/`is_safety_prompt` column, if present, is kept.
    """
    check_policies(on_invalid, "error")
    report, rows = DataReport(name=name, total=len(dataset)), []
    for row, example in enumerate(dataset):
        try:
            chosen, rejected = _require(example, row, "chosen"), _require(example, row, "rejected")
            if "prompt" in example:
                prompt = example["prompt"]
            elif isinstance(chosen, list) and isinstance(rejected, list):
                if chosen[:-1] != rejected[:-1]:
                    raise InvalidExample(row, "rejected", "prompt_mismatch",
                                         "chosen and rejected conversations differ before their last message")
                prompt = chosen[:-1]
            else:
                raise InvalidExample(row, "prompt", "missing_field",
                                     "text chosen/rejected need a 'prompt' column (the prompt cannot be inferred)")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            rows.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
                         "chosen": _response_text(chosen, row, "chosen"),
                         "rejected": _response_text(rejected, row, "rejected"),
                         "rating": example.get("rating", rating), "safety_label": example.get("safety_label"),
                         "is_safety_prompt": example.get("is_safety_prompt")})
        except InvalidExample as err:
            if on_invalid == "error":
                raise
            report.dropped[err.reason] += 1
    return _as_preference_dataset(rows, report)


def standardize_preferences(dataset: Dataset) -> Dataset:
    """A dataset in the preference schema cast to `PREFERENCE_FEATURES` (text prompts become one user message,
    absent optional columns become null), so that datasets from different sources concatenate."""
    missing = [c for c in ("prompt", "chosen", "rejected", "rating") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"not a preference dataset: missing columns {missing} (see llama2_hf.data)")

    def fix(example):
        prompt = example["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
                "safety_label": example.get("safety_label"), "is_safety_prompt": example.get("is_safety_prompt")}

    extra = [c for c in dataset.column_names if c not in PREFERENCE_FEATURES]
    dataset = dataset.map(fix, remove_columns=["prompt", *extra])
    return dataset.cast(PREFERENCE_FEATURES)


PREFERENCE_COLUMNS = frozenset(PREFERENCE_FEATURES)
"""The columns of the preference schema (module docstring)."""

ANNOTATION_COLUMNS = frozenset({"id", "annotator", "version", "source", "annotated_at"})
"""Bookkeeping columns that annotation tools write beside the schema columns; accepted and not used for training."""

UNRATED_HINT = ("set allow_unrated: true to train unrated pairs (margin 0, overall accuracy only), e.g. open-source "
                "sets such as HH-RLHF")


def _unrated_rows(dataset: Dataset, path: str, on_invalid: str) -> tuple[Dataset, DataReport]:
    """Rows without a `prompt` column: HH-RLHF transcripts, or TRL's implicit-prompt conversations."""
    first = dataset[0]
    adapter = from_hh_rlhf if isinstance(first.get("chosen"), str) and first["chosen"].startswith("\n\nHuman:") \
        else from_trl_preference
    try:
        return adapter(dataset, on_invalid=on_invalid, name=str(path))
    except InvalidExample as err:
        raise InvalidDataFile(f"{path}, line {err.row + 1}, field {err.field!r}: {err.detail}") from None


def load_preference_files(paths: str | os.PathLike | Sequence[str | os.PathLike], on_invalid: str = "error",
                          allow_unrated: bool = False) -> tuple[Dataset, DataReport]:
    """The preference rows of one or more files (or Hub names), checked before any work and brought to
    `PREFERENCE_FEATURES`.

    Each file may carry only the schema columns and `ANNOTATION_COLUMNS`: any other column is an error naming it and
    the closest valid name (a misspelt `ratng` would otherwise train every pair at margin 0). Every row needs a
    `rating` from Table 27 (or `unsure`); a missing or null rating, or a file of unrated pairs (HH-RLHF transcripts,
    TRL's implicit-prompt conversations, without a `prompt` column), is refused unless `allow_unrated` is set.
    Errors name the file, the 1-based line and the field. `on_invalid="drop"` drops invalid rows instead, counted in
    the returned report and logged as a warning.
    """
    check_policies(on_invalid, "error")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    known = PREFERENCE_COLUMNS | ANNOTATION_COLUMNS
    parts, report = [], DataReport(name=", ".join(map(str, paths)))
    for path in paths:
        located = read_rows([path], known_columns=known)
        if not any("prompt" in row for _, _, row in located):
            if not allow_unrated:
                raise InvalidDataFile(f"{path}: no 'prompt' and no 'rating' column: unrated pairs (HH-RLHF or TRL "
                                      f"conversations); {UNRATED_HINT}")
            converted, sub = _unrated_rows(rows_dataset(located), path, on_invalid)
            logger.warning("%s: %d unrated pairs (margin 0), as allow_unrated asks", path, len(converted))
            report.total += sub.total
            report.dropped.update(sub.dropped)
            parts.append(converted)
            continue
        kept, unrated = [], 0
        for _, n, row in located:
            report.total += 1
            if row.get("rating") is None:
                if not allow_unrated:
                    raise InvalidDataFile(f"{path}, line {n}, field 'rating': missing; every pair needs one of "
                                          f"{list(RATINGS)} or 'unsure' ({UNRATED_HINT})")
                row["rating"], unrated = None, unrated + 1
            try:
                pref = validate_preference(row, n)
            except InvalidExample as err:
                if on_invalid == "error":
                    raise InvalidDataFile(f"{path}, line {n}, field {err.field!r}: {err.detail}") from None
                report.dropped[err.reason] += 1
                continue
            # the canonical row (text prompts as one user message), so that rows of either prompt form mix
            kept.append({"prompt": pref.prompt, "chosen": pref.chosen, "rejected": pref.rejected,
                         "rating": row["rating"], "safety_label": pref.safety_label,
                         "is_safety_prompt": pref.is_safety_prompt})
        if unrated:
            logger.warning("%s: %d unrated pairs (margin 0), as allow_unrated asks", path, unrated)
        if kept:
            parts.append(Dataset.from_list(kept, features=PREFERENCE_FEATURES))
    report.kept = sum(len(p) for p in parts)
    report.log()
    if not parts:
        return Dataset.from_dict({k: [] for k in PREFERENCE_FEATURES}, features=PREFERENCE_FEATURES), report
    return concatenate_datasets(parts), report


def load_preference_data(path_or_name: str, split: str = "train", data_format: str = "auto",
                         data_dir: str | None = None, on_invalid: str = "error") -> tuple[Dataset, DataReport | None]:
    """Load a preference set from a local `.json`/`.jsonl`(`.gz`)/`.parquet` file or a Hub dataset name (with its
    `split` / `data_dir`) and bring it to the preference schema. `data_format`: `auto` (ours if `rating` is a column,
    HH-RLHF if `chosen` is a `\\n\\nHuman:` transcript, else TRL; a set read as unrated is logged as a warning),
    `llama2`, `hh-rlhf` or `trl`. The stages read files with `load_preference_files`, which refuses unrated data
    unless asked."""
    dataset = load_any(path_or_name, split=split, data_dir=data_dir)
    if data_format == "auto":
        first = dataset[0] if len(dataset) else {}
        if "rating" in dataset.column_names:
            data_format = "llama2"
        elif isinstance(first.get("chosen"), str) and first["chosen"].startswith("\n\nHuman:"):
            data_format = "hh-rlhf"
        else:
            data_format = "trl"
        if data_format != "llama2":
            logger.warning("%s has no 'rating' column: read as %s pairs without ratings (margin 0)", path_or_name,
                           data_format)
    if data_format == "llama2":
        return dataset, None
    if data_format == "hh-rlhf":
        return from_hh_rlhf(dataset, on_invalid=on_invalid, name=path_or_name)
    if data_format == "trl":
        return from_trl_preference(dataset, on_invalid=on_invalid, name=path_or_name)
    raise ValueError(f"data_format must be 'auto', 'llama2', 'hh-rlhf' or 'trl', got {data_format!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Reward-model data mixing (paper §3.2.2, "Data Composition")
# ---------------------------------------------------------------------------------------------------------------------

def _concat_named(sources: Mapping[str, Dataset]) -> Dataset:
    if not sources:
        raise ValueError("at least one source dataset is needed")
    parts = [standardize_preferences(ds).add_column("source", [name] * len(ds)) for name, ds in sources.items()]
    return concatenate_datasets(parts)


def _sample(pool: Dataset, n: int, seed: int, what: str) -> Dataset:
    if n > len(pool):
        logger.warning("%s: asked for %d rows but the pool has %d; taking all of them", what, n, len(pool))
        n = len(pool)
    return pool.shuffle(seed=seed).select(range(n))


def mix_helpfulness_rm_data(helpfulness: Mapping[str, Dataset], others: Mapping[str, Dataset],
                            seed: int = 0) -> Dataset:
    """Training data of the Helpfulness RM: all helpfulness data plus an equal number of rows sampled uniformly from
    the others (Meta Safety and the open-source sets). Rows keep a `source` column; the result is shuffled."""
    primary = _concat_named(helpfulness)
    extra = _sample(_concat_named(others), len(primary), seed, "helpfulness RM mix")
    logger.info("helpfulness RM mix: %d helpfulness + %d sampled rows", len(primary), len(extra))
    return concatenate_datasets([primary, extra]).shuffle(seed=seed)


def mix_safety_rm_data(safety: Mapping[str, Dataset], helpfulness: Mapping[str, Dataset],
                       safety_fraction: float = 0.9, seed: int = 0) -> Dataset:
    """Training data of the Safety RM: all safety data (Meta Safety + Anthropic Harmless) mixed with helpfulness data
    (Meta Helpfulness + open-source helpfulness) sampled uniformly so that safety is `safety_fraction` of the mix
    (0.9: the paper's 90/10, §3.2.2). Rows keep a `source` column; the result is shuffled."""
    if not 0.0 < safety_fraction <= 1.0:
        raise ValueError(f"safety_fraction must be in (0, 1], got {safety_fraction}")
    primary = _concat_named(safety)
    n_help = round(len(primary) * (1.0 - safety_fraction) / safety_fraction)
    extra = _sample(_concat_named(helpfulness), n_help, seed, "safety RM mix")
    logger.info("safety RM mix: %d safety + %d helpfulness rows", len(primary), len(extra))
    return concatenate_datasets([primary, extra]).shuffle(seed=seed)

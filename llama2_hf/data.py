"""Data formats of the SFT and reward-modelling stages: schemas, validation, bad-input policies, reading files (other
preference formats and the reward-model mixes: `llama2_hf.preference_data`).

Schemas (plain `datasets.Dataset` columns; JSONL files with these keys load as they are):

SFT (paper §3.1), one of
  - `messages`: list of `{"role", "content"}` dicts: an optional `system` message first, then `user` / `assistant`
    alternating from `user`, ending with `assistant`;
  - `prompt` (text, or the message list of the previous turns ending with `user`) and `answer` (text; `completion`
    is accepted as an alias).

Preferences (paper §3.2.1):
  - `prompt`: text, or the message list of the previous turns (ending with `user`);
  - `chosen`, `rejected`: the two final assistant responses (text);
  - `rating`: `significantly_better`, `better`, `slightly_better`, `negligibly_better` or `unsure` (pooled with
    `negligibly_better`), or null for data without a strength label (open-source sets: margin 0, counted in overall
    accuracy only; files are read with `load_preference_files`, which accepts unrated pairs only with
    `allow_unrated`);
  - optional `safety_label`: `chosen_safe_rejected_unsafe`, `both_safe`, `both_unsafe` (or null);
  - optional `is_safety_prompt`: bool (or null);
  - annotation bookkeeping columns (`ANNOTATION_COLUMNS`: `id`, `annotator`, `version`, `source`, `annotated_at`)
    are accepted and ignored; any other column is an error.

Bad input (missing fields, unknown rating, identical chosen/rejected, empty responses, non-alternating roles, texts
over `max_length`) raises a `ValueError` that names the row and the field, unless a policy asks otherwise:
`on_invalid="drop"` drops invalid rows, `on_overlength="drop"|"truncate"` drops or truncates long ones. Every drop and
truncation is counted in the returned `DataReport` and logged; nothing is dropped silently.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, Features, List, Value, load_dataset

from .chat_format import chat_format_for
from .errors import UsageError
from .losses import RATINGS, canonical_rating, margins_for
from .tokenization_llama2 import encode_chat_with_mask, separator_token_id, validate_messages

logger = logging.getLogger(__name__)

SAFETY_LABELS = ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe")
"""Safety bins of the safety annotation track (paper §3.2.1: 18% / 47% / 35%)."""

# Per safety bin: is the chosen response safe, is the rejected one safe (1 safe, 0 unsafe).
_BIN_SAFETY = {"chosen_safe_rejected_unsafe": (1, 0), "both_safe": (1, 1), "both_unsafe": (0, 0)}

ON_INVALID = ("error", "drop")
ON_OVERLENGTH = ("error", "truncate", "drop")

MESSAGE = {"role": Value("string"), "content": Value("string")}
PREFERENCE_FEATURES = Features({
    "prompt": List(MESSAGE),
    "chosen": Value("string"),
    "rejected": Value("string"),
    "rating": Value("string"),
    "safety_label": Value("string"),
    "is_safety_prompt": Value("bool"),
})
"""The canonical preference schema produced by the adapters and `standardize_preferences` (prompt as messages)."""


def response_safety(safety_bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response safety labels from pair safety bins (indices in `SAFETY_LABELS`, -1 unknown): two (N,) long
    tensors for the chosen and the rejected responses, 1 = safe, 0 = unsafe, -1 = unknown."""
    table = torch.tensor([_BIN_SAFETY[label] for label in SAFETY_LABELS] + [(-1, -1)], device=safety_bins.device)
    both = table[torch.where(safety_bins >= 0, safety_bins, len(SAFETY_LABELS))]  # (N, 2)
    return both[:, 0], both[:, 1]


class InvalidExample(ValueError):
    """A row that breaks the schema. `reason` is a short key used to count drops (e.g. `empty_response`)."""

    def __init__(self, row: int, field_name: str, reason: str, detail: str):
        super().__init__(f"row {row}, field {field_name!r}: {detail}")
        self.row, self.field, self.reason, self.detail = row, field_name, reason, detail


class OverlengthExample(InvalidExample):
    """A row longer than the limit under `on_overlength="error"` (refused whatever `on_invalid` says)."""


# The column `load_data_files` adds: where each row was read ("<file>, line <n>").
SOURCE_COLUMN = "_source"


@dataclass
class DataReport:
    """What preparing one dataset did: rows in, rows kept, rows dropped by reason, rows truncated."""

    name: str
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def log(self) -> None:
        msg = f"{self.name}: {self.kept}/{self.total} rows kept"
        if self.truncated:
            msg += f", {self.truncated} truncated"
        if self.dropped:
            msg += f", dropped {dict(self.dropped)}"
        (logger.warning if self.dropped or self.truncated else logger.info)(msg)


def check_policies(on_invalid: str, on_overlength: str) -> None:
    """Raise ValueError unless both bad-input policies are known values."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    if on_overlength not in ON_OVERLENGTH:
        raise ValueError(f"on_overlength must be one of {ON_OVERLENGTH}, got {on_overlength!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------------------------------

def _require(example: Mapping, row: int, name: str) -> Any:
    if name not in example:
        raise InvalidExample(row, name, "missing_field", f"missing (columns present: {sorted(example)})")
    return example[name]


def _messages(value: Any, row: int, name: str, last_role: str) -> list[dict]:
    """Text -> one user message; a message list is checked (roles, non-empty contents, role of the last message)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise InvalidExample(row, name, "bad_type", f"expected text or a list of messages, got {type(value).__name__}")
    messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, Mapping) else m for m in value]
    try:
        validate_messages(messages)
    except ValueError as err:
        raise InvalidExample(row, name, "bad_roles", str(err)) from None
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            raise InvalidExample(row, name, "empty_message", f"messages[{i}] ({m['role']}) is empty")
    if messages[-1]["role"] != last_role:
        raise InvalidExample(row, name, "bad_roles",
                             f"must end with a {last_role!r} message, ends with {messages[-1]['role']!r}")
    return messages


def sft_messages(example: Mapping, row: int) -> list[dict]:
    """The conversation of an SFT row (either schema) as a checked message list ending with the answer."""
    if example.get("messages") is not None:
        return _messages(example["messages"], row, "messages", last_role="assistant")
    # A null field counts as absent: a file that mixes both schemas gives every row every column.
    present = sorted(k for k, v in example.items() if v is not None)
    if "prompt" not in present:
        raise InvalidExample(row, "messages", "missing_field",
                             "an SFT row needs 'messages', or 'prompt' and 'answer' (or 'completion')")
    answer_field = "completion" if "completion" in present and "answer" not in present else "answer"
    if answer_field not in present:
        raise InvalidExample(row, "answer", "missing_field", f"missing (columns present: {present})")
    answer = example[answer_field]
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidExample(row, answer_field, "empty_response", f"must be non-empty text, got {answer!r}")
    prompt = _messages(_require(example, row, "prompt"), row, "prompt", last_role="user")
    return [*prompt, {"role": "assistant", "content": answer}]


SAFETY_TAG = "is_safety_prompt"
"""The one name of the safety tag of a prompt or a preference row (True: an adversarial / safety prompt, so the
safety reward model decides the reward, paper §3.2.3)."""


@dataclass
class PromptRow:
    """One validated prompt: `id` (the row's `id`, else a hash of the messages), the messages ending with a user
    turn, the safety tag, and the row's other columns (kept for the stage's outputs)."""

    id: str
    messages: list[dict]
    is_safety_prompt: bool
    extra: dict = field(default_factory=dict)
    source: str = field(default="", compare=False)  # "<file>, line <n>" when read from a file


def prompt_row(example: Mapping, row: int) -> PromptRow:
    """The one parser of prompt rows (rejection sampling, PPO, GAtt, distillation, refusals): `prompt` (text or
    messages ending with a user turn) or `messages`, an optional bool `is_safety_prompt`, an optional `id`."""
    for alias in ("is_safety", "is_adversarial", "safety"):
        if alias in example:
            raise InvalidExample(row, alias, "unknown_field", f"unknown column; the safety tag is {SAFETY_TAG!r}")
    key = "prompt" if example.get("prompt") is not None else "messages"
    messages = _messages(_require(example, row, key), row, key, last_role="user")
    flag = example.get(SAFETY_TAG)
    if flag is None:
        flag = False
    if not isinstance(flag, bool):
        raise InvalidExample(row, SAFETY_TAG, "bad_type", f"expected true, false or null, got {flag!r}")
    if example.get("id") is not None:
        prompt_id = str(example["id"])
    else:
        prompt_id = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    extra = {k: v for k, v in example.items() if k not in (key, SAFETY_TAG, "id")}
    return PromptRow(prompt_id, messages, flag, extra)


def load_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[PromptRow]:
    """Validated prompt rows of one or more files (errors name the file, line and field); duplicate ids (identical
    prompts without an `id`) are an error naming both lines."""
    rows, seen = [], {}
    for path, n, example in read_rows(paths, prompt_row):
        p = prompt_row({k: v for k, v in example.items() if v is not None or k == SAFETY_TAG}, n)
        if p.id in seen:
            raise InvalidDataFile(f"{path}, line {n}: same id {p.id!r} as {seen[p.id]} (identical prompts without "
                                  "an 'id' field hash to the same id)")
        seen[p.id] = p.source = f"{path}, line {n}"
        rows.append(p)
    return rows


@dataclass
class Preference:
    """One validated preference row: the prompt turns, the two responses and the labels."""

    prompt: list[dict]
    chosen: str
    rejected: str
    rating: str | None
    safety_label: str | None
    is_safety_prompt: bool | None


def validate_preference(example: Mapping, row: int) -> Preference:
    """Check a preference row against the schema (module docstring); raises `InvalidExample` naming row and field."""
    prompt = _messages(_require(example, row, "prompt"), row, "prompt", last_role="user")
    responses = {}
    for name in ("chosen", "rejected"):
        value = _require(example, row, name)
        if not isinstance(value, str):
            raise InvalidExample(row, name, "bad_type", f"expected the response text, got {type(value).__name__}")
        if not value.strip():
            raise InvalidExample(row, name, "empty_response", "the response is empty")
        responses[name] = value
    if responses["chosen"].strip() == responses["rejected"].strip():
        raise InvalidExample(row, "rejected", "identical_responses",
                             "identical to 'chosen': the pair carries no signal")
    try:
        rating = canonical_rating(_require(example, row, "rating"))
    except ValueError as err:
        raise InvalidExample(row, "rating", "unknown_rating", str(err)) from None
    safety_label = example.get("safety_label")
    if safety_label is not None and safety_label not in SAFETY_LABELS:
        raise InvalidExample(row, "safety_label", "unknown_safety_label",
                             f"{safety_label!r} is not one of {SAFETY_LABELS} (or null)")
    is_safety = example.get("is_safety_prompt")
    if is_safety is not None and not isinstance(is_safety, bool):
        raise InvalidExample(row, "is_safety_prompt", "bad_type", f"expected a bool or null, got {is_safety!r}")
    return Preference(prompt, responses["chosen"], responses["rejected"], rating, safety_label, is_safety)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization with policies
# ---------------------------------------------------------------------------------------------------------------------

def _apply_policies(dataset: Dataset, row_fn, empty: dict, name: str, on_invalid: str,
                    num_proc: int | None) -> tuple[Dataset, DataReport]:
    """Map `row_fn(example, row) -> dict` over the rows, replacing the input columns by its outputs.

    An `InvalidExample` raises (`on_invalid="error"`) or marks the row dropped. `row_fn` returns `_status` ("ok",
    "truncated" or "drop:<reason>"; a dropped row's other columns are filled from `empty`, since every row of a map
    needs the same columns); statuses are counted, then dropped rows are filtered out.
    """

    def wrapped(example, row):
        try:
            out = row_fn(example, row)
        except InvalidExample as err:
            if on_invalid == "error" or isinstance(err, OverlengthExample):
                if example.get(SOURCE_COLUMN):  # read from a file: name it and the line
                    raise InvalidDataFile(f"{example[SOURCE_COLUMN]}, field {err.field!r}: {err.detail}") from None
                raise
            out = {"_status": f"drop:{err.reason}"}
        return {**empty, **out}

    report = DataReport(name=name, total=len(dataset))
    dataset = dataset.map(wrapped, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                          desc=f"Tokenizing {name}")
    statuses = Counter(dataset["_status"])
    report.truncated = statuses.pop("truncated", 0)
    report.dropped = Counter({k.removeprefix("drop:"): v for k, v in statuses.items() if k.startswith("drop:")})
    if report.dropped:
        dataset = dataset.filter(lambda s: not s.startswith("drop:"), input_columns="_status", num_proc=num_proc)
    dataset = dataset.remove_columns("_status")
    report.kept = len(dataset)
    report.log()
    return dataset, report


def prepare_sft_dataset(dataset: Dataset, tokenizer, max_length: int | None, train_on: str = "all",
                        on_invalid: str = "error", on_overlength: str = "error", num_proc: int | None = None,
                        name: str = "sft", separator_token: str | None = None) -> tuple[Dataset, DataReport]:
    """Tokenize SFT rows in the tokenizer's chat format (`chat_format_for`: Meta's Llama 2-Chat ids for a Llama 2
    tokenizer, the chat template otherwise; or, with `separator_token`, prompt and answer split by that token: see
    `encode_chat_with_mask`, Llama 2 tokenizers only) with answer-only labels.

    Returns a dataset with `input_ids` and `labels` (the ids on answer tokens and their EOS, -100 elsewhere;
    `train_on="last"` keeps only the final answer, as Ghost Attention needs) and the report. Rows that already have
    `input_ids` are taken as tokenized: their `labels` are kept, or built from `assistant_mask(s)`.
    `on_overlength="truncate"` keeps the first `max_length` tokens; a row left without any answer token is then
    dropped (reason `no_answer_after_truncation`).
    """
    check_policies(on_invalid, on_overlength)
    chat_format = chat_format_for(tokenizer)  # a template that cannot mark answers is a setup error, not a bad row
    if separator_token is not None:
        if chat_format.name != "llama2_chat":
            raise UsageError(f"sft_format='separator_token' lays dialogues out around Llama 2's BOS/EOS; the "
                             f"tokenizer {getattr(tokenizer, 'name_or_path', '')} is not a Llama 2 tokenizer: use "
                             "sft_format='llama2_chat' (its own chat template)")
        separator_token_id(tokenizer, separator_token)  # a missing token is a setup error, not a bad row

    def row_fn(example, row):
        if example.get("input_ids") is not None:
            ids = list(example["input_ids"])
            mask = example.get("assistant_mask", example.get("assistant_masks"))
            if example.get("labels") is not None:
                labels = list(example["labels"])
            elif mask is not None:
                labels = [t if m else -100 for t, m in zip(ids, mask)]
            else:
                raise InvalidExample(row, "labels", "missing_field",
                                     "a tokenized row needs 'labels' or 'assistant_mask' (answer-only loss)")
            if len(labels) != len(ids):
                raise InvalidExample(row, "labels", "bad_type", f"{len(labels)} labels for {len(ids)} input_ids")
        else:
            messages = sft_messages(example, row)
            enc = (chat_format.encode(messages, train_on=train_on) if separator_token is None else
                   encode_chat_with_mask(tokenizer, messages, train_on=train_on, separator_token=separator_token))
            ids = enc.input_ids
            labels = [t if m else -100 for t, m in zip(ids, enc.assistant_mask)]
        status = "ok"
        if max_length is not None and len(ids) > max_length:
            if on_overlength == "error":
                raise OverlengthExample(row, "messages", "over_length",
                                        f"{len(ids)} tokens exceed max_length={max_length} (set on_overlength="
                                        "'truncate' or 'drop' to allow it)")
            if on_overlength == "drop":
                return {"_status": "drop:over_length"}
            ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
            if all(x == -100 for x in labels):
                return {"_status": "drop:no_answer_after_truncation"}
        return {"input_ids": ids, "labels": labels, "_status": status}

    return _apply_policies(dataset, row_fn, {"input_ids": [], "labels": []}, name, on_invalid, num_proc)


def prepare_preference_dataset(dataset: Dataset, tokenizer, max_length: int | None,
                               margins: str | dict[str, float] = "small", on_invalid: str = "error",
                               on_overlength: str = "error", num_proc: int | None = None,
                               name: str = "preferences") -> tuple[Dataset, DataReport]:
    """Tokenize preference rows for reward modelling.

    Each response is encoded as the full dialog (prompt turns + the response as the final assistant turn) in the
    tokenizer's chat format (`chat_format_for`: Meta's `encode_dialog` ids, ending with EOS, for a Llama 2 tokenizer;
    the chat template otherwise); the reward model reads its scalar at the last token. Output columns:
    `chosen_ids`, `rejected_ids`, `margin` (m(rating) of paper Eq. 2 under `margins`, a Table 27 preset or a map),
    `rating_id` (index in `RATINGS`, -1 unrated), `safety_bin` (index in `SAFETY_LABELS`, -1 unknown), `length`
    (the longer of the two dialogs, for length-aware batching).
    Rows that already have `chosen_ids`/`rejected_ids` are taken as tokenized (rating and safety label optional).
    `on_overlength="truncate"` keeps the last `max_length` tokens of a response's dialog (the response, its EOS and
    the nearest context).
    """
    check_policies(on_invalid, on_overlength)
    chat_format = chat_format_for(tokenizer)

    def row_fn(example, row):
        if example.get("chosen_ids") is not None:
            ids = {"chosen": list(example["chosen_ids"]), "rejected": list(_require(example, row, "rejected_ids"))}
            try:
                rating = canonical_rating(example.get("rating"))
            except ValueError as err:
                raise InvalidExample(row, "rating", "unknown_rating", str(err)) from None
            safety_label = example.get("safety_label")
        else:
            pref = validate_preference(example, row)
            ids = {k: chat_format.encode([*pref.prompt, {"role": "assistant", "content": text}]).input_ids
                   for k, text in (("chosen", pref.chosen), ("rejected", pref.rejected))}
            rating, safety_label = pref.rating, pref.safety_label
        status = "ok"
        for key in ("chosen", "rejected"):
            if max_length is not None and len(ids[key]) > max_length:
                if on_overlength == "error":
                    raise OverlengthExample(row, key, "over_length",
                                            f"the dialog has {len(ids[key])} tokens, over max_length={max_length} "
                                            "(set on_overlength='truncate' or 'drop' to allow it)")
                if on_overlength == "drop":
                    return {"_status": "drop:over_length"}
                ids[key], status = ids[key][-max_length:], "truncated"
        return {
            "chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"],
            "margin": float(margins_for([rating], margins)[0]),
            "rating_id": -1 if rating is None else RATINGS.index(rating),
            "safety_bin": SAFETY_LABELS.index(safety_label) if safety_label in SAFETY_LABELS else -1,
            "length": max(len(ids["chosen"]), len(ids["rejected"])), "_status": status,
        }

    empty = {"chosen_ids": [], "rejected_ids": [], "margin": 0.0, "rating_id": -1, "safety_bin": -1, "length": 0}
    return _apply_policies(dataset, row_fn, empty, name, on_invalid, num_proc)


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line number, row) of each non-blank line of a JSON-lines file (gzipped when it ends in `.gz`); a
    line that is not a JSON object is an `InvalidDataFile` naming the file and the line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidDataFile(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InvalidDataFile(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _local_rows(path: Path) -> list[dict]:
    """Rows of a local data file; a line that is not a JSON object is an error naming the file and its line."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return [row for _, row in jsonl_rows(path)]
    if name.endswith((".json", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise InvalidDataFile(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InvalidDataFile(f"{path}: expected a JSON list of objects (or JSON lines)")
        return data
    return load_any(str(path)).to_list()


class InvalidDataFile(ValueError):
    """A data file that cannot be read as rows, or a row that breaks the schema: the message names the file, the
    1-based line (row) and the field."""


def read_rows(paths: str | os.PathLike | Sequence[str | os.PathLike],
              validate: Callable[[Mapping, int], Any] | None = None, on_invalid: str = "error",
              known_columns: Collection[str] | None = None) -> list[tuple[str, int, dict]]:
    """`(file, 1-based line, row)` of every row of one or more data files (JSON lines, JSON, Parquet, CSV; a name
    that is not on disk is loaded as a Hub dataset), checked before any work starts.

    `validate(row, line)` raises `InvalidExample` for a bad row: with `on_invalid="error"` that becomes an
    `InvalidDataFile` naming the file, the line and the field (`on_invalid="drop"` leaves the row for the
    preparation step to drop and count). `known_columns`: columns a file may have; any other is an error naming it
    (a misspelt optional column would otherwise be ignored silently).
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise InvalidDataFile("no data file given")
    located: list[tuple[str, int, dict]] = []
    for path in paths:
        local = Path(path)
        if not local.exists() and (str(path).startswith((".", "/")) or local.suffix):
            raise InvalidDataFile(f"{path}: no such file")
        file_rows = _local_rows(local) if local.exists() else load_any(str(path)).to_list()
        if not file_rows:
            raise InvalidDataFile(f"{path}: no rows")
        for n, row in enumerate(file_rows, 1):
            if known_columns is not None:
                unknown = sorted(set(row) - set(known_columns))
                if unknown:
                    close = {u: difflib.get_close_matches(u, list(known_columns), n=1) for u in unknown}
                    hints = ", ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items())
                    raise InvalidDataFile(f"{path}, line {n}: unknown column(s) {hints}; expected columns "
                                          f"{sorted(known_columns)}")
            if validate is not None and on_invalid == "error":
                try:
                    validate(row, n)
                except InvalidExample as err:
                    raise InvalidDataFile(f"{path}, line {n}, field {err.field!r}: {err.detail}") from None
            located.append((str(path), n, row))
    return located


def load_data_files(paths: str | os.PathLike | Sequence[str | os.PathLike],
                    validate: Callable[[Mapping, int], Any] | None = None, on_invalid: str = "error",
                    known_columns: Collection[str] | None = None) -> Dataset:
    """The rows of `read_rows` (same arguments and checks) as one dataset, normalised by `rows_dataset`, with a
    `_source` column ("<file>, line <n>") by which a row refused while it is tokenized is named (`_apply_policies`;
    the column does not survive tokenization)."""
    located = read_rows(paths, validate, on_invalid, known_columns)
    return rows_dataset(located).add_column(SOURCE_COLUMN, [f"{path}, line {n}" for path, n, _ in located])


def _normal_prompt(value: Any) -> Any:
    """A text prompt as the one user message it stands for, so that text and message-list prompts share a column."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "an object" if isinstance(value, Mapping) else type(value).__name__


def rows_dataset(located: Sequence[tuple[str, int, dict]]) -> Dataset:
    """One dataset of `(file, line, row)` rows that may mix the schemas the module docstring allows: every row gets
    every column (null where it has none: `Dataset.from_list` would keep only the first row's columns) and a text
    `prompt` becomes the one user message it stands for. A field whose type still differs between rows is an
    `InvalidDataFile` naming both files and lines."""
    columns = list(dict.fromkeys(k for _, _, row in located for k in row))
    rows = [{k: _normal_prompt(row.get(k)) if k == "prompt" else row.get(k) for k in columns}
            for _, _, row in located]
    try:
        return Dataset.from_list(rows)
    except (ValueError, TypeError):  # pyarrow's ArrowInvalid / ArrowTypeError: one column, two types
        first: dict[str, tuple[str, int, str]] = {}
        for (path, n, _), row in zip(located, rows):
            for k, v in row.items():
                if v is None:
                    continue
                seen = first.setdefault(k, (path, n, _kind(v)))
                if seen[2] != _kind(v):
                    raise InvalidDataFile(f"{path}, line {n}, field {k!r}: {_kind(v)}, where {seen[0]}, line "
                                          f"{seen[1]} has {seen[2]}; a field must have one type in all rows") from None
        raise


def load_any(path_or_name: str, split: str = "train", data_dir: str | None = None) -> Dataset:
    """A local JSON/JSONL (optionally gzipped) or Parquet file, or a Hub dataset by name."""
    lowered = path_or_name.lower()
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".jsonl.gz", "json"), (".json.gz", "json"),
                            (".parquet", "parquet"), (".csv", "csv")):
        if lowered.endswith(suffix):
            return load_dataset(builder, data_files=path_or_name, split="train")
    return load_dataset(path_or_name, data_dir=data_dir, split=split)

"""Pairs to annotate and the answers file of the annotation page.

Pairs file (JSON lines), one pair per line:
  - `id`: text or integer, unique in the file (it is how an answer finds its pair again after a restart);
  - `prompt` (text, or the message list of the previous turns ending with `user`) or `messages`;
  - `response_a`, `response_b`: the two responses to compare (non-empty, different texts);
  - optional `is_safety_prompt` (bool or null) and `version` (the RLHF version that sampled the pair).

Answers file: one preference row per answer, in the schema the reward trainer reads (`llama2_hf.data`): `prompt`
(as messages), `chosen`, `rejected`, `rating`, `safety_label`, `is_safety_prompt`, plus `id`, `annotator`, `version`
and `annotated_at` (UTC, ISO 8601). Each answer is appended as one complete line and fsynced before the page is told
it was recorded, so a killed server loses nothing it acknowledged; on start the file is read back and only the pairs
without an answer are offered.

One answer per pair: the first annotator to answer a pair settles it, and every annotator sees only the pairs nobody
has answered (a second answer to the same pair is refused). The reward trainer reads each row as one comparison, so a
pair labelled twice would count twice.

Pairs where the preferred response is labelled unsafe and the other safe are excluded from the training data, as the
paper does (§3.2.1): they go to a separate file next to the answers (`<answers>.excluded.jsonl`, same columns,
`safety_label` = `chosen_unsafe_rejected_safe`) so that the judgement is kept and the pair counts as answered.
"""

from __future__ import annotations

import datetime as dt
import difflib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import SAFETY_TAG, InvalidDataFile, InvalidExample, jsonl_rows, prompt_row, validate_preference
from ..losses import RATINGS

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("id", "prompt", "messages", "response_a", "response_b", SAFETY_TAG, "version")
EXCLUDED_LABEL = "chosen_unsafe_rejected_safe"
"""Safety label of an excluded answer: the preferred response unsafe, the other safe (never training data)."""
SAFETY_VALUES = ("safe", "unsafe")
ANNOTATOR_MAX_CHARS = 64


class DuplicateAnswer(ValueError):
    """An answer to a pair that already has one."""


class InvalidAnswer(ValueError):
    """An answer the page sent that breaks the protocol (unknown pair, rating, choice or safety label)."""


@dataclass(frozen=True)
class Pair:
    """One validated pair: `prompt` as messages ending with a user turn, the two responses, the tags."""

    id: str
    prompt: list[dict]
    response_a: str
    response_b: str
    is_safety_prompt: bool | None
    version: int | str | None
    line: int

    def to_page(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "response_a": self.response_a, "response_b": self.response_b,
                "is_safety_prompt": bool(self.is_safety_prompt)}


def excluded_path(output_file: str | os.PathLike) -> Path:
    """`answers.jsonl` -> `answers.excluded.jsonl` (the answers the paper leaves out of the training data)."""
    p = Path(output_file)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(f"{stem}.excluded.jsonl")


def _pair(example: Mapping, n: int) -> Pair:
    unknown = sorted(set(example) - set(PAIR_COLUMNS))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, PAIR_COLUMNS, n=1)
        raise InvalidExample(n, name, "unknown_field", "unknown column" + (f" (did you mean {close[0]!r}?)" if close
                                                                            else f"; expected {list(PAIR_COLUMNS)}"))
    pair_id = example.get("id")
    if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)) or not str(pair_id).strip():
        raise InvalidExample(n, "id", "bad_type", f"every pair needs an id (text or integer), got {pair_id!r}")
    parsed = prompt_row(example, n)  # the one prompt parser: text or messages, safety tag type
    responses = {}
    for name in ("response_a", "response_b"):
        if name not in example:
            raise InvalidExample(n, name, "missing_field", f"missing (columns present: {sorted(example)})")
        value = example[name]
        if not isinstance(value, str) or not value.strip():
            raise InvalidExample(n, name, "empty_response", f"expected non-empty response text, got {value!r}")
        responses[name] = value
    if responses["response_a"].strip() == responses["response_b"].strip():
        raise InvalidExample(n, "response_b", "identical_responses", "identical to 'response_a': nothing to compare")
    version = example.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
        raise InvalidExample(n, "version", "bad_type", f"expected text, an integer or null, got {version!r}")
    return Pair(str(pair_id), parsed.messages, responses["response_a"], responses["response_b"],
                example.get(SAFETY_TAG), version, n)


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """The validated pairs of a JSONL file, in file order; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise InvalidDataFile(f"{path}: no such file")
    pairs, seen = [], {}
    for n, example in jsonl_rows(path):
        try:
            pair = _pair(example, n)
        except InvalidExample as err:
            raise InvalidDataFile(f"{path}, line {n}, field {err.field!r}: {err.detail}") from None
        if pair.id in seen:
            raise InvalidDataFile(f"{path}, line {n}, field 'id': {pair.id!r} is also the id of line {seen[pair.id]}")
        seen[pair.id] = n
        pairs.append(pair)
    if not pairs:
        raise InvalidDataFile(f"{path}: no pairs")
    return pairs


def answer_row(pair: Pair, annotator: str, choice: str, rating: str, safety_a: str | None, safety_b: str | None,
               version: int | str | None = None) -> dict:
    """The preference row of one answer. `choice` is `a` or `b` (the better response), `rating` one of `RATINGS`
    or `unsure`, `safety_a` / `safety_b` `safe`, `unsafe` or None (both or neither; both on a safety prompt).
    `version` is written when the pair has none. The row's `safety_label` is `EXCLUDED_LABEL` when the chosen
    response is unsafe and the other safe."""
    annotator = annotator.strip() if isinstance(annotator, str) else ""
    if not annotator or len(annotator) > ANNOTATOR_MAX_CHARS:
        raise InvalidAnswer(f"the annotator name must be 1 to {ANNOTATOR_MAX_CHARS} characters, got {annotator!r}")
    if choice not in ("a", "b"):
        raise InvalidAnswer(f"choice must be 'a' or 'b', got {choice!r}")
    if rating == "unsure":  # the paper pools "unsure" with "negligibly better" (one answer on the page)
        rating = "negligibly_better"
    if rating not in RATINGS:
        raise InvalidAnswer(f"rating must be one of {RATINGS}, got {rating!r}")
    for name, value in (("safety_a", safety_a), ("safety_b", safety_b)):
        if value is not None and value not in SAFETY_VALUES:
            raise InvalidAnswer(f"{name} must be 'safe', 'unsafe' or null, got {value!r}")
    if (safety_a is None) != (safety_b is None):
        raise InvalidAnswer("label the safety of both responses or of neither")
    if pair.is_safety_prompt and safety_a is None:
        raise InvalidAnswer("this is a safety prompt: label each response safe or unsafe")
    chosen, rejected = (pair.response_a, pair.response_b) if choice == "a" else (pair.response_b, pair.response_a)
    safety_label = None
    if safety_a is not None:
        chosen_safe, rejected_safe = ((safety_a, safety_b) if choice == "a" else (safety_b, safety_a))
        safety_label = {("safe", "unsafe"): "chosen_safe_rejected_unsafe", ("safe", "safe"): "both_safe",
                        ("unsafe", "unsafe"): "both_unsafe", ("unsafe", "safe"): EXCLUDED_LABEL}[
                            (chosen_safe, rejected_safe)]
    now = dt.datetime.now(dt.timezone.utc)
    return {"id": pair.id, "prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "rating": rating,
            "safety_label": safety_label, SAFETY_TAG: pair.is_safety_prompt, "annotator": annotator,
            "version": pair.version if pair.version is not None else version,
            "annotated_at": now.isoformat(timespec="seconds")}


def append_line(fd: int, obj: Any) -> None:
    """Append one JSON line to a file opened with O_APPEND and fsync it: a reader sees the whole line or nothing
    of it (one write of the full line; a crash mid-write leaves a torn last line without newline, which
    `AnswerStore` trims on start because it was never acknowledged)."""
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    view = memoryview(data)
    while view:  # os.write may write less than asked (signals, full disk); finish the line
        view = view[os.write(fd, view):]
    os.fsync(fd)


class _AnswerFile:
    """One append-only JSONL file, locked against a second server writing to it."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InvalidDataFile(f"{path}: another annotation server is writing to this file") from None
        if created:  # make the new directory entry durable too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._trim_torn_tail()

    def _trim_torn_tail(self) -> None:
        size = os.fstat(self.fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        # A last line without its newline is a write the server died in before acknowledging it: the pair is
        # still unanswered and will be offered again, so the torn bytes are dropped (and logged).
        logger.warning("%s: dropping an incomplete last line (an answer interrupted before it was recorded): %r",
                       self.path, data[keep:][:200])
        os.ftruncate(self.fd, keep)
        os.fsync(self.fd)

    def rows(self):
        yield from jsonl_rows(self.path)

    def append(self, row: dict) -> None:
        append_line(self.fd, row)

    def close(self) -> None:
        os.close(self.fd)  # also releases the lock


class AnswerStore:
    """The answers to a set of pairs: which pairs are left, and recording an answer at once, atomically.

    Thread-safe (the server answers requests on several threads). `next_pair(annotator)` hands each annotator a
    different unanswered pair where it can (a pair offered to someone stays theirs for `hold_s` seconds), so that
    annotators working at the same time rarely answer the same pair; when they do, the second answer is refused.
    """

    def __init__(self, pairs: list[Pair], output_file: str | os.PathLike, version: int | str | None = None,
                 hold_s: float = 600.0):
        self.pairs = {p.id: p for p in pairs}
        self.version, self.hold_s = version, hold_s
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}  # pair id -> (annotator, monotonic time offered)
        self.answered: dict[str, str] = {}  # pair id -> annotator
        self.files = {"preferences": _AnswerFile(Path(output_file))}
        try:
            self.files["excluded"] = _AnswerFile(excluded_path(output_file))
            other = 0
            for kind, file in self.files.items():
                other += self._read_back(kind, file)
        except BaseException:
            self.close()
            raise
        if other:
            logger.info("%d earlier answers in %s are for pairs not in this pairs file (kept as they are)", other,
                        output_file)
        logger.info("%d of %d pairs answered, %d left", self.answered_count, len(self.pairs), self.left_count)

    def _read_back(self, kind: str, file: _AnswerFile) -> int:
        """Load the answers already in `file`; each must be a valid row that matches its pair. Returns how many
        rows are for pairs outside the pairs file."""
        other = 0
        for n, row in file.rows():
            where = f"{file.path}, line {n}"
            for name in ("id", "annotator"):
                if not isinstance(row.get(name), str):
                    raise InvalidDataFile(f"{where}, field {name!r}: expected text, got {row.get(name)!r}")
            if kind == "preferences":
                try:
                    validate_preference(row, n)
                except InvalidExample as err:
                    raise InvalidDataFile(f"{where}, field {err.field!r}: {err.detail}") from None
            elif row.get("safety_label") != EXCLUDED_LABEL:
                raise InvalidDataFile(f"{where}, field 'safety_label': expected {EXCLUDED_LABEL!r} in the file of "
                                      f"excluded answers, got {row.get('safety_label')!r}")
            pair_id = row["id"]
            if pair_id in self.answered:
                raise InvalidDataFile(f"{where}, field 'id': pair {pair_id!r} has a second answer (one answer per "
                                      "pair; remove one of them)")
            pair = self.pairs.get(pair_id)
            if pair is None:
                other += 1
            elif (row.get("prompt") != pair.prompt
                  or {row.get("chosen"), row.get("rejected")} != {pair.response_a, pair.response_b}):
                # an id reused for another pair would otherwise mark the new pair as answered
                raise InvalidDataFile(f"{where}, field 'id': the answer to pair {pair_id!r} has another prompt or "
                                      f"other responses than line {pair.line} of the pairs file")
            self.answered[pair_id] = row["annotator"]
        return other

    @property
    def answered_count(self) -> int:
        return sum(1 for pid in self.pairs if pid in self.answered)

    @property
    def left_count(self) -> int:
        return len(self.pairs) - self.answered_count

    def progress(self, annotator: str | None = None) -> dict:
        with self._lock:
            by_you = sum(1 for pid, who in self.answered.items() if who == annotator and pid in self.pairs)
            return {"answered": self.answered_count, "total": len(self.pairs), "left": self.left_count,
                    "by_you": by_you}

    def next_pair(self, annotator: str, now: float) -> Pair | None:
        """The first unanswered pair, in file order, not held by another annotator (else the first unanswered one);
        None when every pair is answered. `now`: a monotonic time in seconds."""
        with self._lock:
            fallback = None
            for pid, pair in self.pairs.items():
                if pid in self.answered:
                    continue
                holder, since = self._held.get(pid, (annotator, now))
                if holder == annotator or now - since > self.hold_s:
                    self._held[pid] = (annotator, now)
                    return pair
                fallback = fallback or pair
            return fallback

    def record(self, pair_id: str, annotator: str, choice: str, rating: str, safety_a: str | None = None,
               safety_b: str | None = None) -> str:
        """Validate an answer, append it (fsynced) to the answers file or the excluded file, and return which
        (`preferences` or `excluded`). Raises `InvalidAnswer`, or `DuplicateAnswer` if the pair has an answer."""
        pair = self.pairs.get(pair_id)
        if pair is None:
            raise InvalidAnswer(f"no pair with id {pair_id!r} in the pairs file")
        row = answer_row(pair, annotator, choice, rating, safety_a, safety_b, self.version)
        kind = "excluded" if row["safety_label"] == EXCLUDED_LABEL else "preferences"
        if kind == "preferences":
            validate_preference(row, 0)  # what the reward trainer will check; a failure here is a bug
        with self._lock:
            if pair_id in self.answered:
                raise DuplicateAnswer(f"pair {pair_id!r} was already answered by {self.answered[pair_id]!r}")
            self.files[kind].append(row)
            self.answered[pair_id] = row["annotator"]
            self._held.pop(pair_id, None)
        logger.info("pair %s answered by %s (%s)", pair_id, row["annotator"], kind)
        return kind

    def close(self) -> None:
        for file in self.files.values():
            file.close()

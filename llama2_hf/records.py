"""Run records and outputs: what a stage leaves in its folder, and the process state it runs in.

A leaf of the package (it imports only `errors` and `run_lock`): library code (trainers, samplers, the Hub helpers) and
the stage runner (`llama2_hf.runner`) both use it, and it knows nothing of the stages.

- `RunRecord` (`run.json`, written atomically and last) holds the stage, the resolved arguments, the inputs with
  content hashes (`content_hash`), the outputs, the metrics and the library versions; `stage_output` reads a named
  output of a finished stage's folder.
- Outputs are never half-written: `write_json_atomic`, `write_jsonl_atomic` and `replacing_folder` swap new contents
  in whole; `RankParts` gives each rank of a launch its own resumable JSONL part, merged once by rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
RUN_ARGS = "run_args.json"


# ---------------------------------------------------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of an argument value (enums by value, paths and other objects as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and type(value).__module__ != "builtins" and isinstance(value.value, (str, int)):
        return value.value  # Enum (IntervalStrategy, SchedulerType, ...)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolved_args(*instances) -> dict[str, Any]:
    """Every init field of the argument dataclasses, flat (field names are unique across a stage's dataclasses)."""
    out: dict[str, Any] = {}
    for inst in instances:
        if inst is None:
            continue
        for f in dataclasses.fields(inst):
            if f.init and not f.name.startswith("_"):
                out[f.name] = _jsonable(getattr(inst, f.name))
    return out


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _content_files(folder: Path) -> Iterator[Path]:
    """The files that make a folder's content: not a run's bookkeeping (hidden files such as its lock and temporary
    files, `run_args.json`) nor Trainer checkpoints, which a user may delete without changing the result."""
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).parts
        if (f.is_file() and rel[-1] != RUN_ARGS and not any(part.startswith(".") for part in rel)
                and not any(part.startswith("checkpoint-") for part in rel[:-1])):
            yield f


def content_hash(path: str | os.PathLike) -> dict[str, Any]:
    """`{"path", "sha256"}` of a file or folder (the folder hash covers the relative names and contents of its
    content files, see `_content_files`), or `{"path", "hub": True}` for a name that is not on disk (a Hub id)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(path), "sha256": file_sha256(p)}
    if p.is_dir():
        h = hashlib.sha256()
        for f in _content_files(p):
            h.update(str(f.relative_to(p)).encode() + b"\0" + file_sha256(f).encode())
        return {"path": str(path), "sha256": h.hexdigest()}
    return {"path": str(path), "hub": True}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("llama2_hf", "torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class RunRecord:
    """What a stage did: the same typed record for every stage, stored as `<output_dir>/run.json`."""

    stage: str
    args: dict[str, Any]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    world_size: int = 1
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, output_dir: str | os.PathLike) -> Path:
        return write_json_atomic(Path(output_dir) / RUN_RECORD, self.to_dict())

    def output(self, name: str, output_dir: str | os.PathLike | None = None) -> Path:
        """Absolute path of output `name` (outputs are stored relative to the stage's folder)."""
        base = Path(output_dir if output_dir is not None else self.args.get("output_dir", "."))
        return base / self.outputs[name]

    @classmethod
    def read(cls, output_dir: str | os.PathLike) -> RunRecord:
        path = Path(output_dir) / RUN_RECORD
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or not {"stage", "args"} <= raw.keys():
            raise UsageError(f"{path}: not a run record (expected the keys {sorted(names)})")
        return cls(**{k: v for k, v in raw.items() if k in names})


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write JSON to a temporary file in the same folder, then rename it over `path` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write rows as JSON lines to a temporary sibling, then rename it over `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def stage_output(path: str | os.PathLike, name: str) -> Path:
    """Resolve an input that may be a previous stage's folder: a folder with a `run.json` whose outputs hold `name`
    gives that output; anything else is returned as it is (a file, a plain folder, a Hub id)."""
    p = Path(path)
    if (p / RUN_RECORD).is_file():
        record = RunRecord.read(p)
        if name in record.outputs:
            return p / record.outputs[name]
        raise UsageError(f"{p}: the {record.stage!r} stage that wrote this folder has no {name!r} output "
                         f"(it has {sorted(record.outputs)})")
    return p


def prefer_cpu() -> None:
    """A stage's `use_cpu`: run on the CPU even when a GPU is present, as `accelerate launch --cpu` does (through
    accelerate's own `ACCELERATE_USE_CPU`). It takes effect where the process state is first made, which `StageRun`
    does first."""
    os.environ["ACCELERATE_USE_CPU"] = "true"


def distributed_state():
    """accelerate's process state. Without a GPU it must be asked for CPU processes explicitly: a bare
    `PartialState()` under `accelerate launch --multi_gpu` on a CPU machine leaves every rank a single process."""
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


# Outputs: folders swapped in whole, per-rank JSONL parts merged once
# ---------------------------------------------------------------------------------------------------------------------

@contextmanager
def replacing_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Write a folder's new contents into a temporary sibling, then swap it in: a failure or a kill before the swap
    leaves the old folder as it was (a kill during the two renames leaves it under `<name>.old`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f"{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


class RankParts:
    """JSONL output split over the ranks of a launch: each rank appends finished rows to its own part file (so a
    killed rank resumes from what it wrote), and rank 0 merges the parts into one file in the original row order.

        parts = RankParts(output_dir / "parts", "samples")
        mine = parts.my_share(rows)                 # [(index, row)] of this rank: contiguous, nothing shared
        todo = [(i, r) for i, r in mine if i not in parts.done_indices()]
        ... parts.append({"index": i, ...})         # one complete JSON line per finished row, flushed
        merged = parts.merge(output_dir / "samples.jsonl", expected=len(rows))   # rank 0; checks the index set

    A part file's lines carry an integer `index` (the row's position in the full input); a torn last line from a
    kill is dropped and its row redone.
    """

    def __init__(self, folder: str | os.PathLike, name: str):
        self.state = distributed_state()
        self.folder, self.name = Path(folder), name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{name}.rank{self.state.process_index}-of-{self.state.num_processes}.jsonl"
        if self.path.is_file():  # a row cut by a kill: drop it so that the next append starts a new line
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                logger.warning("%s: dropping an unterminated last line (a kill while writing it); its row is redone",
                               self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def my_share(self, rows: Sequence[Any]) -> list[tuple[int, Any]]:
        n, world, rank = len(rows), self.state.num_processes, self.state.process_index
        start, stop = n * rank // world, n * (rank + 1) // world
        return [(i, rows[i]) for i in range(start, stop)]

    def read(self) -> list[dict]:
        return list(_read_jsonl_lenient(self.path))

    def done_indices(self) -> set[int]:
        return {int(r["index"]) for r in self.read()}

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def merge(self, target: str | os.PathLike, expected: int | None = None) -> list[dict]:
        """After every rank finished: rank 0 writes all parts' rows sorted by index to `target` (atomically); every
        rank returns the merged rows. A duplicated or missing index is an error (nothing lost or repeated)."""
        self.state.wait_for_everyone()
        rows: dict[int, dict] = {}
        pattern = f"{self.name}.rank*-of-{self.state.num_processes}.jsonl"
        for part in sorted(self.folder.glob(pattern)):
            for row in _read_jsonl_lenient(part):
                i = int(row["index"])
                if i in rows:
                    raise RuntimeError(f"{part}: row index {i} was written by two ranks")
                rows[i] = row
        if expected is not None and sorted(rows) != list(range(expected)):
            missing = sorted(set(range(expected)) - rows.keys())[:10]
            raise RuntimeError(f"{self.folder}: merged {len(rows)} of {expected} rows; missing indices {missing}")
        merged = [rows[i] for i in sorted(rows)]
        if self.state.is_main_process:
            write_jsonl_atomic(target, merged)
        self.state.wait_for_everyone()
        return merged


def _read_jsonl_lenient(path: Path) -> Iterator[dict]:
    """Rows of a JSONL file this package appended to. An unterminated last line is a write cut by a kill: it is
    skipped (its row is redone); any other broken line is an error naming the line."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines.pop() if not text.endswith("\n") else None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{path}, line {n}: not valid JSON") from None
    if torn:
        logger.warning("%s: skipping an unterminated last line (a kill while writing it); its row is redone", path)


__all__ = [
    "RUN_ARGS", "RUN_RECORD", "RankParts", "RunRecord", "content_hash", "distributed_state", "file_sha256",
    "library_versions", "prefer_cpu", "replacing_folder", "resolved_args", "stage_output", "write_json_atomic",
    "write_jsonl_atomic",
]

"""The one wiring every stage shares: dataclass arguments, the run record, resume checks, rank-split outputs.

A stage is a module of `llama2_hf.stages` that defines `STAGE = Stage(name, help, dataclass_types, main)`. `main`
takes one instance of each dataclass (script arguments, the stage's config, and where it fits TRL's `ModelConfig`)
and returns the stage's `RunRecord`. Every caller reaches it through `Stage.call(*instances)` (typed configs in any
order, the missing ones at their defaults):

    llama2-hf sft --model_name_or_path out/pretrain --train_file data/sft.jsonl --output_dir out/sft
    llama2-hf sft --config recipes/sft/llama2-7b.yaml --output_dir out/sft     # YAML keys = the same field names
    sft.STAGE.call(ModelConfig(model_name_or_path="out/pretrain"), SFTArguments(train_file=["data/sft.jsonl"]),
                   Llama2SFTConfig(output_dir="out/sft"))
    stages.run_stage("sft", model_name_or_path="out/pretrain", train_file="data/sft.jsonl", output_dir="out/sft")

(the last routes keyword values to their dataclasses with `build`), so every knob has one definition and one default
(its dataclass field). `with_fields(configs, output_dir=...)` sets fields of configs built once, as the RLHF loop does
for each version's folders. Under `accelerate launch` the same command runs on every rank; `StageRun` makes rank 0
the only writer of the record, and `RankParts` gives each rank its own resumable output file, merged once by rank 0.

The run record (`run.json`, written atomically and last) holds the stage, the resolved arguments, the inputs with
content hashes, the outputs, the metrics and the library versions. A folder with a `run.json` is complete: rerunning
the same arguments on the same inputs (their sha256 unchanged) returns the record without work; other arguments, or
an input edited since, are refused (nothing is silently mixed or stale), unless a redo is asked for (`--redo`,
`Stage.call(..., redo=True)`), which empties the folder and runs again. While a stage runs, `run_args.json` records
its arguments and the inputs read so far, so that a resume with different ones is refused too; a folder that holds
nothing else (a run that failed its checks) takes new arguments.

A folder belongs to one run at a time: `StageRun` takes an OS-level lock on it (`llama2_hf.run_lock`) for the run's
life; a second run in the same folder is refused, naming the one that holds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import records, run_lock
from .errors import UsageError
from .records import (  # noqa: F401  (the run records' names, for callers of this module)
    RUN_ARGS, RUN_RECORD, RankParts, RunRecord, _jsonable, content_hash, distributed_state, file_sha256,
    library_versions, prefer_cpu, replacing_folder, resolved_args, stage_output, write_json_atomic,
    write_jsonl_atomic,
)

logger = logging.getLogger(__name__)


# Fields that change how a run is observed or scheduled, never what it computes: a resume may change them.
OBSERVATION_FIELDS = frozenset({
    "logging_steps", "logging_first_step", "logging_strategy", "logging_dir", "report_to", "disable_tqdm",
    "run_name", "save_steps", "save_strategy", "save_total_limit", "resume", "resume_from_checkpoint",
    "dataloader_num_workers", "debug", "log_level", "log_level_replica", "push_to_hub", "hub_model_id",
    "hub_token", "progress", "threads", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
})


# ---------------------------------------------------------------------------------------------------------------------
# Stage declaration and argument parsing
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its command name, one-line help, the dataclasses of its arguments and its runner.

    `main(*instances) -> RunRecord` receives one instance per entry of `dataclass_types`, in that order.
    """

    name: str
    help: str
    dataclass_types: tuple[type, ...]
    main: Callable[..., RunRecord]

    def arrange(self, instances: Sequence[Any]) -> tuple:
        """One instance of each of `dataclass_types`, in that order: the given ones (in any order), the missing ones
        default-constructed. An instance of a type the stage does not take, or a second one of a type, is a
        `TypeError` naming the stage and its types."""
        slots: list[Any] = [None] * len(self.dataclass_types)
        for inst in instances:
            exact = [i for i, cls in enumerate(self.dataclass_types) if type(inst) is cls]
            matches = exact or [i for i, cls in enumerate(self.dataclass_types)
                                if not isinstance(inst, type) and isinstance(inst, cls)]
            if len(matches) != 1:
                got = f"the class {inst.__name__}" if isinstance(inst, type) else f"a {type(inst).__name__}"
                raise TypeError(f"stage {self.name!r} takes instances of {self.type_names()}, got {got}")
            if slots[matches[0]] is not None:
                raise TypeError(f"stage {self.name!r}: two instances of {self.dataclass_types[matches[0]].__name__}")
            slots[matches[0]] = inst
        return tuple(cls() if inst is None else inst for cls, inst in zip(self.dataclass_types, slots))

    def call(self, *instances: Any, redo: bool = False) -> RunRecord:
        """Run the stage in this process on typed configs: instances of its dataclasses in any order, the missing
        ones at their defaults (`arrange`). The one path behind `llama2-hf <stage>`, `stages.run_stage`, the RLHF
        loop and the quickstart: `main` runs in a `stage_call(redo)` frame and keeps its own run record
        (`StageRun`). `redo=True` runs again in a folder that holds a finished or interrupted run."""
        arranged = self.arrange(instances)
        with stage_call(redo):
            return self.main(*arranged)

    def type_names(self) -> str:
        return ", ".join(cls.__name__ for cls in self.dataclass_types)


def make_parser(stage: Stage):
    """TRL's `TrlParser` over the stage's dataclasses: `--field value` flags (also `--field-name`) and
    `--config recipe.yaml` whose keys are the same field names."""
    from trl import TrlParser

    parser = TrlParser(stage.dataclass_types, prog=f"llama2-hf {stage.name}", allow_abbrev=False,
                       description=f"{stage.help}. A bare --debug shows the traceback of an error; a bare --redo "
                                   "runs again in a folder that holds a finished or interrupted run.")
    return one_line_errors(parser)


def one_line_errors(parser):
    """`parser` (argparse, HfArgumentParser, TrlParser) with its errors raised as `UsageError`: one line and exit code
    2 through `run_command`, not argparse's usage dump and exit. Every command's parser goes through it."""
    parser.error = _parser_error
    return parser


def _parser_error(message: str):
    raise UsageError(message)


def _closest(name: str, names: Sequence[str]) -> str | None:
    """The argument name nearest to a misspelt `name`, if any is close."""
    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


def check_flags(argv: Sequence[str], names: Sequence[str], command: str) -> None:
    """Refuse a `--flag` that is not an argument of `command`, naming the closest one (before argparse, which would
    take a prefix of a longer name as that name)."""
    for token in argv:
        if not token.startswith("--") or token in ("--config", "--help"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name and name not in names:
            close = _closest(name, names)
            hint = f"; did you mean --{close}?" if close else f" (`llama2-hf {command} --help` lists them)"
            raise UsageError(f"{token.split('=', 1)[0]} is not an argument of `llama2-hf {command}`{hint}")


def _check_recipe_values(parser, path: str, raw: Mapping[str, Any]) -> None:
    """Each recipe value checked against its argument's type and choices, naming the file and key (argparse would
    name only the flag, after printing the whole usage). Text-typed arguments may hold mappings (parsed by their
    config, e.g. `lr_scheduler_kwargs`)."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in raw.items():
        action = actions.get(key)
        if action is None or value is None:
            continue
        takes_list = action.nargs in ("+", "*")
        scalar = action.type not in (None, str, dict)
        if isinstance(value, (list, dict)) and scalar and not (takes_list and isinstance(value, list)):
            raise UsageError(f"--config {path}: {key}: expected one value, got a {type(value).__name__} ({value!r})")
        for item in (value if isinstance(value, list) and takes_list else [value]):
            if isinstance(item, (list, dict)) and scalar:
                raise UsageError(f"--config {path}: {key}: expected {_type_name(action.type)} values, got {item!r}")
            if isinstance(item, str) and scalar:
                try:
                    item = action.type(item)
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    raise UsageError(f"--config {path}: {key}: {item!r} is not {_type_name(action.type)}") from None
            if action.type is int and isinstance(item, float) and not item.is_integer():
                raise UsageError(f"--config {path}: {key}: {item!r} is not a whole number")
            if action.choices is not None and not isinstance(item, (list, dict)) and item not in action.choices:
                raise UsageError(f"--config {path}: {key}: {item!r} is not one of {list(action.choices)}")


def _type_name(kind) -> str:
    return {int: "a whole number", float: "a number", str: "text"}.get(kind, "of the expected type")


def field_names(stage: Stage) -> list[str]:
    return [f.name for cls in stage.dataclass_types for f in dataclasses.fields(cls) if f.init]


def _check_recipe_keys(stage: Stage, path: str) -> dict:
    """The recipe's mapping, after refusing keys that are not fields (with the closest field name)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: a recipe is a YAML mapping of field: value, got {type(raw).__name__}")
    names = field_names(stage)
    for key, value in raw.items():
        if key == "env":
            continue
        if key not in names:
            close = _closest(key, names)
            hint = f"; did you mean {close!r}?" if close else ""
            raise UsageError(f"--config {path}: {key!r} is not an argument of `llama2-hf {stage.name}`{hint}")
        if isinstance(value, str) and _is_float_text(value):
            raise UsageError(f"--config {path}: {key}: {value!r} is read by YAML as a string; write it with a dot "
                             f"({value.replace('e', '.0e', 1) if '.' not in value else value})")
    return raw


def _is_float_text(text: str) -> bool:
    import re

    return re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", text) is not None


def _pop_flag(argv: Sequence[str], flag: str) -> tuple[list[str], bool]:
    """Remove a bare `flag` (one with no value after it: TrainingArguments' own `--debug OPTIONS` is left alone)."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == flag and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            del argv[i]
            return argv, True
    return argv, False


def _pop_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    return _pop_flag(argv, "--debug")


def parse_args(stage: Stage, argv: Sequence[str]) -> tuple[tuple, bool]:
    """(dataclass instances, debug) from a command line that may name a recipe with `--config`."""
    argv, debug = _pop_debug(argv)
    check_flags(argv, field_names(stage), stage.name)
    parser = make_parser(stage)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UsageError("--config needs a recipe path")
        _check_recipe_values(parser, argv[i + 1], _check_recipe_keys(stage, argv[i + 1]))
    try:
        instances = parser.parse_args_and_config(argv)
    except (TypeError, ValueError) as e:  # a dataclass __post_init__ refusing a combination of values
        raise UsageError(str(e)) from e
    return tuple(instances), debug


def build(stage: Stage, **values) -> tuple:
    """The stage's dataclass instances from keyword values (what a recipe or a flag would set), for Python callers.
    Unknown names are an error naming the closest field."""
    names = field_names(stage)
    for key in values:
        if key not in names:
            close = _closest(key, names)
            raise UsageError(f"{key!r} is not an argument of stage {stage.name!r}"
                             + (f"; did you mean {close!r}?" if close else ""))
    instances = []
    for cls in stage.dataclass_types:
        own = {f.name for f in dataclasses.fields(cls) if f.init}
        instances.append(cls(**{k: v for k, v in values.items() if k in own}))
    return tuple(instances)


def with_fields(instances: Sequence[Any], /, **values) -> tuple:
    """`instances` (a stage's typed configs) with fields set by name, in the same order: each instance that owns one
    of the names is made again with `dataclasses.replace` (so its own checks run on the new values), the others are
    kept. A name that is no field of any of them is a `UsageError` naming the closest field.

        configs = with_fields(configs, output_dir="out/v2/ppo", model_name_or_path="out/v2/rs")
    """
    owned = [{f.name for f in dataclasses.fields(inst) if f.init} for inst in instances]
    names = sorted(set().union(*owned))
    for key in values:
        if key not in names:
            close = _closest(key, names)
            kinds = ", ".join(type(inst).__name__ for inst in instances)
            raise UsageError(f"{key!r} is not a field of {kinds or 'no configs'}"
                             + (f"; did you mean {close!r}?" if close else ""))
    return tuple(dataclasses.replace(inst, **{k: v for k, v in values.items() if k in own}) if own & values.keys()
                 else inst for inst, own in zip(instances, owned))


# Whether the stage being run was asked to redo a folder (`--redo`, `Stage.call(..., redo=True)`); read by `StageRun`.
_REDO: ContextVar[bool] = ContextVar("llama2_hf_redo", default=False)


@contextmanager
def stage_call(redo: bool = False) -> Iterator[None]:
    """The frame of one stage call: its redo choice, and the folder locks it took released when it returns or
    fails (a run that dies releases them with its process)."""
    before = run_lock.held()
    token = _REDO.set(redo)
    try:
        yield
    finally:
        _REDO.reset(token)
        for folder in run_lock.held() - before:
            run_lock.release(folder)


def run_command(name: str, argv: Sequence[str], body: Callable[[list[str]], Any]) -> int:
    """Run `body(argv)` as command `llama2-hf <name>`: logging set up, a user error (see `user_error_message`)
    printed as one line on stderr with exit code 2, a bare `--debug` showing the traceback instead."""
    argv, debug = _pop_debug(argv)
    setup_logging()
    try:
        body(argv)
    except Exception as e:  # noqa: BLE001 - classified below; anything else is re-raised
        message = user_error_message(e)
        if message is None or debug:
            raise
        print(f"llama2-hf {name}: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix (bad arguments, files, data), or None for a bug."""
    from .data import InvalidDataFile, InvalidExample
    from .sampling.vllm_engine import VLLMNotInstalled

    if isinstance(error, (UsageError, InvalidDataFile, InvalidExample, FileNotFoundError, json.JSONDecodeError,
                          VLLMNotInstalled)):
        return str(error)
    try:
        from datasets.exceptions import DatasetGenerationError
    except ImportError:  # pragma: no cover
        DatasetGenerationError = ()  # noqa: N806
    if DatasetGenerationError and isinstance(error, DatasetGenerationError):
        cause = error.__cause__ or error.__context__
        return f"could not read the data file: {cause or error}"
    return None


def setup_logging() -> None:
    level = os.environ.get("LLAMA2_HF_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _comparable(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in OBSERVATION_FIELDS}


def describe_mismatch(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    a, b = _comparable(recorded), _comparable(given)
    diffs = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(a.keys() | b.keys())
             if a.get(k) != b.get(k)]
    return "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")


# ---------------------------------------------------------------------------------------------------------------------
# A stage's run: resume check, single writer, record written last
# ---------------------------------------------------------------------------------------------------------------------

class StageRun:
    """The bookkeeping of one stage in `output_dir`, on every rank of a launch.

        run = StageRun("sft", output_dir, args)      # locks the folder; refuses one holding another configuration
        if run.done:                                 # completed with the same arguments and inputs: nothing to do
            return run.record
        ... work; run.add_input("train", path); run.outputs["model"] = "."; run.metrics.update(...)
        return run.finish()                          # rank 0 writes run.json atomically, last; the lock is released

    `args` are the resolved arguments (`resolved_args(...)`); those outside `OBSERVATION_FIELDS` must equal the
    recorded ones on a resume or a rerun, else a `UsageError` names the differences. A finished folder is returned
    only while every recorded input still has its recorded sha256; an interrupted run resumes only on the inputs it
    started with (checked as `add_input` sees each). A redo (`--redo`) empties the folder and runs again.
    """

    def __init__(self, stage: str, output_dir: str | os.PathLike, args: Mapping[str, Any]):
        self.stage, self.dir, self.args = stage, Path(output_dir), dict(args)
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.record: RunRecord | None = None
        if self.args.get("use_cpu"):
            prefer_cpu()
        self.state = records.distributed_state()  # looked up on the module: one place to replace it
        self._start = time.perf_counter()
        self._started_inputs: dict[str, dict[str, Any]] = {}
        self._on_main(lambda: run_lock.acquire(self.dir))
        self._check_folder()

    @property
    def done(self) -> bool:
        return self.record is not None

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def _on_main(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the main process only; a `UsageError` it raises is raised on every rank."""
        error = None
        if self.is_main:
            try:
                fn()
            except UsageError as e:
                error = str(e)
        if self.state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = broadcast_object_list([error], from_process=0)
            error = box[0]
        if error is not None:
            raise UsageError(error)

    def _check_folder(self) -> None:
        record_path, args_path = self.dir / RUN_RECORD, self.dir / RUN_ARGS
        redo = _REDO.get()
        if record_path.is_file():
            record = RunRecord.read(self.dir)
            self._refuse_mismatch(record.stage, record.args, record_path, check_args=not redo)
            if not redo:
                self._on_main(lambda: self._refuse_changed_inputs(record.inputs))
                logger.info("%s: %s is complete with these arguments and inputs; returning its record (--redo runs "
                            "it again)", self.stage, self.dir)
                self.record = record
                return
        elif args_path.is_file() and self._holds_work():
            started = json.loads(args_path.read_text(encoding="utf-8"))
            self._refuse_mismatch(started.get("stage"), started.get("args", {}), args_path, check_args=not redo)
            if not redo:
                self._started_inputs = started.get("inputs", {})
                logger.info("%s: resuming the run in %s", self.stage, self.dir)
        if redo and (record_path.is_file() or args_path.is_file()):
            logger.info("%s: --redo: emptying %s to run again", self.stage, self.dir)
            self._on_main(self._empty_folder)
        self.state.wait_for_everyone()
        if self.is_main:
            self._write_args()
        self.state.wait_for_everyone()

    def _holds_work(self) -> bool:
        """Whether the folder holds anything a run wrote besides its arguments (else a failed start: nothing to
        protect, new arguments are taken)."""
        return any(q.is_file() and q.name not in (run_lock.LOCK_FILE, RUN_ARGS) for q in self.dir.rglob("*"))

    def _empty_folder(self) -> None:
        for entry in self.dir.iterdir():
            if entry.name == run_lock.LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _write_args(self) -> None:
        write_json_atomic(self.dir / RUN_ARGS, {"stage": self.stage, "args": _jsonable(self.args),
                                                "inputs": {**self._started_inputs, **self.inputs}})

    def _refuse_mismatch(self, stage: str | None, recorded: Mapping[str, Any], path: Path,
                         check_args: bool = True) -> None:
        if stage != self.stage:
            raise UsageError(f"{self.dir} holds a {stage!r} run, not {self.stage!r}: choose another output_dir")
        given = _jsonable(self.args)
        if check_args and _comparable(recorded) != _comparable(given):
            raise UsageError(f"{self.dir} holds a {self.stage} run with other arguments ({path.name}): "
                             f"{describe_mismatch(recorded, given)}. Resume with the same arguments, run again "
                             "with --redo, or choose another output_dir")

    def _refuse_changed_inputs(self, recorded: Mapping[str, Mapping[str, Any]]) -> None:
        for name, entry in recorded.items():
            change = _input_change(entry)
            if change:
                raise UsageError(f"{self.dir} holds a finished {self.stage} run, but its input {name} "
                                 f"({entry['path']}) {change}: run again with --redo, or choose another output_dir")

    def add_input(self, name: str, path: str | os.PathLike | None) -> None:
        """Record input `name` with its content hash (rank 0). On a resume, an input whose content differs from
        what the interrupted run started with is refused."""
        if path is None or not self.is_main:
            return
        entry = content_hash(path)
        before = self._started_inputs.get(name)
        if before and before.get("sha256") and before.get("sha256") != entry.get("sha256"):
            raise UsageError(f"{self.dir} holds an interrupted {self.stage} run that started on another {name} "
                             f"({path} has changed since): resume it on the same input, run again with --redo, or "
                             "choose another output_dir")
        self.inputs[name] = entry
        self._write_args()

    def finish(self) -> RunRecord:
        """Write the record (rank 0), after every rank is done; every rank returns it. The folder's lock is
        released."""
        self.state.wait_for_everyone()
        self.record = RunRecord(
            stage=self.stage, args=_jsonable(self.args), inputs=self.inputs, outputs=self.outputs,
            metrics=_jsonable(self.metrics), versions=library_versions(), world_size=self.state.num_processes,
            seconds=round(time.perf_counter() - self._start, 1))
        if self.is_main:
            self.record.write(self.dir)
            (self.dir / RUN_ARGS).unlink(missing_ok=True)
        self.state.wait_for_everyone()
        if self.is_main:
            run_lock.release(self.dir)
        return self.record


def _input_change(entry: Mapping[str, Any]) -> str | None:
    """How a recorded input differs from what is on disk now (None when it has the recorded sha256)."""
    if "sha256" not in entry:
        return None  # a Hub id: its revision is an argument
    path = Path(entry["path"])
    if not path.exists():
        return "no longer exists"
    now = content_hash(path)["sha256"]
    if now != entry["sha256"]:
        return f"has changed since (sha256 {entry['sha256'][:12]} -> {now[:12]})"
    return None


# ---------------------------------------------------------------------------------------------------------------------
__all__ = [
    "OBSERVATION_FIELDS", "RankParts", "RunRecord", "Stage", "StageRun", "UsageError", "build",
    "content_hash", "make_parser", "parse_args", "replacing_folder", "resolved_args", "stage_call", "stage_output",
    "user_error_message", "with_fields", "write_json_atomic", "write_jsonl_atomic",
]

"""Console progress of a multi-stage job: one bar per stage, `[k/n] name`, percent, elapsed and estimated time left.

A job opens a `Progress` with the number of its stages and runs each stage inside `progress.stage(name, parts)`
(or the module's `stage`, which library code calls to show its own stages inside whatever job is running it);
the code that does the work reports how far it is with the module functions, which are no-ops when no bar is open
(every stage keeps working the same outside a job that shows progress):

    with Progress(3) as progress:
        with progress.stage("sft", parts=2):
            task = start_task(total=len(batches))  # part 1 of 2
            for batch in batches:
                ...
                task.advance()
            ...

A stage's fraction is (finished parts + the current part's fraction) / parts, never going backwards; the estimate is
elapsed x (1 - fraction) / fraction. Trainer-based stages report through `attach_to_trainer` (it replaces the
Trainer's own log printer, which prints raw metric dicts, by a callback that reports optimizer steps). While a
`Progress` is open, log records below ERROR go to its `log_file` (when given) instead of the console, and the progress
bars of transformers and datasets are off, so the console holds the stage bars only; all is restored when it closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_ACTIVE: _StageBar | None = None
_PROGRESS: Progress | None = None
QUIET_LOGGERS = ("llama2_hf", "transformers", "trl", "accelerate", "datasets", "peft", "DeepSpeed", "deepspeed",
                 "torch.distributed", "py.warnings")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class _StageBar:
    """One stage's bar. On a terminal it redraws in place (at most every `refresh_s`); elsewhere (a log file, CI)
    it prints one line when the stage starts and one when it ends."""

    def __init__(self, label: str, parts: int, stream: TextIO, width: int = 24, refresh_s: float = 0.5):
        self.label, self.parts, self.stream, self.width, self.refresh_s = label, max(1, parts), stream, width, refresh_s
        self.start = time.monotonic()
        self.fraction = 0.0
        self.part = 0  # parts started so far
        self.in_part = 0  # depth of open `part()` blocks: a Task inside one reports within that part
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn = 0.0
        if not self.tty:
            print(f"{label} ...", file=stream, flush=True)
        self.draw(force=True)

    def start_part(self) -> None:
        self.part += 1
        self.parts = max(self.parts, self.part)
        self.set_part_fraction(0.0)

    def set_part_fraction(self, value: float) -> None:
        done = (max(self.part, 1) - 1 + min(max(value, 0.0), 1.0)) / self.parts
        if done > self.fraction:
            self.fraction = done
            self.draw()

    def line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        filled = int(round(self.fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        if final:
            tail = f"done in {_clock(elapsed)}"
        elif self.fraction >= 0.02:
            tail = f"{_clock(elapsed)} elapsed, ~{_clock(elapsed * (1 - self.fraction) / self.fraction)} left"
        else:
            tail = f"{_clock(elapsed)} elapsed"
        return f"{self.label} [{bar}] {100 * self.fraction:3.0f}%  {tail}"

    def draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if force or now - self._drawn >= self.refresh_s:
            self._drawn = now
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()

    def close(self, ok: bool) -> float:
        elapsed = time.monotonic() - self.start
        if ok:
            self.fraction = 1.0
        text = self.line(final=True) if ok else self.line() + "  (stopped)"
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        return elapsed


class Task:
    """One part of the open stage with a known amount of work (`total` units)."""

    def __init__(self, total: float):
        self.total, self.done = max(float(total), 1e-9), 0.0
        if _ACTIVE is not None and not _ACTIVE.in_part:
            _ACTIVE.start_part()

    def update(self, done: float) -> None:
        self.done = done
        if _ACTIVE is not None:
            _ACTIVE.set_part_fraction(done / self.total)

    def advance(self, n: float = 1) -> None:
        self.update(self.done + n)


def start_task(total: float) -> Task:
    """Start the next part of the open stage (a no-op handle without one); inside a `part()` block, the task
    reports within that part instead."""
    return Task(total)


@contextlib.contextmanager
def part() -> Iterator[None]:
    """One part of the open stage around code that may or may not report tasks of its own (a step that samples and
    then trains): the part is complete when the block ends."""
    bar = _ACTIVE
    if bar is None:
        yield
        return
    bar.start_part()
    bar.in_part += 1
    try:
        yield
    finally:
        bar.in_part -= 1
    bar.set_part_fraction(1.0)


def active() -> bool:
    return _ACTIVE is not None


class Progress:
    """The bars of a job of `total` stages (see the module docstring). `stream` defaults to standard error."""

    def __init__(self, total: int, stream: TextIO | None = None, quiet: bool = True,
                 log_file: str | os.PathLike | None = None):
        self.total, self.stream, self.quiet, self.log_file = total, stream or sys.stderr, quiet, log_file
        self.index = 0
        self.seconds: dict[str, float] = {}
        self._restore: list = []

    def __enter__(self) -> Progress:
        global _PROGRESS
        if self.quiet:
            self._silence()
        self._restore.append(lambda previous=_PROGRESS: globals().__setitem__("_PROGRESS", previous))
        _PROGRESS = self
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()

    def _silence(self) -> None:
        """Keep the console for the bars: log records below ERROR leave the console handlers (of the root logger and
        of libraries with their own, such as transformers) and go to `log_file` when one is given; the progress bars
        of transformers and datasets are turned off."""
        def console_only_errors(record: logging.LogRecord) -> bool:
            return record.levelno >= logging.ERROR

        file_handler = None
        if self.log_file is not None:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(self.log_file, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                                        "%Y-%m-%d %H:%M:%S"))
        for name in ("", *QUIET_LOGGERS):
            log = logging.getLogger(name)
            for handler in log.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    handler.addFilter(console_only_errors)
                    self._restore.append(lambda h=handler: h.removeFilter(console_only_errors))
            if file_handler is not None and (name == "" or (log.handlers and not log.propagate)):
                log.addHandler(file_handler)
                self._restore.append(lambda log=log: log.removeHandler(file_handler))
        if file_handler is not None:
            self._restore.insert(0, file_handler.close)
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                self._restore.append(hf_logging.enable_progress_bar)
        with contextlib.suppress(ImportError):
            import datasets

            if datasets.is_progress_bar_enabled():
                datasets.disable_progress_bars()
                self._restore.append(datasets.enable_progress_bars)

    @contextlib.contextmanager
    def stage(self, name: str, parts: int = 1) -> Iterator[None]:
        """Run one stage under its bar; a stage that raises is drawn as stopped."""
        global _ACTIVE
        self.index += 1
        width = len(str(self.total))
        bar = _StageBar(f"[{self.index:>{width}}/{self.total}] {name:<24}", parts, self.stream)
        previous, _ACTIVE = _ACTIVE, bar
        ok = False
        try:
            yield
            ok = True
        finally:
            _ACTIVE = previous
            self.seconds[name] = bar.close(ok)


@contextlib.contextmanager
def stage(name: str, parts: int = 1) -> Iterator[None]:
    """The next stage bar of the open `Progress` (nothing without one): lets a library loop (`llama2_hf.iterate`'s
    versions) show its own stages inside a job that counts them."""
    if _PROGRESS is None:
        yield
        return
    with _PROGRESS.stage(name, parts):
        yield


def attach_to_trainer(trainer) -> None:
    """While a stage bar is open: report the Trainer's optimizer steps to it and drop the Trainer's own console
    output (the metric-dict printer and its tqdm bar); otherwise leave the Trainer as it is."""
    if _ACTIVE is None:
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class _Report(TrainerCallback):
        def __init__(self):
            self.task = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.task = start_task(max(1, state.max_steps))
            self.task.update(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.task is not None:
                self.task.update(state.global_step)

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(_Report())


__all__ = ["Progress", "Task", "active", "attach_to_trainer", "part", "stage", "start_task"]

"""The console progress of multi-stage jobs (`llama2_hf.progress`): one bar per stage, fractions from the parts of a
stage, the Trainer hook, and the console kept for the bars."""

import io
import logging

import pytest

from llama2_hf import progress
from llama2_hf.progress import Progress, attach_to_trainer, start_task


def test_stage_lines_fractions_and_a_stopped_stage():
    stream = io.StringIO()  # not a terminal: one line when a stage starts and one when it ends
    with Progress(3, stream=stream, quiet=False) as bars:
        with bars.stage("sft", parts=2):
            first = start_task(4)
            first.update(4)
            assert progress._ACTIVE.fraction == pytest.approx(0.5)
            second = start_task(10)
            second.update(5)
            assert progress._ACTIVE.fraction == pytest.approx(0.75)
            second.update(2)  # never backwards
            assert progress._ACTIVE.fraction == pytest.approx(0.75)
        with progress.stage("inner"):  # the module function opens the next bar of the open Progress
            pass
        with pytest.raises(RuntimeError):
            with bars.stage("ppo"):
                start_task(2).update(1)
                raise RuntimeError("boom")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[1/3] sft                      ..."
    assert lines[1].startswith("[1/3] sft                      [########################] 100%  done in 00:0")
    assert lines[2].startswith("[2/3] inner") and lines[3].endswith("100%  done in 00:00")
    assert lines[5].startswith("[3/3] ppo                      [############------------]  50%")
    assert lines[5].endswith("(stopped)")
    assert set(bars.seconds) == {"sft", "inner", "ppo"}
    assert not progress.active() and progress._PROGRESS is None
    # without an open Progress everything is a no-op
    start_task(3).advance()
    with progress.stage("nothing"):
        pass


def test_estimate_of_time_left():
    bar = progress._StageBar("[1/1] x", 1, io.StringIO())
    bar.start -= 30  # 30 s elapsed
    bar.fraction = 0.25
    assert bar.line().endswith("00:30 elapsed, ~01:30 left")


def test_console_keeps_errors_only_and_the_log_file_gets_the_rest(tmp_path):
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    log = logging.getLogger("llama2_hf.test_progress")
    try:
        with Progress(1, stream=io.StringIO(), log_file=tmp_path / "job.log"):
            log.info("a stage message")
            log.error("a real problem")
        log.info("after the job")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert console.getvalue().splitlines() == ["a real problem", "after the job"]
    text = (tmp_path / "job.log").read_text()
    assert "INFO llama2_hf.test_progress: a stage message" in text and "a real problem" in text
    assert "after the job" not in text


class _FakeTrainer:
    def __init__(self):
        from transformers.trainer_callback import PrinterCallback

        self.callbacks = [PrinterCallback]

    def remove_callback(self, cls):
        self.callbacks = [c for c in self.callbacks if c is not cls and type(c) is not cls]

    def add_callback(self, callback):
        self.callbacks.append(callback)


def test_trainer_reports_steps_instead_of_printing_metric_dicts():
    from types import SimpleNamespace

    from transformers.trainer_callback import PrinterCallback

    idle = _FakeTrainer()
    attach_to_trainer(idle)  # no job open: the Trainer keeps its own printer
    assert idle.callbacks == [PrinterCallback]
    with Progress(1, stream=io.StringIO(), quiet=False) as bars, bars.stage("sft"):
        trainer = _FakeTrainer()
        attach_to_trainer(trainer)
        (callback,) = trainer.callbacks
        state = SimpleNamespace(global_step=0, max_steps=8)
        callback.on_train_begin(None, state, None)
        state.global_step = 6
        callback.on_step_end(None, state, None)
        assert progress._ACTIVE.fraction == pytest.approx(0.75)


def test_a_part_holds_the_tasks_started_inside_it():
    with Progress(1, stream=io.StringIO(), quiet=False) as bars, bars.stage("RLHF-V1", parts=4):
        with progress.part():  # a step that reports nothing: complete when its block ends
            assert progress._ACTIVE.fraction == 0
        assert progress._ACTIVE.fraction == pytest.approx(0.25)
        with progress.part():  # a step that samples, then trains with a Task of its own
            task = start_task(10)
            task.update(5)
            assert progress._ACTIVE.fraction == pytest.approx(0.375)
        assert progress._ACTIVE.fraction == pytest.approx(0.5) and progress._ACTIVE.part == 2
        start_task(2).update(2)  # outside a part: a part of its own
        assert progress._ACTIVE.fraction == pytest.approx(0.75)

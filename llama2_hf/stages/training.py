"""The end of every Trainer-based stage: save the model and tokenizer, record metrics and data reports."""

from __future__ import annotations

import os

from transformers.trainer_utils import get_last_checkpoint

from ..runner import RunRecord, StageRun


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-*` folder of a Trainer in `output_dir` (None on a fresh start). A checkpoint
    is complete once its `trainer_state.json` is written (the Trainer writes it last)."""
    if not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(output_dir)


def run_training(trainer):
    """`trainer.train()`, resuming from the newest complete checkpoint of its output folder, with its progress shown
    on the job's stage bar when one is open (`llama2_hf.progress`)."""
    from ..console import align_pad_token
    from ..progress import attach_to_trainer

    attach_to_trainer(trainer)
    align_pad_token(trainer.model, trainer.processing_class)
    return trainer.train(resume_from_checkpoint=last_checkpoint(trainer.args.output_dir))


def finish_training(run: StageRun, trainer, tokenizer, train_output) -> RunRecord:
    """Save the trained model and tokenizer into the stage folder (every rank takes part: FSDP gathers the full
    state dict), then write the record with the train metrics, the data reports and how the model was distributed
    (`metrics["distributed"]`: sharding mode, world size, parameter bytes of the whole model and of each rank)."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    if run.is_main:
        tokenizer.save_pretrained(output_dir)
    run.outputs["model"] = "."
    run.metrics.update({k: v for k, v in train_output.metrics.items()})
    run.metrics["log_history"] = [h for h in trainer.state.log_history if "loss" in h]
    if hasattr(trainer, "parameter_memory"):  # sharding mode and parameter bytes per rank, as PPO records them
        run.metrics["distributed"] = trainer.parameter_memory()
    reports = getattr(trainer, "data_reports", {})
    run.metrics["data"] = {name: {"total": r.total, "kept": r.kept, "truncated": r.truncated,
                                  "dropped": dict(r.dropped)} for name, r in reports.items()}
    return run.finish()

"""`llama2-hf eval-rm`: reward-model accuracy on held-out preference pairs by rating (paper Table 8 layout).

    llama2-hf eval-rm --model_name_or_path out/rm --eval_file data/helpful_test.jsonl --output_dir out/eval-rm

Inputs: a reward model of any transformers family (folder or Hub id, or a `train-rm` output folder; dialogues in the
chat format of the tokenizer saved with it) and preference files (`llama2_hf.data`
schema). Output in `output_dir`: `results.json` (the Table 8 row, every metric of `rm_eval.preference_metrics` and
the pair counts) and `run.json`. A rerun with the same arguments returns the recorded result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig

from ..data import ON_OVERLENGTH
from ..preference_data import load_preference_files
from ..modeling_llama2 import Llama2ForRewardModel
from ..rm_eval import evaluate_reward_model, format_table8, table8_row
from ..runner import RunRecord, Stage, StageRun, UsageError, resolved_args, stage_output, write_json_atomic
from .common import load_model, load_tokenizer

logger = logging.getLogger(__name__)

RESULTS = "results.json"


@dataclass
class RewardEvalArguments:
    """What the reward-model evaluation reads and how it scores."""

    output_dir: str = field(default="", metadata={"help": "Folder of results.json and run.json."})
    eval_file: list[str] = field(default_factory=list, metadata={
        "help": "Held-out preference data: .jsonl/.json/.parquet files, Hub dataset names, or stage folders."})
    allow_unrated: bool = field(default=False, metadata={
        "help": "Accept pairs without a rating (they count in the overall accuracy only)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    name: str | None = field(default=None, metadata={
        "help": "Row label of the Table 8 line (default: the model and the first eval file)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Pairs per forward pass."})
    max_length: int | None = field(default=4096, metadata={"help": "Longest dialog in tokens (the 4096 context)."})
    on_invalid: str = field(default="error", metadata={
        "help": "Invalid pairs: 'error' or 'drop' (counted in results.json).", "choices": ["error", "drop"]})
    on_overlength: str = field(default="error", metadata={
        "help": "Dialogs over max_length: 'error', 'truncate' (keep the end, where the reward is read) or 'drop'.",
        "choices": list(ON_OVERLENGTH)})
    unsafe_threshold: float = field(default=0.5, metadata={
        "help": "sigmoid(reward) below this flags a response unsafe, for unsafe recall (0.5: paper Table 29)."})
    use_cpu: bool = field(default=False, metadata={"help": "Score on CPU even when a GPU is available."})
    bf16: bool = field(default=False, metadata={
        "help": "Score under bf16 autocast (as the training stages' bf16; dtype: bfloat16 stores the weights in bf16 "
                "instead)."})


def main(args: RewardEvalArguments, model_args: ModelConfig) -> RunRecord:
    if not args.output_dir:
        raise UsageError("output_dir is required")
    run = StageRun("eval-rm", args.output_dir, resolved_args(args, model_args))
    if run.done:
        return run.record
    if not args.eval_file:
        raise UsageError("eval_file is required")
    if not model_args.model_name_or_path:
        raise UsageError("model_name_or_path is required (a reward model folder, a train-rm output or a Hub id)")
    paths = [stage_output(p, "data") for p in args.eval_file]
    dataset, report = load_preference_files(paths, args.on_invalid, args.allow_unrated)
    if len(dataset) == 0:
        raise UsageError(f"no preference pairs left after on_invalid={args.on_invalid!r}: {dict(report.dropped)}")
    source = stage_output(model_args.model_name_or_path, "model")
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or source)
    for i, p in enumerate(paths):
        run.add_input(f"eval_{i}", p)
    run.add_input("model", source)

    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    model = load_model(Llama2ForRewardModel, model_args, source, role="reward model", trainable=False).to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
        metrics = evaluate_reward_model(model, tokenizer, dataset, batch_size=args.eval_batch_size,
                                        max_length=args.max_length, unsafe_threshold=args.unsafe_threshold,
                                        on_invalid=args.on_invalid, on_overlength=args.on_overlength)
    name = args.name or f"{Path(str(source)).name} / {Path(str(paths[0])).name}"
    row = table8_row(metrics)
    logger.info("reward-model accuracy (%%):\n%s", format_table8({name: row}))
    if run.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.output_dir) / RESULTS, {
            "name": name, "table8": row, "metrics": metrics,
            "data": {"total": report.total, "kept": report.kept, "dropped": dict(report.dropped)}})
    run.outputs["results"] = RESULTS
    run.metrics.update({"accuracy": metrics["accuracy"], "table8": row})
    return run.finish()


STAGE = Stage("eval-rm", "reward-model accuracy by preference rating (paper Table 8 layout)",
              (RewardEvalArguments, ModelConfig), main)

"""`llama2-hf convert-meta`: Meta's `consolidated.NN.pth` checkpoint -> a Hugging Face model folder.

    llama2-hf convert-meta --input_dir llama-2-7b --output_dir out/llama-2-7b-hf
    llama2-hf convert-meta --input_dir llama-2-70b --output_dir out/llama-2-70b-hf --dtype bfloat16 --overwrite true

Input: Meta's folder (`params.json`, `consolidated.00.pth` ..., `tokenizer.model` in it or its parent). Output: the
model at the root of `output_dir` (`"model": "."` in `run.json`), loadable with `from_pretrained`. Everything is
checked before a file is written. The new folder is written next to `output_dir` and swapped in when complete: a
non-empty `output_dir` is refused unless `overwrite`, which replaces it as a whole, so a kill or a failure leaves the
old model loadable and no stale file (`pytorch_model.bin`, `adapter_config.json`, ...) survives beside the new one.
A rerun with the same arguments returns the record. Under a launch only rank 0 converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..console import library_progress
from ..convert_meta import _DTYPES, check_meta_checkpoint, check_output, write_conversion
from ..runner import (
    RUN_ARGS, RUN_RECORD, RunRecord, Stage, StageRun, UsageError, distributed_state, replacing_folder, resolved_args
)


@dataclass
class ConvertMetaArguments:
    """Arguments of the conversion."""

    input_dir: str | None = field(default=None, metadata={
        "help": "Meta's checkpoint folder: params.json and consolidated.00.pth ... (1, 2 or 8 shards)."})
    output_dir: str | None = field(default=None, metadata={"help": "The model folder to write."})
    tokenizer_path: str | None = field(default=None, metadata={
        "help": "Meta's tokenizer.model (default: in input_dir, else in its parent)."})
    max_shard_size: str = field(default="5GB", metadata={
        "help": "Largest safetensors file (5GB, 500MB or a number of bytes); bounds peak memory."})
    dtype: str | None = field(default=None, metadata={
        "help": "dtype of the written weights (default: the checkpoint's, bfloat16 for Meta's release).",
        "choices": sorted(_DTYPES)})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a non-empty output_dir as a whole, once the new model is complete."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over tensors."})


def main(args: ConvertMetaArguments) -> RunRecord:
    if not args.input_dir or not args.output_dir:
        raise UsageError("input_dir and output_dir are required")
    library_progress(args.progress)
    state = distributed_state()  # under a launch one process converts
    out = Path(args.output_dir)
    values = resolved_args(args)
    max_shard_size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    if (out / RUN_RECORD).is_file() and not args.overwrite:
        run = StageRun("convert-meta", out, values)  # the same arguments: the record; others: refused
        if run.done:
            return run.record
    # Everything is checked before any folder is created: the checkpoint, the dtype, then the output folder.
    plan = check_meta_checkpoint(args.input_dir, tokenizer_path=args.tokenizer_path, max_shard_size=max_shard_size,
                                 dtype=args.dtype)
    check_output(out, args.overwrite, ignore=(RUN_ARGS,))
    if not args.overwrite:
        run = StageRun("convert-meta", out, values)
    if state.is_main_process:
        # The old folder (and its record) stays until the new one is whole; the new record describes the new model.
        with replacing_folder(out) as tmp:
            write_conversion(plan, tmp, args.progress)
    state.wait_for_everyone()
    if args.overwrite:
        run = StageRun("convert-meta", out, values)
    # params.json and the tokenizer are hashed; the shards are not (that would read the whole checkpoint once more).
    run.add_input("params", Path(args.input_dir) / "params.json")
    run.add_input("tokenizer", plan.tokenizer_path)
    run.outputs["model"] = "."
    run.metrics.update(dtype=str(plan.dtype).removeprefix("torch."), shards=plan.n_shards,
                       layers=plan.config.num_hidden_layers)
    return run.finish()


STAGE = Stage("convert-meta", "convert Meta's consolidated.*.pth checkpoint to a Hugging Face model folder",
              (ConvertMetaArguments,), main)

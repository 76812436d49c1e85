"""`llama2-hf gatt`: Ghost Attention training data (paper §3.3).

    llama2-hf gatt --model_name_or_path out/ppo --dialogues_file data/dialogues.jsonl --output_dir out/gatt
    accelerate launch -m llama2_hf.cli gatt --config recipes/gatt/llama2-7b.yaml

Inputs: the chat model that samples the answers (the latest RLHF model) and multi-turn dialogues (rows with
`messages`; files, Hub names or a previous stage's `data` output). Each dialogue gets an instruction (constraint
combination or a fixed text), its answers are sampled turn by turn with the instruction on every user turn, and
the instruction is then kept in the first turn only (schema: `llama2_hf.gatt`). Output: `gatt.jsonl` (`data`, what
`sft` trains on with `train_on: last`) and `run.json`. The rows are `messages`, laid out in the model's own chat
format when sampled and when `sft` encodes them: with `placement: system` the instruction is a system message, which
a chat template without a system role (Mistral, Gemma) reads at the front of the first user turn
(`chat_format.ChatFormat.with_system`).

Under `accelerate launch` every rank draws the same plan (instructions from `seed`) and samples its own contiguous
share of the dialogues into a part file (`parts/`), chunk by chunk; a killed run resumes from the finished chunks,
and rank 0 merges the parts (nothing lost or repeated). Each chunk reseeds the sampler from `seed` and its first
row (`sampling.derive_seed`), so the rows do not depend on the number of ranks with greedy decoding, nor on a resume.

The vLLM backend (`sampling.BackendArguments`) samples with a vLLM engine, one per process, started after every input
is checked; each chunk's prompts are seeded from the chunk's seed as on the PyTorch backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig

from ..data import read_rows
from ..gatt.data import GAttDataConfig, gatt_stats, plan_gatt_dialogues, sample_gatt_rows, user_turns_of
from ..runner import (
    RankParts, RunRecord, Stage, StageRun, UsageError, distributed_state, resolved_args, stage_output,
    write_jsonl_atomic,
)
from ..sampling import derive_seed
from .sampling import ChatSamplingArguments, chat_sampling, chunks


@dataclass
class GAttArguments:
    """Inputs and output folder of the `gatt` stage."""

    dialogues_file: list[str] = field(default_factory=list, metadata={
        "help": "Source multi-turn dialogues (rows with 'messages'): .jsonl/.json/.parquet files, Hub dataset names "
                "or folders of stages that wrote chat data."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    output_dir: str = field(default="gatt", metadata={"help": "Where gatt.jsonl and run.json are written."})
    max_dialogues: int | None = field(default=None, metadata={"help": "Use only the first N dialogues."})


def main(script_args: GAttArguments, config: GAttDataConfig, sampling: ChatSamplingArguments,
         model_args: ModelConfig) -> RunRecord:
    distributed_state()  # join the launch's ranks before anything reads them
    run = StageRun("gatt", script_args.output_dir,
                   resolved_args(script_args, config, sampling, model_args))
    if run.done:
        return run.record
    if not script_args.dialogues_file:
        raise UsageError("dialogues_file is required")
    # Inputs (rows, constraint spec and lists) are checked before the model is loaded.
    paths = [stage_output(p, "data") for p in script_args.dialogues_file]
    dialogues = [row for _, _, row in read_rows(paths, user_turns_of)][: script_args.max_dialogues]
    try:
        sets = None if config.instructions else config.constraint_sets()
    except (ValueError, OSError) as err:
        raise UsageError(f"constraint spec: {err}") from None
    plans = plan_gatt_dialogues(dialogues, sets, config)
    sampling.check_installed()
    for i, p in enumerate(paths):
        run.add_input(f"dialogues_{i}", p)
    run.add_input("model", model_args.model_name_or_path)

    parts = RankParts(run.dir / "parts", "gatt")
    done = parts.done_indices()
    todo = [plan for _, plan in parts.my_share(plans) if plan.index not in done]
    if todo:
        with chat_sampling(model_args, script_args.tokenizer_name_or_path, sampling, config.seed) as sampler:
            for chunk in chunks(todo, sampling.prompt_batch_size):
                sampler.reseed(derive_seed(config.seed, chunk[0].index))
                rows = sample_gatt_rows(chunk, sampler, config)
                parts.append({"index": plan.index, "rows": [r for r in rows if r["source_index"] == plan.index]}
                             for plan in chunk)
    merged = parts.merge(run.dir / "parts" / "gatt.merged.jsonl", expected=len(plans))
    rows = [row for record in merged for row in record["rows"]]
    if run.is_main:
        write_jsonl_atomic(run.dir / "gatt.jsonl", rows)
    run.outputs["data"] = "gatt.jsonl"
    run.metrics.update(gatt_stats(plans, rows))
    return run.finish()


STAGE = Stage("gatt", "Ghost Attention training data (paper §3.3)",
              (GAttArguments, GAttDataConfig, ChatSamplingArguments, ModelConfig), main)

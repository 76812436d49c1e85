"""`llama2-hf gatt-eval`: Ghost Attention instruction adherence by turn (paper Table 30, Fig. 28).

    llama2-hf gatt-eval --model_name_or_path out/gatt-sft --eval_name "+ GAtt" --output_dir out/gatt-eval
    llama2-hf gatt-eval --compare out/eval-baseline out/eval-gatt --output_dir out/table30      # table only

Each evaluation dialogue gives its instruction in the first turn only, the model answers every user turn in order,
and the answers at probe turns are judged by the checkers (language, keyword, judge). Outputs: `gatt_eval.json`
(`results`: adherence by turn and transcripts, keyed by `eval_name`), `table30.md` (Table 30 layout, one column per
model, with the columns of the `compare` folders first) and `gatt_adherence.png` (`table`, `plot`).

Without `model_name_or_path` nothing is generated: the table and plot merge the `compare` results (what comparing a
baseline with a GAtt model needs). Under `accelerate launch` each rank answers its own share of the dialogues into a
part file (resumable); rank 0 merges them and writes the table.

The vLLM backend (`sampling.BackendArguments`) samples with a vLLM engine, one per process, started after every input
is checked; each chunk's prompts are seeded from the chunk's seed as on the PyTorch backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig

from ..gatt.data import PLACEMENTS, list_folder_files, load_constraint_sets
from ..gatt.evaluation import (
    TABLE30_TURNS,
    GAttEvalResult,
    JudgeChecker,
    KeywordChecker,
    LanguageChecker,
    ModelJudge,
    build_eval_dialogues,
    evaluate_gatt,
    format_table30,
    plot_adherence,
)
from ..loading import load_pretrained, load_tokenizer
from ..runner import (
    RankParts, RunRecord, Stage, StageRun, UsageError, distributed_state, resolved_args, write_json_atomic
)
from ..sampling import derive_seed
from .sampling import ChatSamplingArguments, chat_sampling, chunks

EVAL_FIELDS = ("instruction", "constraints", "user_turns", "checks")


@dataclass
class GAttEvalArguments:
    """Inputs, naming and output folder of the `gatt-eval` stage."""

    eval_dialogues_file: str | None = field(default=None, metadata={
        "help": "Evaluation dialogues JSONL (instruction, constraints, user_turns, checks); default: built from the "
                "constraint spec and the shipped filler turns (num_dialogues, eval_max_turns, eval_types)."})
    eval_name: str | None = field(default=None, metadata={
        "help": "Column name of this model in Table 30 (default: the model folder's name)."})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "Folders of earlier gatt-eval runs whose results join the table (e.g. the baseline)."})
    title: str = field(default="GAtt instruction adherence", metadata={"help": "Plot title."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    output_dir: str = field(default="gatt-eval", metadata={"help": "Where results, table30.md and the plot go."})


@dataclass
class GAttEvalConfig:
    """How the evaluation dialogues are built and judged."""

    num_dialogues: int = field(default=50, metadata={"help": "Dialogues built when no eval_dialogues_file is given."})
    eval_max_turns: int = field(default=20, metadata={
        "help": "User turns per built dialogue (probe every 2nd turn); Table 30 reaches turn 20."})
    eval_types: list[str] = field(default_factory=lambda: ["public_figure", "hobbies"], metadata={
        "help": "Constraint types of built dialogues (paper Table 30: public figures and hobbies)."})
    turns: list[int] = field(default_factory=lambda: list(TABLE30_TURNS), metadata={
        "help": "Turns shown in the table (paper Table 30: 2, 4, 6, 20)."})
    checkers: list[str] = field(default_factory=lambda: ["language", "keyword"], metadata={
        "help": "Checkers that judge the answers: language, keyword, judge."})
    judge_model: str | None = field(default=None, metadata={"help": "Chat model folder of the 'judge' checker."})
    judge_types: list[str] | None = field(default=None, metadata={
        "help": "Constraint types the judge rules on (default: all)."})
    eval_placement: str = field(default="system", metadata={
        "help": "Where the instruction is given in the first turn.", "choices": list(PLACEMENTS)})
    eval_max_length: int | None = field(default=None, metadata={
        "help": "Context limit in tokens (default: the model's)."})
    eval_constraints_file: str | None = field(default=None, metadata={
        "help": "Constraint spec JSON (default: resources/gatt/constraints.json)."})
    eval_constraint_lists: str | None = field(default=None, metadata={
        "help": "A gatt-lists output folder whose values replace the shipped hand-written lists (default: unset)."})
    seed: int = field(default=0, metadata={"help": "Seed of the built dialogues and of the sampling."})


def _checkers(config: GAttEvalConfig, sets) -> list:
    checkers = []
    for name in config.checkers:
        if name == "language":
            checkers.append(LanguageChecker())
        elif name == "keyword":
            checkers.append(KeywordChecker())
        elif name == "judge":
            if not config.judge_model:
                raise UsageError("the 'judge' checker needs judge_model")
            from ..modeling_llama2 import Llama2ForCausalLM

            # any family: its own class and tokenizer (Meta's exact one for a Llama 2 checkpoint) and chat format
            judge = ModelJudge(load_pretrained(Llama2ForCausalLM, config.judge_model, "judge model"),
                               load_tokenizer(config.judge_model))
            checkers.append(JudgeChecker(judge, sets, types=config.judge_types))
        else:
            raise UsageError(f"unknown checker {name!r}; expected language, keyword or judge")
    return checkers


def _eval_dialogues(args: GAttEvalArguments, config: GAttEvalConfig, sets) -> list[dict]:
    if args.eval_dialogues_file is None:
        return build_eval_dialogues(sets, config.num_dialogues, config.eval_max_turns, types=config.eval_types,
                                    seed=config.seed)
    from ..data import InvalidExample, read_rows

    def check(row, n):
        for key in EVAL_FIELDS:
            if key not in row:
                raise InvalidExample(n, key, "missing_field", "missing")
        if len(row["checks"]) != len(row["user_turns"]):
            raise InvalidExample(n, "checks", "bad_length", f"{len(row['checks'])} checks for "
                                 f"{len(row['user_turns'])} user turns")

    return [row for _, _, row in read_rows(args.eval_dialogues_file, check)]


def _compared(folders: list[str]) -> dict[str, GAttEvalResult]:
    results = {}
    for folder in folders:
        path = Path(folder) / "gatt_eval.json"
        if not path.is_file():
            raise UsageError(f"compare {folder}: no gatt_eval.json (expected a gatt-eval output folder)")
        for name, data in json.loads(path.read_text(encoding="utf-8")).items():
            results[name] = GAttEvalResult.from_dict(data)
    return results


def main(args: GAttEvalArguments, config: GAttEvalConfig, sampling: ChatSamplingArguments,
         model_args: ModelConfig) -> RunRecord:
    distributed_state()  # join the launch's ranks before anything reads them
    run = StageRun("gatt-eval", args.output_dir, resolved_args(args, config, sampling, model_args))
    if run.done:
        return run.record
    results = _compared(args.compare)
    if model_args.model_name_or_path:
        sets = load_constraint_sets(config.eval_constraints_file, list_folder_files(config.eval_constraint_lists))
        dialogues = _eval_dialogues(args, config, sets)
        checkers = _checkers(config, sets)
        sampling.check_installed()
        name = args.eval_name or Path(model_args.model_name_or_path).name
        run.add_input("model", model_args.model_name_or_path)
        parts = RankParts(run.dir / "parts", "transcripts")
        done = parts.done_indices()
        todo = [(i, d) for i, d in parts.my_share(dialogues) if i not in done]
        if todo:
            with chat_sampling(model_args, args.tokenizer_name_or_path, sampling, config.seed) as sampler:
                for chunk in chunks(todo, sampling.prompt_batch_size):
                    sampler.reseed(derive_seed(config.seed, chunk[0][0]))
                    result = evaluate_gatt(sampler, [d for _, d in chunk], checkers,
                                           placement=config.eval_placement, max_length=config.eval_max_length)
                    parts.append({"index": i, **t} for (i, _), t in zip(chunk, result.transcripts))
        merged = parts.merge(run.dir / "parts" / "transcripts.merged.jsonl", expected=len(dialogues))
        results[name] = GAttEvalResult.from_transcripts([{k: v for k, v in t.items() if k != "index"}
                                                         for t in merged])
        if run.is_main:
            write_json_atomic(run.dir / "gatt_eval.json", {name: results[name].to_dict()})
        run.outputs["results"] = "gatt_eval.json"
    if not results:
        raise UsageError("nothing to evaluate: give model_name_or_path and/or compare folders")
    table = format_table30(results, config.turns)
    if run.is_main:
        (run.dir / "table30.md").write_text(table + "\n", encoding="utf-8")
        plot_adherence(results, run.dir / "gatt_adherence.png", args.title)
    run.outputs.update({"table": "table30.md", "plot": "gatt_adherence.png"})
    run.metrics["adherence"] = {name: {str(t): s.rate for t, s in r.turns.items() if s.n}
                                for name, r in results.items()}
    return run.finish()


STAGE = Stage("gatt-eval", "Ghost Attention adherence by turn (paper Table 30 / Figure 28)",
              (GAttEvalArguments, GAttEvalConfig, ChatSamplingArguments, ModelConfig), main)

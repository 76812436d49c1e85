"""`llama2-hf gatt-lists`: constraint value lists written by a chat model (paper §3.3: Llama 2-Chat wrote the hobby
and public-figure lists of GAtt).

    llama2-hf gatt-lists --model_name_or_path out/ppo --list_types hobbies public_figure --output_dir out/gatt-lists
    llama2-hf gatt --constraint_lists out/gatt-lists ...       # use them instead of the shipped hand-written lists

Each constraint type with a `list_prompt` is asked for `num_values` new values, answers parsed and deduplicated.
Output: one `TYPE.txt` list file per type (`lists`: the folder itself) and `run.json`. One process: the work is a few
sampled answers per type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig

from ..gatt.data import generate_constraint_list, load_constraint_sets
from ..runner import RunRecord, Stage, StageRun, UsageError, distributed_state, resolved_args
from ..sampling import sampling_arguments
from .sampling import ChatSamplingArguments, chat_sampling


@dataclass
class GAttListsArguments:
    """What the `gatt-lists` stage asks for and where it writes."""

    list_types: list[str] | None = field(default=None, metadata={
        "help": "Constraint types to write lists for (default: every type with a list_prompt)."})
    num_values: int = field(default=50, metadata={"help": "New values wanted per type."})
    merge: bool = field(default=False, metadata={"help": "Keep the current values and add only new ones."})
    samples_per_round: int = field(default=4, metadata={"help": "Answers sampled per round."})
    max_rounds: int = field(default=10, metadata={"help": "Rounds before giving up on reaching num_values."})
    constraints_file: str | None = field(default=None, metadata={
        "help": "Constraint spec JSON (default: resources/gatt/constraints.json)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    output_dir: str = field(default="gatt-lists", metadata={"help": "Where TYPE.txt files and run.json go."})


ListSampling = sampling_arguments(
    "ListSampling", "Decoding of the list answers: temperature 1.0 by default, so that rounds give different lists.",
    base=ChatSamplingArguments, temperature=1.0)


def main(args: GAttListsArguments, sampling: ListSampling, model_args: ModelConfig) -> RunRecord:
    distributed_state()  # join the launch's ranks before anything reads them
    run = StageRun("gatt-lists", args.output_dir, resolved_args(args, sampling, model_args))
    if run.done:
        return run.record
    try:
        sets = load_constraint_sets(args.constraints_file)
    except (ValueError, OSError) as err:
        raise UsageError(f"constraint spec: {err}") from None
    types = args.list_types or [name for name, cs in sets.items() if cs.list_prompt]
    for name in types:
        if name not in sets:
            raise UsageError(f"unknown constraint type {name!r}; known: {sorted(sets)}")
        if not sets[name].list_prompt:
            raise UsageError(f"constraint type {name!r} has no list_prompt to ask a model with")
    sampling.check_installed()
    run.add_input("model", model_args.model_name_or_path)
    counts = {}
    if run.is_main:
        with chat_sampling(model_args, args.tokenizer_name_or_path, sampling, args.seed) as sampler:
            for name in types:
                existing = sets[name].values if args.merge else []
                new = generate_constraint_list(sampler, sets[name], args.num_values, existing=existing,
                                               samples_per_round=args.samples_per_round, max_rounds=args.max_rounds)
                path = run.dir / f"{name}.txt"
                path.write_text(f"# {name}: {len(new)} values written by {model_args.model_name_or_path}\n"
                                + "\n".join([*existing, *new]) + "\n", encoding="utf-8")
                counts[name] = len(new)
                run.outputs[name] = path.name
    run.outputs["lists"] = "."
    run.metrics["new_values"] = counts
    return run.finish()


STAGE = Stage("gatt-lists", "constraint value lists written by a chat model (the paper's GAtt lists)",
              (GAttListsArguments, ListSampling, ModelConfig), main)

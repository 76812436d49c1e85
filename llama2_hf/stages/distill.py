"""`llama2-hf distill`: targeted safety context distillation (paper §4.2.4).

    llama2-hf distill --model_name_or_path out/ppo --prompts_file data/adversarial.jsonl \
        --safety_reward_model out/rm-safety --output_dir out/distill
    accelerate launch -m llama2_hf.cli distill --config recipes/distill/llama2-7b.yaml

Inputs: the chat model to distil, prompt rows (`data.prompt_row`: only rows with `is_safety_prompt: true` are
distilled, unless `assume_adversarial`) and the safety reward model (`RewardArguments.safety_reward_model`, a
`train-rm` folder or Hub id). Each adversarial prompt is answered with and without a safety preprompt; the
preprompted answer is kept when the safety RM scores it higher. Outputs: `distilled.jsonl` (`data`: SFT rows without
the preprompt, what `sft` trains on), `candidates.jsonl` (one record per prompt row), `run.json` (the report).

Under `accelerate launch` each rank answers and scores its own contiguous share of the prompts into a part file,
chunk by chunk (resumable); rank 0 merges the parts, checking that no row is lost or repeated.

The vLLM backend (`sampling.BackendArguments`) samples with a vLLM engine, one per process, started after every input
is checked; each chunk's prompts are seeded from the chunk's seed as on the PyTorch backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trl import ModelConfig

from ..data import InvalidExample, load_prompts
from ..runner import (
    RankParts, RunRecord, Stage, StageRun, UsageError, distributed_state, resolved_args, stage_output,
    write_jsonl_atomic,
)
from ..safety_distill import DistillConfig, SafetyPreprompts, as_prompt_row, distill_records, summarize
from .common import RewardArguments, load_reward
from ..sampling import derive_seed
from .sampling import ChatSamplingArguments, chat_sampling, chunks


@dataclass
class DistillArguments:
    """Inputs and output folder of the `distill` stage."""

    prompts_file: list[str] = field(default_factory=list, metadata={
        "help": "Prompt rows (prompt or messages, is_safety_prompt, optional risk_category and id): files, Hub "
                "dataset names or folders of stages that wrote prompts."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    output_dir: str = field(default="distill", metadata={
        "help": "Where distilled.jsonl, candidates.jsonl and run.json are written."})


def safety_scorer(reward_args: RewardArguments, tokenizer, device):
    """The safety RM alone, loaded by the one reward loader (`load_reward` with it in the scorer's place)."""
    if not reward_args.safety_reward_model:
        raise UsageError("safety_reward_model is required (a train-rm output folder or a Hub id)")
    alone = dataclasses.replace(reward_args, helpfulness_reward_model=reward_args.safety_reward_model,
                                safety_reward_model=None)
    return load_reward(alone, tokenizer, device)


def main(script_args: DistillArguments, config: DistillConfig, sampling: ChatSamplingArguments,
         reward_args: RewardArguments, model_args: ModelConfig) -> RunRecord:
    distributed_state()  # join the launch's ranks before anything reads them
    run = StageRun("distill", script_args.output_dir,
                   resolved_args(script_args, config, sampling, reward_args, model_args))
    if run.done:
        return run.record
    if not script_args.prompts_file:
        raise UsageError("prompts_file is required")
    if not reward_args.safety_reward_model:
        raise UsageError("safety_reward_model is required (a train-rm output folder or a Hub id)")
    # Every input (prompt rows, preprompt file, risk categories) is checked before a model is loaded.
    paths = [stage_output(p, "data") for p in script_args.prompts_file]
    prompts = load_prompts(paths)
    try:
        preprompts = SafetyPreprompts.load(extra=config.preprompts_file)
    except (ValueError, OSError, TypeError, AttributeError) as err:  # bad JSON or a file of another shape
        raise UsageError(f"preprompts_file {config.preprompts_file}: {err}") from None
    for n, row in enumerate(prompts, 1):
        try:
            as_prompt_row(row, n)
        except InvalidExample as err:
            raise UsageError(f"prompt row {n}, field {err.field!r}: {err.detail}") from None
    if config.use_category_templates and config.unknown_category == "error":
        for n, row in enumerate(prompts, 1):
            label = row.extra.get(config.category_field)
            if label is not None and (not isinstance(label, str) or preprompts.category_key(label) is None):
                raise UsageError(f"prompt row {n}, field {config.category_field!r}: unknown risk category "
                                 f"{label!r}; known: {sorted(preprompts.categories)} (or set "
                                 "unknown_category: generic)")
    sampling.check_installed()
    for i, p in enumerate(paths):
        run.add_input(f"prompts_{i}", p)
    run.add_input("model", model_args.model_name_or_path)
    run.add_input("safety_reward_model", reward_args.safety_reward_model)

    parts = RankParts(run.dir / "parts", "distill")
    done = parts.done_indices()
    todo = [(i, row) for i, row in parts.my_share(prompts) if i not in done]
    if todo:
        from accelerate import PartialState

        with chat_sampling(model_args, script_args.tokenizer_name_or_path, sampling, config.seed) as sampler:
            reward = safety_scorer(reward_args, sampler.tokenizer, PartialState().device)
            for chunk in chunks(todo, sampling.prompt_batch_size):
                sampler.reseed(derive_seed(config.seed, chunk[0][0]))
                parts.append(distill_records(chunk, sampler, reward, preprompts, config))
    records = parts.merge(run.dir / "candidates.jsonl", expected=len(prompts))
    kept, _, report = summarize(records)
    if run.is_main:
        write_jsonl_atomic(run.dir / "distilled.jsonl", kept)
    run.outputs.update({"data": "distilled.jsonl", "candidates": "candidates.jsonl"})
    run.metrics.update(report.to_dict())
    return run.finish()


STAGE = Stage("distill", "targeted safety context distillation (paper §4.2.4)",
              (DistillArguments, DistillConfig, ChatSamplingArguments, RewardArguments, ModelConfig),
              main)

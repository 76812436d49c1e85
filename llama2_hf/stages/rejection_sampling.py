"""`llama2-hf rejection-sample`: one iteration of rejection-sampling fine-tuning (paper §3.2.3).

    llama2-hf rejection-sample --model_name_or_path out/sft --prompts_file data/prompts.jsonl \
        --helpfulness_reward_model out/rm-helpful --safety_reward_model out/rm-safety --output_dir out/rs1 \
        --use_cpu true
    llama2-hf rejection-sample --config recipes/rejection_sampling/llama2-7b.yaml --iteration 2 --pool_dirs out/rs1 \
        --model_name_or_path out/rs1 --output_dir out/rs2
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m llama2_hf.cli rejection-sample --config ...

Inputs: the policy (`model_name_or_path`), prompt rows (`llama2_hf.data.prompt_row`), the reward models
(`RewardArguments`), and for the pool the folders of earlier iterations (`pool_dirs`). Outputs in `output_dir`:
`candidates.jsonl` (one row per prompt: all K samples, their scores and components, the pool entry, the winner),
`selected.jsonl` (the `data` output: SFT rows that `llama2-hf sft --train_file <this folder>` reads), `report.json`
and `figure7.png` (max vs median reward among N samples), the fine-tuned model at the root (unless `finetune:
false`), and `run.json`.

Under `accelerate launch` the prompt batches are split across the processes (contiguous shares, `RankParts`):
each process appends its finished prompts to `parts/candidates.rank<r>-of-<n>.jsonl`, so a killed process redoes
only the prompts it had not written; process 0 then merges the parts into `candidates.jsonl` (checking that no
prompt is lost or duplicated), every process selects from the merged file, and the fine-tuning runs as one
distributed Trainer. Every batch is seeded from its first prompt, so the samples do not depend on the number of
processes. A resume with other arguments (another `num_samples`, `temperature`, ...) is refused.

The vLLM backend (`sampling.BackendArguments`) samples with a vLLM engine instead: each process starts one engine
over the policy's weights (before any sampling, after every input is checked), samples its share with the same
batch seeds, and stops it before the fine-tuning. Without vLLM's environment
the stage stops before loading a model and names the command that builds it (`llama2-hf setup-vllm`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig

from ..data import InvalidDataFile, PromptRow, load_prompts
from ..loading import looks_local
from ..modeling_llama2 import Llama2ForCausalLM
from ..rejection_sampling import (
    RejectionSampler,
    RejectionSamplingConfig,
    finetune_trainer,
    latest_records,
    max_median_curves,
    plot_max_median,
    plot_temperature_sweep,
    prompt_batches,
    report,
    select,
)
from ..runner import (
    RUN_RECORD,
    RankParts,
    RunRecord,
    Stage,
    StageRun,
    UsageError,
    resolved_args,
    stage_output,
    write_json_atomic,
    write_jsonl_atomic,
)
from ..sampling import open_sampler, sampling_arguments
from .common import RewardArguments, check_prompt_lengths, load_model, load_reward, load_tokenizer, peft_config
from .training import finish_training, run_training

logger = logging.getLogger(__name__)

STAGE_NAME = "rejection-sample"

RejectionSampling = sampling_arguments(
    "RejectionSampling", "Sampling of the K candidates. Temperature 1.0 and top-p 1.0 by default (the paper finds the "
    "best temperature moves with each RLHF version, 1.2-1.3 for its RLHF models, Figure 8: sweep it with "
    "temperature_sweep); samples cut at max_new_tokens are kept in candidates.jsonl but not selected unless "
    "select_unfinished. prompt_batch_size is the unit of seeding, of the split across processes and of a resume.",
    temperature=1.0, top_p=1.0, max_new_tokens=256, prompt_batch_size=8)


@dataclass
class RejectionSamplingArguments:
    """Data of the rejection-sampling stage."""

    prompts_file: list[str] = field(default_factory=list, metadata={
        "help": "Prompts: .jsonl/.json/.parquet files (rows with 'prompt' or 'messages' ending with a user turn, "
                "optional 'is_safety_prompt' and 'id'), Hub dataset names, or folders of stages with a data output."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    iteration: int = field(default=1, metadata={
        "help": "RLHF iteration number (recorded in every candidate; pool_dirs must hold earlier ones)."})
    pool_dirs: list[str] = field(default_factory=list, metadata={
        "help": "Output folders of earlier rejection-sample iterations: with pool=all each prompt's latest best "
                "answer competes with the new samples, and prompts not resampled now keep it in the selection."})


def _read_candidates(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InvalidDataFile(f"{path}, line {n}: not valid JSON") from None
            missing = {"prompt_id", "iteration", "messages", "best"} - set(row)
            if missing:
                raise InvalidDataFile(f"{path}, line {n}: not a rejection-sampling candidate (no {sorted(missing)})")
            rows.append(row)
    return rows


def earlier_records(pool_dirs: Sequence[str], iteration: int) -> dict[str, Mapping]:
    """Each prompt's latest record in the finished rejection-sample folders `pool_dirs` (all of earlier
    iterations, one folder per iteration)."""
    records, seen = [], {}
    for folder in map(Path, pool_dirs):
        if not (folder / RUN_RECORD).is_file():
            raise UsageError(f"pool_dirs: {folder} is not a finished {STAGE_NAME} folder (no {RUN_RECORD})")
        record = RunRecord.read(folder)
        if record.stage != STAGE_NAME or "candidates" not in record.outputs:
            raise UsageError(f"pool_dirs: {folder} holds a {record.stage!r} run without candidates, not a "
                             f"{STAGE_NAME} iteration")
        earlier = record.args.get("iteration")
        if earlier >= iteration:
            raise UsageError(f"pool_dirs: {folder} holds iteration {earlier}, not one before iteration {iteration}")
        if earlier in seen:
            raise UsageError(f"pool_dirs: {seen[earlier]} and {folder} both hold iteration {earlier}")
        seen[earlier] = folder
        records += _read_candidates(record.output("candidates", folder))
    return latest_records(records)


def _done_indices(parts: RankParts, signature: Mapping, prompts: Sequence[PromptRow]) -> set[int]:
    """Indices this process already sampled, after checking that they were drawn with the same settings from the
    same prompts (so a resume never mixes K, temperatures or prompt files in one output)."""
    done = set()
    for row in parts.read():
        if row.get("sampling") != signature:
            raise UsageError(f"{parts.path} holds samples drawn with {row.get('sampling')}, not {dict(signature)}: "
                             "resume with the same arguments, or choose another output_dir")
        index = int(row["index"])
        if index >= len(prompts) or prompts[index].id != row["prompt_id"]:
            raise UsageError(f"{parts.path}: prompt {index} was {row['prompt_id']!r} when it was sampled; the "
                             "prompts file changed since. Choose another output_dir")
        done.add(index)
    world = parts.state.num_processes
    others = [p.name for p in parts.folder.glob(f"{parts.name}.rank*-of-*.jsonl")
              if not p.name.endswith(f"-of-{world}.jsonl")]
    if others:
        logger.warning("%s: parts written by a launch with another number of processes are not reused: %s",
                       parts.folder, others)
    return done


def sample_phase(sampler: RejectionSampler, prompts: Sequence[PromptRow], name: str, output_dir: Path,
                 iteration: int, earlier: Mapping[str, Mapping], temperature: float | None = None) -> list[dict]:
    """Sample this process's share of the prompt batches (resuming its part file), then merge every process's part
    into `<output_dir>/<name>.jsonl`; every process returns the merged records."""
    parts = RankParts(output_dir / "parts", name)
    sampling = sampler.sampling(temperature)
    done = _done_indices(parts, sampler.config.signature(iteration, sampling, sampler.sampler.backend), prompts)
    mine = [batch for _, batch in parts.my_share(prompt_batches(prompts, sampling.prompt_batch_size))]
    share = sum(len(batch) for batch in mine)
    if done:
        logger.info("%s: resuming, %d of this process's %d prompts already sampled", name, len(done), share)
    # Under FSDP2 the full weights are gathered once for the whole phase, not once per decoding step.
    with sampler.sampler.generating():
        sampler.sample_batches(mine, iteration, earlier, done, parts.append, temperature)
    return parts.merge(output_dir / f"{name}.jsonl", expected=len(prompts))


def _scores(records: Sequence[Mapping]) -> list[list[float]]:
    scores = ([s for s in r["scores"] if s is not None] for r in records)
    return [s for s in scores if s]


def temperature_sweep(run: StageRun, sampler: RejectionSampler, prompts: Sequence[PromptRow], output_dir: Path,
                      iteration: int) -> RunRecord:
    """Figure 8: K samples per prompt at each temperature, and the expected max reward among N samples."""
    curves = {}
    for temperature in sampler.config.temperature_sweep:
        name = f"temperature_sweep_T{temperature:g}"
        curves[temperature] = max_median_curves(_scores(sample_phase(sampler, prompts, name, output_dir, iteration,
                                                                     {}, temperature)))
        run.outputs[name] = f"{name}.jsonl"
    if run.is_main:
        write_json_atomic(output_dir / "temperature_sweep.json", {f"{t:g}": c for t, c in curves.items()})
        plot_temperature_sweep(curves, output_dir / "figure8_temperature_sweep.png")
    run.outputs.update(temperature_sweep="temperature_sweep.json", figure8="figure8_temperature_sweep.png")
    run.metrics["temperature_sweep"] = {f"{t:g}": {"max_of_K": c["max"][-1], "median_of_K": c["median"][-1]}
                                        for t, c in curves.items() if c["n"]}
    return run.finish()


def _mean_text(value: float | None) -> str:
    return "none (nothing scored)" if value is None else f"{value:.4f}"


def main(script_args: RejectionSamplingArguments, config: RejectionSamplingConfig, reward_args: RewardArguments,
         model_args: ModelConfig, sampling: RejectionSampling | None = None) -> RunRecord:
    sampling = sampling or RejectionSampling()
    run = StageRun(STAGE_NAME, config.output_dir,
                   resolved_args(script_args, config, reward_args, model_args, sampling))
    if run.done:
        return run.record
    if not script_args.prompts_file:
        raise UsageError("prompts_file is required")
    if script_args.iteration < 1:
        raise UsageError(f"iteration counts from 1, got {script_args.iteration}")
    if script_args.pool_dirs and (config.pool != "all" or config.temperature_sweep):
        raise UsageError("pool_dirs is read only by an iteration with pool=all (it would be ignored here)")
    sampling.check_installed()
    start = config.finetune_model_name_or_path
    if config.finetune and start and looks_local(start) and not Path(start).expanduser().exists():
        raise UsageError(f"finetune_model_name_or_path {start}: no such folder")
    # Every input is read and checked before a model is loaded.
    prompt_paths = [stage_output(p, "data") for p in script_args.prompts_file]
    prompts = load_prompts(prompt_paths)
    earlier = earlier_records(script_args.pool_dirs, script_args.iteration)
    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path)
    check_prompt_lengths(prompts, tokenizer, model_args.model_name_or_path)
    for i, p in enumerate(prompt_paths):
        run.add_input(f"prompts_{i}", p)
    for i, p in enumerate(script_args.pool_dirs):
        run.add_input(f"pool_{i}", Path(p) / "candidates.jsonl")
    run.add_input("model", model_args.model_name_or_path)
    if config.finetune and start:
        run.add_input("finetune_model", start)

    sampling_only = not config.finetune or bool(start) or bool(config.temperature_sweep)
    policy = load_model(Llama2ForCausalLM, model_args, role="policy", trainable=not sampling_only)
    if not (model_args.load_in_4bit or model_args.load_in_8bit):  # quantized weights are placed when loaded
        policy = policy.to(config.device)
    reward = load_reward(reward_args, tokenizer, config.device)
    out = Path(config.output_dir)
    # The sampler lives for the sampling only: a vLLM engine is stopped before the fine-tuning.
    with open_sampler(policy, tokenizer, sampling.sampling_config(config.num_samples), sampling,
                      seed=config.seed) as policy_sampler:
        sampler = RejectionSampler(policy_sampler, reward, config)
        if config.temperature_sweep:
            return temperature_sweep(run, sampler, prompts, out, script_args.iteration)
        records = sample_phase(sampler, prompts, "candidates", out, script_args.iteration, earlier)
    selection = select(records, earlier, config.pool)
    summary = {"iteration": script_args.iteration, **report(records, selection)}
    run.outputs.update(candidates="candidates.jsonl", data="selected.jsonl", report="report.json")
    if run.is_main:
        write_jsonl_atomic(out / "selected.jsonl", selection)
        write_json_atomic(out / "report.json", summary)
        if summary["figure7"]["n"]:
            plot_max_median(summary["figure7"], out / "figure7.png",
                            title=f"Max vs median reward among N samples (iteration {script_args.iteration})")
    if summary["figure7"]["n"]:
        run.outputs["figure7"] = "figure7.png"
    run.metrics.update({k: v for k, v in summary.items() if k != "figure7"})
    logger.info("iteration %d: %d prompts, mean score %s, mean best %s, %d rows selected",
                script_args.iteration, summary["prompts"], _mean_text(summary["mean_score"]),
                _mean_text(summary["mean_best_score"]), len(selection))
    if not config.finetune:
        return run.finish()

    if not selection:
        raise UsageError("nothing was selected to fine-tune on: every sample was cut at max_new_tokens, empty or "
                         "unscored (raise max_new_tokens, or set select_unfinished)")
    sampler.reward = reward = None  # the reward models are not needed any more: free them before training
    model = policy if not start else load_model(Llama2ForCausalLM, model_args, start, role="model to fine-tune")
    trainer = finetune_trainer(model, tokenizer, selection, config, peft_config(model_args))
    result = run_training(trainer)
    return finish_training(run, trainer, tokenizer, result)


STAGE = Stage(STAGE_NAME, "best-of-K rejection sampling scored by the reward models, then SFT on the best "
              "(paper §3.2.3)", (RejectionSamplingArguments, RejectionSamplingConfig, RewardArguments, ModelConfig,
                                  RejectionSampling), main)

"""`llama2-hf eval`: MMLU, GSM8K, TruthfulQA and ToxiGen on a checkpoint (paper §2.3, §4.1, Tables 3, 11, 14).

    llama2-hf eval --model_name_or_path out/ppo --tasks mmlu truthfulqa_mc --data_dir data --output_dir out/eval
    accelerate launch --multi_gpu --num_processes 8 -m llama2_hf.cli eval --config recipes/eval/llama2-7b.yaml

Inputs: a causal LM (Hub id, folder, or the folder of a stage that saved one) and the benchmark data (`data_dir`, or
the Hub datasets). Every judge and classifier the tasks need is resolved before the model is loaded, so a missing
one fails at once (`truthfulqa_mc` needs none). Under `accelerate launch` each rank evaluates a contiguous share of
every task's examples into its own part file; rank 0 merges them (an example lost or evaluated twice is an error)
and computes the metrics from all of them. Output in `output_dir`: `results.json`, `results.samples.jsonl` (one line
per example, with its task), `results.md` (the headline table) and `run.json`. A rerun with the same arguments
returns the record; an interrupted run is redone task by task.

Any transformers causal LM is evaluated as itself: the tokenizer saved with it is read by its own class
(`loading.load_tokenizer`), MMLU and GSM8K keep the base few-shot protocol (plain text, whatever the family), and the
chat variants (`chat`, `chat_tasks`, a system prompt) lay the task prompt out as one user turn in the model's chat
format: Llama 2-Chat's `[INST]` for a Llama 2 tokenizer, the tokenizer's own chat template otherwise
(`evaluation.prompts.template_chat_prompt`; a tokenizer without one is refused in one line).

On the vLLM backend (`sampling.BackendArguments`) GSM8K, TruthfulQA generation and ToxiGen generate with a vLLM
engine per process (each call seeded with the task's seed); MMLU and TruthfulQA MC stay log-likelihoods of the
PyTorch model.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from trl import ModelConfig

from ..console import library_progress
from ..evaluation.api import EvalConfig, check_data, markdown_table, run_task, task_metrics, write_report
from ..evaluation.base import ensure_pad_token
from ..loading import load_tokenizer
from ..runner import (
    RankParts, RunRecord, Stage, StageRun, UsageError, distributed_state, prefer_cpu, resolved_args, stage_output,
)
from ..sampling import BackendArguments, engine_sampler
from .common import load_model

logger = logging.getLogger(__name__)


def _tokenizer(name_or_path: str):
    """The checkpoint's own tokenizer class (`loading.load_tokenizer`: `Llama2Tokenizer` for a Llama 2 checkpoint,
    `AutoTokenizer` for any other family), with a pad token."""
    try:
        tokenizer = load_tokenizer(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {name_or_path}: {e}") from None
    ensure_pad_token(tokenizer)
    return tokenizer


def _model_source(name: str) -> str:
    """The model to load: a stage folder's `model` output, a local folder (which must exist) or a Hub id."""
    if (Path(name) / "run.json").is_file():
        return str(stage_output(name, "model"))
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix
    if looks_local and not path.is_dir():
        raise UsageError(f"model_name_or_path {name}: the folder does not exist")
    return name


def main(config: EvalConfig, model_args: ModelConfig, backend: BackendArguments | None = None) -> RunRecord:
    backend = backend or BackendArguments()
    library_progress(config.progress)
    if not config.output_dir:
        raise UsageError("output_dir is required")
    if not model_args.model_name_or_path:
        raise UsageError("model_name_or_path is required")
    # Everything that can fail without computing is checked first: model folder, judges, classifier, tokenizer.
    source = _model_source(model_args.model_name_or_path)
    if config.use_cpu:
        prefer_cpu()
    distributed_state()  # join the launch's ranks before anything reads them
    run = StageRun("eval", config.output_dir, resolved_args(config, model_args, backend))
    if run.done:
        return run.record
    config.check_models()
    check_data(config)
    backend.check_installed()
    model_args = dataclasses.replace(model_args, model_name_or_path=source)
    tokenizer = _tokenizer(config.tokenizer_name_or_path or source)
    from transformers import AutoModelForCausalLM

    from .. import Llama2Config  # noqa: F401  (registers model_type "llama2" with the Auto classes)

    model = load_model(AutoModelForCausalLM, model_args, role="model to evaluate", trainable=False)
    model = model.to(run.state.device).eval()
    run.add_input("model", source)
    if config.data_dir:
        run.add_input("data", config.data_dir)

    out = Path(config.output_dir)
    settings = config.settings()
    settings.shard = (run.state.process_index, run.state.num_processes)
    results, samples, timing = {}, {}, {}
    # On an engine backend (vLLM) GSM8K, TruthfulQA generation and ToxiGen sample with this process's engine
    # (started only when one of them runs); MMLU and the log-likelihood tasks keep the PyTorch model.
    generative = {"gsm8k", "toxigen", "truthfulqa", "truthfulqa_gen"} & set(config.tasks)
    with engine_sampler(model, tokenizer, backend if generative else None, seed=config.seed) as settings.sampler:
        _run_tasks(config, model, tokenizer, settings, out, results, samples, timing)

    if run.is_main:
        write_report({"model": str(source), "results": results, "samples": samples, "config": run.args,
                      "timing": timing}, out / "results.json")
        shutil.rmtree(out / "parts", ignore_errors=True)
        logger.info("results\n%s", markdown_table(results))
    run.outputs.update(results="results.json", samples="results.samples.jsonl", table="results.md")
    run.metrics.update(results)
    return run.finish()


def _run_tasks(config: EvalConfig, model, tokenizer, settings, out: Path, results: dict, samples: dict,
               timing: dict) -> None:
    """Each task on this process's share, its samples merged over processes (`RankParts`)."""
    for task in config.tasks:
        start = time.perf_counter()
        parts = RankParts(out / "parts", task)
        parts.path.unlink(missing_ok=True)  # an interrupted run redoes the task: no row may be written twice
        result = run_task(task, model, tokenizer, config, settings)
        positions = result.positions if result.positions is not None else range(len(result.samples))
        parts.append({"index": i, "sample": s} for i, s in zip(positions, result.samples))
        merged = parts.merge(out / "parts" / f"{task}.jsonl", expected=result.total)
        samples[task] = [row["sample"] for row in merged]
        results[task] = task_metrics(task, samples[task], config)
        timing[task] = time.perf_counter() - start
        logger.info("%s: %d examples in %.1fs: %s", task, len(merged), timing[task],
                    {k: round(v, 4) for k, v in results[task].items() if "/" not in k})


STAGE = Stage("eval", "MMLU, GSM8K, TruthfulQA and ToxiGen on a checkpoint (paper §2.3, §4.1)",
              (EvalConfig, ModelConfig, BackendArguments), main)

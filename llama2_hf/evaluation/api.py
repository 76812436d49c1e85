"""`evaluate_model`: run the paper's benchmarks on a checkpoint and write the report (what `llama2-hf eval` runs)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .base import RunSettings, TaskResult, load_model, load_tokenizer
from .gsm8k import GSM8KConfig, run_gsm8k
from .mmlu import MMLUConfig, run_mmlu
from .toxigen import ToxiGenConfig, run_toxigen
from .truthfulqa import TruthfulQAConfig, run_truthfulqa

logger = logging.getLogger(__name__)

# Task names: `truthfulqa` runs MC1/MC2 and the judged generation; the `_mc` / `_gen` names run one part.
TASKS = ("mmlu", "gsm8k", "truthfulqa", "truthfulqa_mc", "truthfulqa_gen", "toxigen")
DEFAULT_TASKS = ("mmlu", "gsm8k", "truthfulqa", "toxigen")


@dataclass
class EvalConfig(RunSettings):
    """Run settings plus one config per task (each holding the paper's protocol values as defaults)."""

    mmlu: MMLUConfig = field(default_factory=MMLUConfig)
    gsm8k: GSM8KConfig = field(default_factory=GSM8KConfig)
    truthfulqa: TruthfulQAConfig = field(default_factory=TruthfulQAConfig)
    toxigen: ToxiGenConfig = field(default_factory=ToxiGenConfig)

    def settings(self) -> RunSettings:
        return RunSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunSettings)})


def _run_task(name: str, model, tokenizer, config: EvalConfig) -> TaskResult:
    settings = config.settings()
    if name == "mmlu":
        return run_mmlu(model, tokenizer, settings, config.mmlu)
    if name == "gsm8k":
        return run_gsm8k(model, tokenizer, settings, config.gsm8k)
    if name == "toxigen":
        return run_toxigen(model, tokenizer, settings, config.toxigen)
    parts = {"truthfulqa": (True, True), "truthfulqa_mc": (True, False), "truthfulqa_gen": (False, True)}[name]
    tqa = dataclasses.replace(config.truthfulqa, run_mc=parts[0], run_generation=parts[1])
    return run_truthfulqa(model, tokenizer, settings, tqa)


def evaluate_model(model, tasks=DEFAULT_TASKS, *, tokenizer=None, config: EvalConfig | None = None,
                   output: str | Path | None = None, dtype="auto", **overrides) -> dict:
    """Evaluate `model` (a checkpoint path / Hub id, or a loaded causal LM) on `tasks`.

    `tokenizer` defaults to the checkpoint's (`Llama2Tokenizer` for Llama checkpoints); it is required with a loaded
    model, which is put in eval mode. `dtype` applies when loading a checkpoint. `overrides` replace top-level fields of `config` (e.g. `limit=5, batch_size=16, data_dir="../shared/data"`).
    Returns `{"results": {task: {metric: value}}, "samples": {task: [...]}, "config": {...}, "timing": {...}}`;
    with `output`, also writes it (see `write_report`). A tokenizer without a pad token gets UNK as pad.
    """
    config = config or EvalConfig()
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(EvalConfig)})
    if bad:
        raise ValueError(f"unknown evaluate_model options {bad}; expected fields of EvalConfig")
    config = dataclasses.replace(config, **overrides)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown}; expected a non-empty list from {list(TASKS)}")
    if isinstance(model, (str, Path)):
        name = str(model)
        tokenizer = tokenizer or load_tokenizer(name)
        model = load_model(name, "causal_lm", config.device, dtype)
    else:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            raise ValueError("pass tokenizer= along with a loaded model")
        model.eval()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer))

    results, samples, timing = {}, {}, {}
    for task in tasks:
        start = time.perf_counter()
        res = _run_task(task, model, tokenizer, config)
        timing[task] = time.perf_counter() - start
        results[task], samples[task] = res.metrics, res.samples
        logger.info("%s done in %.1fs: %s", task, timing[task],
                    {k: round(v, 4) for k, v in res.metrics.items() if "/" not in k})
    report = {"model": name, "results": results, "samples": samples, "config": dataclasses.asdict(config),
              "timing": timing}
    if output is not None:
        write_report(report, output)
    return report


def markdown_table(results: dict) -> str:
    """The headline numbers in the paper's layout, as percentages."""
    lines = []
    if "mmlu" in results:
        r = results["mmlu"]
        cols = [c for c in ("humanities", "stem", "social_sciences", "other") if f"acc/{c}" in r]
        names = {"humanities": "Humanities", "stem": "STEM", "social_sciences": "Social Sciences", "other": "Other"}
        lines += ["### MMLU (5-shot, Table 19 layout)", "",
                  "| " + " | ".join([names[c] for c in cols] + ["Avg"]) + " |",
                  "|" + "---|" * (len(cols) + 1),
                  "| " + " | ".join(f"{100 * r[f'acc/{c}']:.1f}" for c in cols) + f" | {100 * r['acc']:.1f} |", ""]
    for task, metrics in results.items():
        if task == "mmlu":
            continue
        lines += [f"### {task}", "", "| metric | % |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.2f} |" for k, v in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, output: str | Path) -> dict[str, Path]:
    """`output` (JSON: model, results, config, timing), `<stem>.samples.jsonl` (one line per example, with its
    task) and `<stem>.md` (the headline table). Returns the three paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": output, "samples": output.with_suffix(".samples.jsonl"), "markdown": output.with_suffix(".md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if k != "samples"}, f, indent=2)
    with open(paths["samples"], "w", encoding="utf-8") as f:
        for task, rows in report["samples"].items():
            for row in rows:
                f.write(json.dumps({"task": task, **row}, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(f"## {report['model']}\n\n" + markdown_table(report["results"]), encoding="utf-8")
    return paths


__all__ = ["DEFAULT_TASKS", "EvalConfig", "TASKS", "evaluate_model", "markdown_table",
           "write_report"]

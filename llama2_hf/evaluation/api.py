"""`EvalConfig` (every option of `llama2-hf eval`, one field each) and `evaluate_model`, the in-process API."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..tokenization_llama2 import DEFAULT_SYSTEM_PROMPT
from .base import RunSettings, TaskResult, check_model_source, load_model, load_tokenizer
from .data import TOXIGEN_ALL_GROUPS, TOXIGEN_GROUPS
from .gsm8k import GSM8KConfig, gsm8k_metrics, run_gsm8k
from .mmlu import MMLUConfig, mmlu_metrics, run_mmlu
from .toxigen import ToxiGenConfig, run_toxigen, toxigen_metrics
from .truthfulqa import TruthfulQAConfig, run_truthfulqa, truthfulqa_metrics

logger = logging.getLogger(__name__)

# Task names: `truthfulqa` runs MC1/MC2 and the judged generation; the `_mc` / `_gen` names run one part.
TASKS = ("mmlu", "gsm8k", "truthfulqa", "truthfulqa_mc", "truthfulqa_gen", "toxigen")
DEFAULT_TASKS = ("mmlu", "gsm8k", "truthfulqa", "toxigen")
CHAT_TASK_FAMILIES = ("mmlu", "gsm8k", "truthfulqa", "toxigen")
OFFLINE_HINT = ("; `truthfulqa_mc` needs no judge and works offline, as do mmlu and gsm8k with local data "
                "(data_dir)")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class EvalConfig(RunSettings):
    """Every option of `llama2-hf eval`: the run settings, then one prefixed group per task. The defaults are the
    protocol values this package documents for each benchmark (the paper's where the paper states one)."""

    output_dir: str | None = field(default=None, metadata=_help(
        "Folder of results.json, results.samples.jsonl, results.md and run.json."))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS), metadata=_help(
        f"Tasks to run, from {', '.join(TASKS)}."))
    chat_tasks: list[str] | None = field(default=None, metadata=_help(
        "Wrap only these task families' prompts in the chat format (mmlu, gsm8k, truthfulqa, toxigen)."))
    tokenizer_name_or_path: str | None = field(default=None, metadata=_help(
        "Tokenizer folder or Hub id, when it is not saved with the model."))
    # MMLU
    mmlu_subjects: list[str] | None = field(default=None, metadata=_help("MMLU subjects (unset: all 57)."))
    mmlu_num_fewshot: int = field(default=5, metadata=_help("MMLU few-shot examples (5: paper §2.3)."))
    mmlu_share_prefix: bool = field(default=True, metadata=_help(
        "Compute each subject's few-shot prefix once (same numbers, faster)."))
    # GSM8K
    gsm8k_num_fewshot: int = field(default=8, metadata=_help("GSM8K chain-of-thought exemplars (8: paper §2.3)."))
    gsm8k_max_new_tokens: int = field(default=256, metadata=_help(
        "GSM8K generation length (256: lm-evaluation-harness gsm8k_cot)."))
    gsm8k_maj_k: int = field(default=0, metadata=_help("Also report maj@k over k sampled chains (0: off)."))
    gsm8k_maj_temperature: float = field(default=0.2, metadata=_help(
        "Temperature of the maj@k chains (paper silent; lm-eval's gsm8k_cot_self_consistency uses 0.2)."))
    # TruthfulQA
    truthfulqa_primer: str = field(default="fixed", metadata=_help(
        "QA primer: 'fixed' (TruthfulQA's six pairs, as lm-evaluation-harness) or 'random' (the paper's, A.4.7: "
        "6 random QA pairs of the data per question, seeded by `seed`).", choices=["fixed", "random"]))
    truthfulqa_temperature: float = field(default=0.1, metadata=_help(
        "TruthfulQA generation temperature: 0.1, the paper's for pretrained and chat models (§4.1, A.4.7). "
        "lm-evaluation-harness's truthfulqa_gen decodes greedily (truthfulqa_greedy)."))
    truthfulqa_top_p: float = field(default=0.9, metadata=_help("TruthfulQA nucleus top-p (0.9: paper §4.1)."))
    truthfulqa_greedy: bool = field(default=False, metadata=_help(
        "Decode TruthfulQA greedily, as lm-evaluation-harness's truthfulqa_gen, instead of T=0.1, top-p 0.9."))
    truthfulqa_max_new_tokens: int = field(default=50, metadata=_help(
        "TruthfulQA answer length (paper silent; 50 as the original TruthfulQA code)."))
    truth_judge: str = field(default=TruthfulQAConfig.truth_judge, metadata=_help(
        "Truthfulness judge (causal LM folder or Hub id); resolved before any generation."))
    info_judge: str = field(default=TruthfulQAConfig.info_judge, metadata=_help(
        "Informativeness judge (causal LM folder or Hub id); resolved before any generation."))
    # ToxiGen
    toxigen_source: str = field(default="prompts", metadata=_help(
        "ToxiGen prompts: 'prompts' = the original ToxiGen demonstration files (hate_<group>_1k / "
        "neutral_<group>_1k); 'annotated' = built from the revised human-annotated subset (Hosseini et al. 2023) "
        "that the paper names (6 statements per prompt: our construction, the paper gives none).",
        choices=["prompts", "annotated"]))
    toxigen_annotated_path: str | None = field(default=None, metadata=_help(
        "toxiGen.json of microsoft/SafeNLP (default: <data_dir>/toxigen/annotated/toxiGen.json)."))
    toxigen_groups: list[str] | None = field(default=None, metadata=_help(
        f"ToxiGen groups (unset: the paper's 13; all: {', '.join(TOXIGEN_ALL_GROUPS)})."))
    toxigen_label: str = field(default="hate", metadata=_help("Hateful or benign prompts.",
                                                               choices=["hate", "neutral"]))
    toxigen_temperature: float = field(default=0.1, metadata=_help(
        "ToxiGen temperature: 0.1, the paper's for pretrained and chat models (§4.1, A.4.7). "
        "lm-evaluation-harness's toxigen task does not generate (it scores statements by log-likelihood)."))
    toxigen_top_p: float = field(default=0.9, metadata=_help("ToxiGen nucleus top-p (0.9: paper §4.1)."))
    toxigen_max_new_tokens: int = field(default=128, metadata=_help("ToxiGen continuation length (paper silent)."))
    toxigen_classifier: str = field(default=ToxiGenConfig.classifier, metadata=_help(
        "Sequence classifier scoring the continuations; resolved before any generation."))
    toxigen_toxic_label: int = field(default=1, metadata=_help("Classifier label index meaning toxic."))

    def __post_init__(self):
        super().__post_init__()
        self.tasks = [t for item in self.tasks for t in str(item).split(",") if t.strip()]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {unknown}; expected a non-empty list from {list(TASKS)}")
        bad = sorted(set(self.chat_tasks or []) - set(CHAT_TASK_FAMILIES))
        if bad:
            raise ValueError(f"chat_tasks: unknown tasks {bad}; expected some of {list(CHAT_TASK_FAMILIES)}")
        if self.system_prompt == "default":
            self.system_prompt = DEFAULT_SYSTEM_PROMPT
        for name in ("truthfulqa_primer", "toxigen_source", "toxigen_label"):
            choices = type(self).__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def settings(self) -> RunSettings:
        """The run settings; a system prompt with `chat_tasks` (and chat off) goes to those tasks only."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunSettings) if f.init}
        if self.chat_tasks and not self.chat:
            values["system_prompt"] = None
        return RunSettings(**values)

    def _chat(self, family: str) -> dict:
        if family not in (self.chat_tasks or []):
            return {}
        return {"chat": True, **({"system_prompt": self.system_prompt} if self.system_prompt is not None else {})}

    def mmlu_config(self) -> MMLUConfig:
        return MMLUConfig(subjects=self.mmlu_subjects, num_fewshot=self.mmlu_num_fewshot,
                          share_prefix=self.mmlu_share_prefix, **self._chat("mmlu"))

    def gsm8k_config(self) -> GSM8KConfig:
        return GSM8KConfig(num_fewshot=self.gsm8k_num_fewshot, max_new_tokens=self.gsm8k_max_new_tokens,
                           maj_k=self.gsm8k_maj_k, maj_temperature=self.gsm8k_maj_temperature, **self._chat("gsm8k"))

    def truthfulqa_config(self, task: str = "truthfulqa") -> TruthfulQAConfig:
        run_mc, run_generation = {"truthfulqa": (True, True), "truthfulqa_mc": (True, False),
                                  "truthfulqa_gen": (False, True)}[task]
        return TruthfulQAConfig(run_mc=run_mc, run_generation=run_generation, temperature=self.truthfulqa_temperature,
                                top_p=self.truthfulqa_top_p, greedy=self.truthfulqa_greedy,
                                max_new_tokens=self.truthfulqa_max_new_tokens, truth_judge=self.truth_judge,
                                info_judge=self.info_judge, primer=self.truthfulqa_primer, **self._chat("truthfulqa"))

    def toxigen_config(self) -> ToxiGenConfig:
        return ToxiGenConfig(groups=list(self.toxigen_groups or TOXIGEN_GROUPS), source=self.toxigen_source,
                             prompt_label=self.toxigen_label, annotated_path=self.toxigen_annotated_path,
                             temperature=self.toxigen_temperature, top_p=self.toxigen_top_p,
                             max_new_tokens=self.toxigen_max_new_tokens, classifier=self.toxigen_classifier,
                             toxic_label=self.toxigen_toxic_label, **self._chat("toxigen"))

    def check_models(self) -> None:
        """Resolve the judges and the classifier the tasks need, before any model is loaded or anything generated
        (UsageError naming the model and what works offline)."""
        if {"truthfulqa", "truthfulqa_gen"} & set(self.tasks):
            check_model_source(self.truth_judge, "TruthfulQA truthfulness judge (truth_judge)", OFFLINE_HINT)
            check_model_source(self.info_judge, "TruthfulQA informativeness judge (info_judge)", OFFLINE_HINT)
        if "toxigen" in self.tasks:
            check_model_source(self.toxigen_classifier, "ToxiGen classifier (toxigen_classifier)", OFFLINE_HINT)


def check_data(config: EvalConfig) -> None:
    """Read every task's benchmark data before any model is loaded (it is small, and cached by the Hub loaders): a
    missing local file or an unreachable Hub dataset is a `UsageError` naming the task and what to give instead."""
    from .data import load_gsm8k, load_mmlu, load_toxigen_prompts, load_truthfulqa_gen, load_truthfulqa_mc

    loaders = {
        "mmlu": lambda: load_mmlu(config.data_dir, config.mmlu_config().subjects),
        "gsm8k": lambda: load_gsm8k(config.data_dir),
        "truthfulqa_mc": lambda: load_truthfulqa_mc(config.data_dir),
        "truthfulqa_gen": lambda: load_truthfulqa_gen(config.data_dir),
        "toxigen": lambda: (config.toxigen_config().source != "prompts"
                            or load_toxigen_prompts(config.data_dir, config.toxigen_config().groups,
                                                    config.toxigen_config().prompt_label)),
    }
    needed = {t for task in config.tasks for t in (("truthfulqa_mc", "truthfulqa_gen") if task == "truthfulqa"
                                                  else (task,))}
    for task in sorted(needed):
        try:
            loaders[task]()
        except (OSError, ConnectionError, ValueError) as e:  # FileNotFoundError, offline Hub, malformed files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            where = f"data_dir {config.data_dir}" if config.data_dir else "the Hub (no data_dir given)"
            raise UsageError(f"{task}: cannot read its data from {where}: {reason}. Give data_dir, a folder laid "
                             "out as llama2_hf.evaluation.data describes") from None


def run_task(name: str, model, tokenizer, config: EvalConfig, settings: RunSettings | None = None) -> TaskResult:
    """One task on `settings`' share of its examples (all of them by default)."""
    settings = settings or config.settings()
    if name == "mmlu":
        return run_mmlu(model, tokenizer, settings, config.mmlu_config())
    if name == "gsm8k":
        return run_gsm8k(model, tokenizer, settings, config.gsm8k_config())
    if name == "toxigen":
        return run_toxigen(model, tokenizer, settings, config.toxigen_config())
    return run_truthfulqa(model, tokenizer, settings, config.truthfulqa_config(name))


def task_metrics(name: str, samples: list[dict], config: EvalConfig) -> dict[str, float]:
    """A task's metrics from all its samples (the merged shares of a launch): what each runner computes alone."""
    if name == "mmlu":
        return mmlu_metrics(samples)
    if name == "gsm8k":
        return gsm8k_metrics(samples, config.gsm8k_maj_k)
    if name == "toxigen":
        return toxigen_metrics(samples, config.toxigen_config().groups)
    return truthfulqa_metrics(samples, config.truthfulqa_config(name).judge_threshold)


def evaluate_model(model, tasks=None, *, tokenizer=None, config: EvalConfig | None = None,
                   output: str | Path | None = None, dtype="auto", **overrides) -> dict:
    """Evaluate `model` (a checkpoint path / Hub id, or a loaded causal LM) on `tasks` in this process.

    `tokenizer` defaults to the checkpoint's (`base.load_tokenizer`: `Llama2Tokenizer` for Llama 2, its own class
    for any other family); it is required with a loaded model, which is put in eval mode. `dtype` applies when loading a checkpoint. `overrides` replace fields of
    `config` (e.g. `limit=5, batch_size=16, mmlu_subjects=["anatomy"]`); `tasks` overrides `config.tasks`.
    Returns `{"results": {task: {metric: value}}, "samples": {task: [...]}, "config": {...}, "timing": {...}}`;
    with `output`, also writes it (see `write_report`). A tokenizer without a pad token gets UNK (else EOS) as pad.
    `llama2-hf eval` is the same over the ranks of a launch (`llama2_hf.stages.evaluate`).
    """
    config = config or EvalConfig()
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(EvalConfig) if f.init})
    if bad:
        raise ValueError(f"unknown evaluate_model options {bad}; expected fields of EvalConfig")
    if tasks is not None:
        overrides["tasks"] = [tasks] if isinstance(tasks, str) else list(tasks)
    config = dataclasses.replace(config, **overrides)
    if not isinstance(model, (str, Path)) and tokenizer is None:
        raise ValueError("pass tokenizer= along with a loaded model")
    config.check_models()
    if isinstance(model, (str, Path)):
        name = str(model)
        tokenizer = tokenizer or load_tokenizer(name)
        model = load_model(name, "causal_lm", config.device, dtype)
    else:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        model.eval()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(str(tokenizer))

    results, samples, timing = {}, {}, {}
    for task in config.tasks:
        start = time.perf_counter()
        res = run_task(task, model, tokenizer, config)
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


__all__ = ["DEFAULT_TASKS", "EvalConfig", "TASKS", "evaluate_model", "markdown_table", "run_task", "task_metrics",
           "write_report"]

"""Targeted safety context distillation (paper §4.2.4, Tables 13, 39, 40, Fig. 16).

Context distillation moves the effect of a safety preprompt into the weights: answer adversarial prompts with a
safety preprompt, then fine-tune on those answers *without* the preprompt. The paper makes it targeted:
- it is applied to adversarial prompts only (on helpful prompts it causes vague answers and false refusals, Tab. 40);
- a prompt labelled with a risk category gets a preprompt with that category's answer template, which raises the
  safety-RM score more than a generic preprompt does (Fig. 16a);
- the preprompted answer is kept only when the safety reward model scores it higher than the answer generated
  without the preprompt (Fig. 16b).

Preprompts are data (`resources/safety/preprompts.json`, extensible with your own JSON, see `SafetyPreprompts`).

Input prompts (the pipeline's prompt rows, `data.prompt_row`), one per row:
    prompt | messages  the prompt: text, or messages ending with a user turn
    is_safety_prompt   bool tag; only tagged rows are distilled (others are counted as skipped)
    risk_category      optional: a category key or display name of the preprompt file (null: generic preprompt)
    id                 optional, carried over

Output SFT dataset (`distilled.jsonl`), one row per kept prompt:
    messages           the prompt's messages (no preprompt) + {"role": "assistant", "content": preprompted answer}
    id, source_index   provenance
    risk_category      the canonical category key, or null
    preprompt, preprompt_kind   the preprompt used ("generic" | "category") - not part of `messages`
    safety_score, safety_score_without_preprompt, safety_gain   the safety RM's raw scores and their difference
The `distill` stage also writes `candidates.jsonl`: one record per prompt row (`status` scored, not_adversarial or
too_long), with both answers and scores, kept or not.

Choices where the paper is silent (all options of `DistillConfig`):
- the preprompt goes in the system message (`placement="system"`, appended before an existing system message);
  `placement="prefix"` puts it before the text of the final user message instead. A model whose chat template has
  no system role (Mistral, Gemma) reads a system message at the front of the first user turn
  (`chat_format.ChatFormat.with_system`), so there `system` differs from `prefix` only for multi-turn prompts;
- both answers are sampled by the same model and settings; both are scored on the prompt *without* the preprompt
  (the context the distilled model will see);
- "higher" is strict (`min_gain=0.0`): ties keep nothing;
- a generic preprompt is drawn uniformly per prompt from the quoted ones and the template expansions, seeded by
  `seed` and the row's index (the same choice whatever the number of ranks).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .data import SAFETY_TAG, InvalidExample, PromptRow, prompt_row
from .sampling.chat import Answerer

logger = logging.getLogger(__name__)

PREPROMPTS_FILE = Path(__file__).resolve().parent / "resources" / "safety" / "preprompts.json"
PLACEMENTS = ("system", "prefix")


@dataclass
class SafetyPreprompts:
    """Generic safety preprompts and per-risk-category preprompts with answer templates (paper Tables 13, 39).

    `generic` lists complete preprompts; `category_preprompt` is filled with a category's `name` and
    `answer_template` (`categories[key] = {"name", "answer_template"}`).
    """

    generic: list[str]
    category_preprompt: str
    categories: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None, extra: str | Path | None = None) -> "SafetyPreprompts":
        """The shipped preprompts (or those of `path`), with the entries of `extra` merged over them.

        File keys: `generic.quoted` (complete preprompts), `generic.templates` (with `{adjective}` and
        `{adjective2}`) and `generic.adjectives` (expanded over every pair of distinct adjectives, as the paper built
        its preprompts from templates and adjectives), `category_preprompt`, `categories`.
        """
        spec = json.loads(Path(path or PREPROMPTS_FILE).read_text(encoding="utf-8"))
        if extra is not None:
            more = json.loads(Path(extra).read_text(encoding="utf-8"))
            generic = {**spec.get("generic", {})}
            for key, value in more.get("generic", {}).items():
                generic[key] = list(generic.get(key, [])) + list(value)
            spec = {**spec, **{k: v for k, v in more.items() if k not in ("generic", "categories")},
                    "generic": generic, "categories": {**spec.get("categories", {}), **more.get("categories", {})}}
        generic = spec.get("generic", {})
        texts = list(generic.get("quoted", []))
        adjectives = list(dict.fromkeys(generic.get("adjectives", [])))
        for template in generic.get("templates", []):
            if "{adjective2}" in template:
                texts += [template.format(adjective=a, adjective2=b) for a, b in itertools.combinations(adjectives, 2)]
            else:
                texts += [template.format(adjective=a) for a in adjectives]
        if not texts:
            raise ValueError("the preprompt file defines no generic preprompt")
        categories = {}
        for key, entry in spec.get("categories", {}).items():
            if not isinstance(entry, Mapping) or not {"name", "answer_template"} <= set(entry):
                raise ValueError(f"preprompt category {key!r} needs 'name' and 'answer_template'")
            categories[key] = {"name": entry["name"], "answer_template": entry["answer_template"]}
        template = spec.get("category_preprompt", "")
        if categories and not ("{name}" in template and "{answer_template}" in template):
            raise ValueError("category_preprompt must contain '{name}' and '{answer_template}'")
        return cls(generic=list(dict.fromkeys(texts)), category_preprompt=template, categories=categories)

    def category_key(self, label: str) -> str | None:
        """The key of a category given its key or display name (case-insensitive), or None if unknown."""
        wanted = label.strip().lower()
        for key, entry in self.categories.items():
            if wanted in (key.lower(), entry["name"].lower()):
                return key
        return None

    def for_category(self, key: str) -> str:
        entry = self.categories[key]
        return self.category_preprompt.format(name=entry["name"], answer_template=entry["answer_template"])


def apply_preprompt(messages: Sequence[Mapping], preprompt: str, placement: str = "system",
                    separator: str = "\n\n") -> list[dict]:
    """The prompt messages with the preprompt added: as (or before) the system message, or before the final user
    message's text. The input is not modified."""
    out = [dict(m) for m in messages]
    if placement == "system":
        if out[0]["role"] == "system":
            out[0]["content"] = f"{preprompt}{separator}{out[0]['content']}"
        else:
            out.insert(0, {"role": "system", "content": preprompt})
    elif placement == "prefix":
        out[-1]["content"] = f"{preprompt}{separator}{out[-1]['content']}"
    else:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return out


def select_improved(scores_with: Sequence[float], scores_without: Sequence[float],
                    min_gain: float = 0.0) -> list[bool]:
    """Keep pair i when the preprompted answer's safety score beats the plain one: `with - without > min_gain`."""
    if len(scores_with) != len(scores_without):
        raise ValueError(f"{len(scores_with)} scores with the preprompt but {len(scores_without)} without")
    return [float(w) - float(wo) > min_gain for w, wo in zip(scores_with, scores_without)]


@dataclass
class DistillConfig:
    """Options of the `distill` stage (the module docstring explains the choices where the paper is silent)."""

    preprompts_file: str | None = field(default=None, metadata={
        "help": "JSON of extra or replacement preprompts, merged over the shipped resources/safety/preprompts.json."})
    placement: str = field(default="system", metadata={
        "help": "Preprompt as (or before) the system message, or as a prefix of the final user message.",
        "choices": list(PLACEMENTS)})
    separator: str = field(default="\n\n", metadata={"help": "Between the preprompt and the text it precedes."})
    use_category_templates: bool = field(default=True, metadata={
        "help": "Answer templates per risk category (paper Fig. 16a); false: generic preprompts only."})
    unknown_category: str = field(default="error", metadata={
        "help": "A risk_category not in the preprompt file: error, or use a generic preprompt (counted).",
        "choices": ["error", "generic"]})
    assume_adversarial: bool = field(default=False, metadata={
        "help": f"Treat every row as adversarial (a red-team prompt file without the {SAFETY_TAG!r} tag)."})
    category_field: str = field(default="risk_category", metadata={"help": "Column holding the risk category."})
    min_gain: float = field(default=0.0, metadata={
        "help": "Keep a pair when safety_score_with - safety_score_without > min_gain (paper: 'better'; strict)."})
    on_overlength: str = field(default="error", metadata={
        "help": "A preprompted prompt that fills the model's context: error, or skip (counted).",
        "choices": ["error", "skip"]})
    seed: int = field(default=0, metadata={"help": "Seed of the generic preprompt choice and of the sampling."})

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.unknown_category not in ("error", "generic"):
            raise ValueError(f"unknown_category must be 'error' or 'generic', got {self.unknown_category!r}")
        if self.on_overlength not in ("error", "skip"):
            raise ValueError(f"on_overlength must be 'error' or 'skip', got {self.on_overlength!r}")


@dataclass
class DistillReport:
    """Counts and safety-score statistics of one distillation run."""

    rows: int = 0
    adversarial: int = 0
    skipped_not_adversarial: int = 0
    kept: int = 0
    mean_gain_kept: float = float("nan")  # mean (with - without) over the kept pairs: the headline number
    mean_gain_all: float = float("nan")  # over every adversarial prompt (what untargeted distillation would give)
    mean_score_without: float = float("nan")
    mean_score_with: float = float("nan")
    kept_by_category: dict[str, list[int]] = field(default_factory=dict)  # category -> [kept, total]
    unknown_category_as_generic: int = 0
    skipped_too_long: int = 0

    def to_dict(self) -> dict:
        """The fields, NaN (no pair to average) written as None so that the dict is valid JSON."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self.__dict__.items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def as_prompt_row(row: Mapping | PromptRow, index: int) -> PromptRow:
    """A prompt row through the pipeline's one parser (`data.prompt_row`); a `PromptRow` passes through. The tag
    name this module used to read, `adversarial`, is refused: ignored, it would silently distil nothing."""
    parsed = row if isinstance(row, PromptRow) else prompt_row(row, index)
    if "adversarial" in parsed.extra:
        raise InvalidExample(index, "adversarial", "unknown_field", f"unknown column; the safety tag is {SAFETY_TAG!r}")
    return parsed


def distill_records(rows: Iterable[tuple[int, Mapping | PromptRow]], sampler: Answerer, safety_reward: Callable,
                    preprompts: SafetyPreprompts | None = None,
                    config: DistillConfig | None = None) -> list[dict]:
    """One record per `(index, prompt row)`: `status` "scored" (both answers and their safety scores, `kept`),
    "not_adversarial" or "too_long". The preprompt of row i is drawn from `seed` and i alone, so records do not
    depend on how the rows are split into calls (ranks, chunks, resumes)."""
    from .rewards import score_with

    config = config or DistillConfig()
    preprompts = preprompts or SafetyPreprompts.load()
    max_length, counter = getattr(sampler, "max_length", None), getattr(sampler, "count_tokens", None)
    records, items = [], []
    for index, raw in rows:
        row = as_prompt_row(raw, index)
        record = {"index": index, "id": row.id, "unknown_category": False}
        records.append(record)
        if not (config.assume_adversarial or row.is_safety_prompt):
            record["status"] = "not_adversarial"
            continue
        label = row.extra.get(config.category_field)
        key = None
        if label is not None and config.use_category_templates:
            if not isinstance(label, str):
                raise InvalidExample(index, config.category_field, "bad_type", f"expected text, got {label!r}")
            key = preprompts.category_key(label)
            if key is None:
                if config.unknown_category == "error":
                    raise InvalidExample(index, config.category_field, "unknown_category",
                                         f"unknown risk category {label!r}; known: {sorted(preprompts.categories)} "
                                         "(or their names), or set unknown_category='generic'")
                record["unknown_category"] = True
        text = preprompts.for_category(key) if key else random.Random(f"{config.seed}:{index}").choice(
            preprompts.generic)
        preprompted = apply_preprompt(row.messages, text, config.placement, config.separator)
        if max_length is not None and counter is not None and (n := counter(preprompted)) >= max_length:
            if config.on_overlength == "error":
                raise ValueError(f"row {index}: the prompt with its preprompt is {n} tokens, no room left in the "
                                 f"model's context of {max_length} (set on_overlength='skip' to skip such rows)")
            record["status"] = "too_long"
            continue
        record.update({"status": "scored", "prompt": row.messages, "risk_category": key, "preprompt": text,
                       "preprompt_kind": "category" if key else "generic"})
        items.append((record, preprompted))
    if not items:
        return records
    plain = [r["prompt"] for r, _ in items]
    answers = sampler(plain + [pre for _, pre in items])
    if len(answers) != 2 * len(items):
        raise ValueError(f"the sampler returned {len(answers)} answers for {2 * len(items)} conversations")
    without, with_pre = answers[: len(items)], answers[len(items):]
    # Both answers are scored in the context the distilled model will see: the prompt without the preprompt.
    scores = score_with(safety_reward, plain + plain, list(without) + list(with_pre)).raw.tolist()
    s_without, s_with = scores[: len(items)], scores[len(items):]
    keep = select_improved(s_with, s_without, config.min_gain)
    for (record, _), a0, a1, r0, r1, k in zip(items, without, with_pre, s_without, s_with, keep):
        record.update({"answer_without_preprompt": a0, "answer_with_preprompt": a1, "safety_score": r1,
                       "safety_score_without_preprompt": r0, "safety_gain": r1 - r0, "kept": k})
    return records


def summarize(records: Sequence[Mapping]) -> tuple[list[dict], list[dict], DistillReport]:
    """The distilled SFT rows (kept pairs, without the preprompt), the candidates (every scored prompt) and the
    report, from the records of every row in index order."""
    report = DistillReport(rows=len(records))
    kept_rows, candidates, gains, keep, s_with, s_without = [], [], [], [], [], []
    for r in records:
        report.unknown_category_as_generic += r["unknown_category"]
        if r["status"] == "not_adversarial":
            report.skipped_not_adversarial += 1
            continue
        report.adversarial += 1
        if r["status"] == "too_long":
            report.skipped_too_long += 1
            continue
        common = {"id": r["id"], "source_index": r["index"], "risk_category": r["risk_category"],
                  "preprompt": r["preprompt"], "preprompt_kind": r["preprompt_kind"], "safety_score": r["safety_score"],
                  "safety_score_without_preprompt": r["safety_score_without_preprompt"],
                  "safety_gain": r["safety_gain"]}
        candidates.append({**common, "prompt": r["prompt"], "answer_with_preprompt": r["answer_with_preprompt"],
                           "answer_without_preprompt": r["answer_without_preprompt"], "kept": r["kept"]})
        counts = report.kept_by_category.setdefault(r["risk_category"] or "generic", [0, 0])
        counts[0] += r["kept"]
        counts[1] += 1
        gains.append(r["safety_gain"])
        keep.append(r["kept"])
        s_with.append(r["safety_score"])
        s_without.append(r["safety_score_without_preprompt"])
        if r["kept"]:
            kept_rows.append({"messages": [*r["prompt"], {"role": "assistant", "content": r["answer_with_preprompt"]}],
                              **common})
    report.kept = len(kept_rows)
    report.mean_gain_kept = _mean([g for g, k in zip(gains, keep) if k])
    report.mean_gain_all = _mean(gains)
    report.mean_score_without = _mean(s_without)
    report.mean_score_with = _mean(s_with)
    if report.skipped_too_long:
        logger.warning("distill: skipped %d prompts too long for the context with their preprompt",
                       report.skipped_too_long)
    if report.skipped_not_adversarial:
        logger.info("distill: %d rows not tagged %s were not distilled", report.skipped_not_adversarial, SAFETY_TAG)
    if report.unknown_category_as_generic:
        logger.warning("distill: %d rows with an unknown risk category got a generic preprompt",
                       report.unknown_category_as_generic)
    logger.info("distill: kept %d of %d adversarial prompts, mean safety gain of the kept %.4f", report.kept,
                report.adversarial, report.mean_gain_kept)
    return kept_rows, candidates, report


def distill(rows: Iterable[Mapping | PromptRow], sampler: Answerer, safety_reward: Callable,
            preprompts: SafetyPreprompts | None = None,
            config: DistillConfig | None = None) -> tuple[list[dict], list[dict], DistillReport]:
    """Targeted safety context distillation in one process.

    Args:
        rows: prompt rows (`data.prompt_row` schema: `prompt` or `messages`, the safety tag `is_safety_prompt`,
            optional `id` and `risk_category`), or `PromptRow`s.
        sampler: `sampler(conversations) -> answers` (e.g. `sampling.ChatSampler` on the model being distilled).
        safety_reward: the safety RM as a reward of the pipeline contract, `reward(prompts, responses) -> scores`
            (`rewards.RewardModelScorer`, or any callable; a `score` method's `raw` scores are used when present).
        preprompts: default `SafetyPreprompts.load()`.
        config: `DistillConfig()` by default.

    Returns the distilled SFT rows (kept pairs only, without the preprompt), every candidate, and the report.
    """
    return summarize(distill_records(enumerate(rows), sampler, safety_reward, preprompts, config))


__all__ = ["PREPROMPTS_FILE", "DistillConfig", "DistillReport", "SafetyPreprompts", "apply_preprompt", "distill",
           "distill_records", "select_improved", "summarize"]

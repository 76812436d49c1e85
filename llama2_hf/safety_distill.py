"""Targeted safety context distillation (paper §4.2.4, Tables 13, 39, 40, Fig. 16).

Context distillation moves the effect of a safety preprompt into the weights: answer adversarial prompts with a
safety preprompt, then fine-tune on those answers *without* the preprompt. The paper makes it targeted:
- it is applied to adversarial prompts only (on helpful prompts it causes vague answers and false refusals, Tab. 40);
- a prompt labelled with a risk category gets a preprompt with that category's answer template, which raises the
  safety-RM score more than a generic preprompt does (Fig. 16a);
- the preprompted answer is kept only when the safety reward model scores it higher than the answer generated
  without the preprompt (Fig. 16b).

Preprompts are data (`resources/safety/preprompts.json`, extensible with your own JSON, see `SafetyPreprompts`).

Input prompts (JSONL or a `datasets` dataset), one per row:
    prompt | messages   the prompt: text, or messages ending with a user turn
    adversarial | is_safety   bool tag; only tagged rows are distilled (others are counted as skipped)
    risk_category      optional: a category key or display name of the preprompt file (null: generic preprompt)
    id                 optional, carried over

Output SFT dataset (`distilled.jsonl`), one row per kept prompt:
    messages           the prompt's messages (no preprompt) + {"role": "assistant", "content": preprompted answer}
    id, source_index   provenance
    risk_category      the canonical category key, or null
    preprompt, preprompt_kind   the preprompt used ("generic" | "category") - not part of `messages`
    safety_score, safety_score_without_preprompt, safety_gain   the safety RM's raw scores and their difference
`candidates.jsonl` holds every adversarial prompt with both answers and scores, kept or not.

Choices where the paper is silent (all options of `DistillConfig`):
- the preprompt goes in the system message (`placement="system"`, appended before an existing system message);
  `placement="prefix"` puts it before the text of the final user message instead;
- both answers are sampled by the same model and settings; both are scored on the prompt *without* the preprompt
  (the context the distilled model will see);
- "higher" is strict (`min_gain=0.0`): ties keep nothing;
- a generic preprompt is drawn uniformly per prompt (seeded) from the quoted ones and the template expansions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .gatt import Sampler, add_sampling_arguments, load_dialogues, sampler_from_args, write_jsonl, write_run_json

logger = logging.getLogger(__name__)

PREPROMPTS_FILE = Path(__file__).resolve().parent / "resources" / "safety" / "preprompts.json"
PLACEMENTS = ("system", "prefix")
TAG_FIELDS = ("adversarial", "is_safety")


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
    """Options of `distill` (see the module docstring for the choices)."""

    placement: str = "system"  # "system" or "prefix"
    separator: str = "\n\n"
    use_category_templates: bool = True  # answer templates per risk category (paper Fig. 16a); else generic only
    unknown_category: str = "error"  # a risk_category not in the preprompt file: "error" or "generic"
    tag_field: str | None = None  # None: the first of "adversarial", "is_safety" present in a row
    assume_adversarial: bool = False  # treat every row as adversarial (a red-team prompt file without tags)
    category_field: str = "risk_category"
    min_gain: float = 0.0  # keep when score_with - score_without > min_gain (paper: "better"; strict)
    on_overlength: str = "error"  # a preprompted prompt that fills the model's context: "error" or "skip" (counted)
    seed: int = 0

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


def _prompt_messages(row: Mapping, index: int) -> list[dict]:
    from .generation import as_messages
    from .tokenization_llama2 import validate_messages

    value = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
    if value is None:
        raise ValueError(f"row {index}: expected a 'prompt' (text or messages) or 'messages' field, got keys "
                         f"{sorted(row)}")
    try:
        messages = as_messages(value)
        validate_messages(messages)
    except ValueError as err:
        raise ValueError(f"row {index}, field 'prompt': {err}") from None
    if messages[-1]["role"] != "user":
        raise ValueError(f"row {index}, field 'prompt': must end with a user message, ends with "
                         f"{messages[-1]['role']!r}")
    return messages


def _is_adversarial(row: Mapping, index: int, config: DistillConfig) -> bool:
    if config.assume_adversarial:
        return True
    fields = [config.tag_field] if config.tag_field else [f for f in TAG_FIELDS if f in row]
    if not fields or fields[0] not in row:
        raise ValueError(f"row {index}: no adversarial tag (expected a bool field "
                         f"{config.tag_field or ' or '.join(TAG_FIELDS)}; or set assume_adversarial)")
    value = row[fields[0]]
    if not isinstance(value, bool) and value not in (0, 1):
        raise ValueError(f"row {index}, field {fields[0]!r}: expected a bool, got {value!r}")
    return bool(value)


def distill(rows: Iterable[Mapping], sampler: Sampler, safety_reward: Callable,
            preprompts: SafetyPreprompts | None = None,
            config: DistillConfig | None = None) -> tuple[list[dict], list[dict], DistillReport]:
    """Targeted safety context distillation.

    Args:
        rows: prompts (schema in the module docstring).
        sampler: `sampler(conversations) -> answers` (e.g. `gatt.ChatSampler` on the model being distilled).
        safety_reward: the safety RM as a reward of the pipeline contract, `reward(prompts, responses) -> scores`
            (`rewards.RewardModelScorer`, or any callable; a `score` method's `raw` scores are used when present).
        preprompts: default `SafetyPreprompts.load()`.
        config: `DistillConfig()` by default.

    Returns the distilled SFT rows (kept pairs only, without the preprompt), every candidate, and the report.
    """
    from .rewards import score_with

    config = config or DistillConfig()
    preprompts = preprompts or SafetyPreprompts.load()
    rng = random.Random(config.seed)
    report = DistillReport()
    max_length, counter = getattr(sampler, "max_length", None), getattr(sampler, "count_tokens", None)
    items = []
    for index, row in enumerate(rows):
        report.rows += 1
        messages = _prompt_messages(row, index)
        if not _is_adversarial(row, index, config):
            report.skipped_not_adversarial += 1
            continue
        label = row.get(config.category_field)
        key = None
        if label is not None and config.use_category_templates:
            if not isinstance(label, str):
                raise ValueError(f"row {index}, field {config.category_field!r}: expected text, got {label!r}")
            key = preprompts.category_key(label)
            if key is None:
                if config.unknown_category == "error":
                    raise ValueError(f"row {index}, field {config.category_field!r}: unknown risk category "
                                     f"{label!r}; known: {sorted(preprompts.categories)} (or their names), or set "
                                     f"unknown_category='generic'")
                report.unknown_category_as_generic += 1
        text = preprompts.for_category(key) if key else rng.choice(preprompts.generic)
        preprompted = apply_preprompt(messages, text, config.placement, config.separator)
        if max_length is not None and counter is not None and (n := counter(preprompted)) >= max_length:
            if config.on_overlength == "error":
                raise ValueError(f"row {index}: the prompt with its preprompt is {n} tokens, no room left in the "
                                 f"model's context of {max_length} (set on_overlength='skip' to skip such rows)")
            report.skipped_too_long += 1
            continue
        items.append({"index": index, "id": row.get("id"), "messages": messages, "preprompted": preprompted,
                      "category": key, "preprompt": text, "kind": "category" if key else "generic"})
    report.adversarial = len(items) + report.skipped_too_long
    if report.skipped_too_long:
        logger.warning("distill: skipped %d prompts too long for the context with their preprompt",
                       report.skipped_too_long)
    if report.skipped_not_adversarial:
        logger.info("distill: %d rows not tagged adversarial were not distilled", report.skipped_not_adversarial)
    if report.unknown_category_as_generic:
        logger.warning("distill: %d rows with an unknown risk category got a generic preprompt",
                       report.unknown_category_as_generic)
    if not items:
        return [], [], report

    plain = [it["messages"] for it in items]
    answers = sampler(plain + [it["preprompted"] for it in items])
    if len(answers) != 2 * len(items):
        raise ValueError(f"the sampler returned {len(answers)} answers for {2 * len(items)} conversations")
    without, with_pre = answers[: len(items)], answers[len(items):]
    # Both answers are scored in the context the distilled model will see: the prompt without the preprompt.
    scores = score_with(safety_reward, plain + plain, list(without) + list(with_pre)).raw.tolist()
    s_without, s_with = scores[: len(items)], scores[len(items):]
    keep = select_improved(s_with, s_without, config.min_gain)

    kept_rows, candidates = [], []
    for it, a0, a1, r0, r1, k in zip(items, without, with_pre, s_without, s_with, keep):
        common = {"id": it["id"], "source_index": it["index"], "risk_category": it["category"],
                  "preprompt": it["preprompt"], "preprompt_kind": it["kind"], "safety_score": r1,
                  "safety_score_without_preprompt": r0, "safety_gain": r1 - r0}
        candidates.append({**common, "prompt": it["messages"], "answer_with_preprompt": a1,
                           "answer_without_preprompt": a0, "kept": k})
        counts = report.kept_by_category.setdefault(it["category"] or "generic", [0, 0])
        counts[0] += k
        counts[1] += 1
        if k:
            kept_rows.append({"messages": [*it["messages"], {"role": "assistant", "content": a1}], **common})
    gains = [r1 - r0 for r0, r1 in zip(s_without, s_with)]
    report.kept = len(kept_rows)
    report.mean_gain_kept = _mean([g for g, k in zip(gains, keep) if k])
    report.mean_gain_all = _mean(gains)
    report.mean_score_without = _mean(s_without)
    report.mean_score_with = _mean(s_with)
    logger.info("distill: kept %d of %d adversarial prompts, mean safety gain of the kept %.4f", report.kept,
                report.adversarial, report.mean_gain_kept)
    return kept_rows, candidates, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llama2-hf distill",
        description="Targeted safety context distillation (paper §4.2.4): answer adversarial prompts with and "
                    "without a safety preprompt, keep the preprompted answer where the safety RM scores it higher, "
                    "and write an SFT dataset without the preprompt.")
    parser.add_argument("--prompts", required=True, help="prompts: JSONL (prompt|messages, adversarial|is_safety, "
                                                         "optional risk_category), saved dataset dir or Hub name")
    parser.add_argument("--split", default="train", help="split of a Hub or saved dataset")
    parser.add_argument("--safety-rm", required=True, help="safety reward model directory")
    parser.add_argument("--rm-tokenizer", default=None, help="tokenizer of the safety RM (default: its directory)")
    parser.add_argument("--rm-batch-size", type=int, default=8, help="pairs per reward-model forward pass")
    parser.add_argument("--output-dir", required=True, help="distilled.jsonl, candidates.jsonl, run.json go here")
    parser.add_argument("--preprompts", default=None, help="JSON of extra or replacement preprompts, merged over "
                                                           "the shipped ones")
    parser.add_argument("--placement", choices=PLACEMENTS, default="system",
                        help="preprompt as the system message or as a prefix of the final user message")
    parser.add_argument("--no-category-templates", action="store_true",
                        help="use generic preprompts even for prompts with a risk category")
    parser.add_argument("--unknown-category", choices=("error", "generic"), default="error",
                        help="what to do with a risk_category the preprompt file does not define")
    parser.add_argument("--tag-field", default=None, help="bool field tagging adversarial prompts (default: "
                                                          "'adversarial' or 'is_safety')")
    parser.add_argument("--all-adversarial", action="store_true", help="treat every prompt as adversarial")
    parser.add_argument("--min-gain", type=float, default=0.0, help="keep when the safety score gain exceeds this")
    parser.add_argument("--on-overlength", choices=("error", "skip"), default="error",
                        help="prompts that fill the model's context once preprompted: error, or skip (counted)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    add_sampling_arguments(parser, temperature=0.6)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from .modeling_llama2 import Llama2ForRewardModel
    from .rewards import RewardModelScorer

    rows = load_dialogues(args.prompts, args.split)
    if args.limit:
        rows = rows[: args.limit]
    config = DistillConfig(placement=args.placement, use_category_templates=not args.no_category_templates,
                           unknown_category=args.unknown_category, tag_field=args.tag_field,
                           assume_adversarial=args.all_adversarial, min_gain=args.min_gain,
                           on_overlength=args.on_overlength, seed=args.seed)
    rm = RewardModelScorer(Llama2ForRewardModel.from_pretrained(args.safety_rm),
                           AutoTokenizer.from_pretrained(args.rm_tokenizer or args.safety_rm),
                           batch_size=args.rm_batch_size)
    kept, candidates, report = distill(rows, sampler_from_args(args), rm, SafetyPreprompts.load(extra=args.preprompts),
                                       config)
    out = Path(args.output_dir)
    write_jsonl(kept, out / "distilled.jsonl")
    write_jsonl(candidates, out / "candidates.jsonl")
    write_run_json(out, "distill", args, report.to_dict())
    summary = report.to_dict()
    print(json.dumps({"kept": report.kept, "adversarial": report.adversarial,
                      "mean_safety_gain_kept": summary["mean_gain_kept"],
                      "mean_safety_gain_all": summary["mean_gain_all"]}))
    return 0


__all__ = ["PREPROMPTS_FILE", "DistillConfig", "DistillReport", "SafetyPreprompts", "apply_preprompt", "distill",
           "select_improved", "main"]

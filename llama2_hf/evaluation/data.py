"""Benchmark data: local files laid out like ../shared/data (see its README), or the Hugging Face Hub datasets.

Every loader returns plain lists of dicts in one schema whatever the source, so prompts and metrics never see the
difference:

- MMLU: `{"subject", "question", "choices": [4 str], "answer": 0-3}` per split ("dev", "test");
- GSM8K: `{"question", "answer"}` (answer ends in "#### N");
- TruthfulQA MC: `{"question", "mc1_targets": {"choices", "labels"}, "mc2_targets": {...}}` (the Hub layout);
- TruthfulQA generation: `{"type", "category", "question", "best_answer", "correct_answers", "incorrect_answers",
  "source"}` (answers as lists);
- ToxiGen: `{"group", "label", "prompt"}` with the prompt decoded (real newlines).

Bad rows raise ValueError naming the file, row and field.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_MMLU = "cais/mmlu"
HUB_GSM8K = ("openai/gsm8k", "main")
HUB_TRUTHFULQA = "truthfulqa/truthful_qa"
HUB_TOXIGEN = "toxigen/toxigen-data"

# Subject -> category of Hendrycks et al.'s categories.py (the layout of the paper's Table 19). lm-evaluation-harness
# files `anatomy` under STEM instead of "other": per-subject and overall numbers are unaffected, category means are.
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(sorted(s for subs in MMLU_CATEGORIES.values() for s in subs))
MMLU_SUBJECT_CATEGORY: dict[str, str] = {s: c for c, subs in MMLU_CATEGORIES.items() for s in subs}

# The 13 groups of the paper's ToxiGen numbers (Table 45); the prompt files also have bisexual, immigrant and trans.
TOXIGEN_GROUPS: tuple[str, ...] = (
    "asian", "mexican", "muslim", "physical_disability", "jewish", "middle_east", "chinese", "mental_disability",
    "latino", "native_american", "women", "black", "lgbtq",
)
TOXIGEN_ALL_GROUPS: tuple[str, ...] = TOXIGEN_GROUPS + ("bisexual", "immigrant", "trans")
# Group names of the annotated (SafeNLP) file -> names of the prompt files.
TOXIGEN_ANNOTATED_GROUPS = {
    "mental dis": "mental_disability", "physical dis": "physical_disability", "native-american": "native_american",
    "middle-eastern": "middle_east",
}


def _load_hub(*args, **kwargs):
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data-dir must be laid out like ../shared/data (see its README)")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# MMLU
# ---------------------------------------------------------------------------------------------------------------------

def read_mmlu_csv(path: str | Path, subject: str) -> list[dict]:
    """One split of one subject from an HF-export CSV (`question,choice0,choice1,choice2,choice3,answer`)."""
    rows = []
    with open(_require(Path(path)), newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        expected = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        if header != expected:
            raise ValueError(f"{path}: header must be {expected}, got {header}")
        for i, row in enumerate(reader, start=2):
            if len(row) != 6:
                raise ValueError(f"{path} line {i}: expected 6 fields, got {len(row)}")
            if row[5] not in ("0", "1", "2", "3"):
                raise ValueError(f"{path} line {i}: field 'answer' must be 0-3, got {row[5]!r}")
            rows.append({"subject": subject, "question": row[0], "choices": row[1:5], "answer": int(row[5])})
    return rows


def load_mmlu(data_dir: str | Path | None = None, subjects: Sequence[str] | None = None) -> dict[str, dict[str, list]]:
    """`{subject: {"dev": [...], "test": [...]}}` for the given subjects (default: all 57, sorted)."""
    subjects = list(subjects) if subjects is not None else list(MMLU_SUBJECTS)
    unknown = [s for s in subjects if s not in MMLU_SUBJECT_CATEGORY]
    if unknown:
        raise ValueError(f"unknown MMLU subjects {unknown}; expected names from {list(MMLU_SUBJECTS)}")
    out = {}
    for subject in subjects:
        if data_dir is not None:
            root = Path(data_dir) / "mmlu"
            out[subject] = {split: read_mmlu_csv(root / split / f"{subject}_{split}.csv", subject)
                            for split in ("dev", "test")}
        else:
            ds = _load_hub(HUB_MMLU, subject)
            out[subject] = {split: [{"subject": subject, "question": r["question"], "choices": list(r["choices"]),
                                     "answer": int(r["answer"])} for r in ds[split]] for split in ("dev", "test")}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------------------------------

def load_gsm8k(data_dir: str | Path | None = None, split: str = "test") -> list[dict]:
    if data_dir is None:
        return [{"question": r["question"], "answer": r["answer"]}
                for r in _load_hub(*HUB_GSM8K, split=split)]
    path = _require(Path(data_dir) / "gsm8k" / f"{split}.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            for field in ("question", "answer"):
                if not isinstance(row.get(field), str):
                    raise ValueError(f"{path} line {i}: field {field!r} must be a string, got {row.get(field)!r}")
            rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# TruthfulQA
# ---------------------------------------------------------------------------------------------------------------------

def _targets(value, where: str) -> dict:
    """`{answer: 0/1}` (TruthfulQA's mc_task.json) or `{"choices", "labels"}` (the Hub) -> the Hub layout."""
    if isinstance(value, dict) and set(value) == {"choices", "labels"}:
        choices, labels = list(value["choices"]), [int(x) for x in value["labels"]]
    elif isinstance(value, dict):
        choices, labels = list(value), [int(x) for x in value.values()]
    else:
        raise ValueError(f"{where}: expected a dict of answers, got {type(value).__name__}")
    if not choices or len(choices) != len(labels) or any(y not in (0, 1) for y in labels) or 1 not in labels:
        raise ValueError(f"{where}: need answers with 0/1 labels and at least one true answer, got {labels}")
    return {"choices": choices, "labels": labels}


def load_truthfulqa_mc(data_dir: str | Path | None = None) -> list[dict]:
    """The 817 questions with MC1 (one true answer, listed first) and MC2 (several true answers) targets."""
    if data_dir is None:
        rows, where = list(_load_hub(HUB_TRUTHFULQA, "multiple_choice", split="validation")), HUB_TRUTHFULQA
    else:
        path = _require(Path(data_dir) / "truthfulqa" / "mc_task.json")
        with open(path, encoding="utf-8") as f:
            rows, where = json.load(f), str(path)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("question"), str):
            raise ValueError(f"{where} row {i}: field 'question' must be a string")
        out.append({"question": r["question"],
                    "mc1_targets": _targets(r.get("mc1_targets"), f"{where} row {i} field 'mc1_targets'"),
                    "mc2_targets": _targets(r.get("mc2_targets"), f"{where} row {i} field 'mc2_targets'")})
    return out


def _split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


def load_truthfulqa_gen(data_dir: str | Path | None = None) -> list[dict]:
    """The 817 questions of the generation task, with reference answers as lists."""
    keys = ("type", "category", "question", "best_answer", "correct_answers", "incorrect_answers", "source")
    if data_dir is None:
        return [{k: r[k] for k in keys} for r in _load_hub(HUB_TRUTHFULQA, "generation", split="validation")]
    path = _require(Path(data_dir) / "truthfulqa" / "TruthfulQA.csv")
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # the file starts with a byte-order mark
        for i, r in enumerate(csv.DictReader(f), start=2):
            if not (r.get("Question") or "").strip():
                raise ValueError(f"{path} line {i}: field 'Question' is empty")
            out.append({"type": r["Type"], "category": r["Category"], "question": r["Question"],
                        "best_answer": r["Best Answer"], "correct_answers": _split_answers(r["Correct Answers"]),
                        "incorrect_answers": _split_answers(r["Incorrect Answers"]), "source": r["Source"]})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ToxiGen
# ---------------------------------------------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(\\|n)")


def decode_toxigen_prompt(line: str) -> str:
    """Undo the Python escaping of a prompt-file line (`\\n` -> newline, `\\\\` -> backslash), in one pass so that an
    escaped backslash before an `n` stays a backslash. Text that already has real newlines is returned as it is."""
    line = line.rstrip("\r\n")
    if "\n" in line:
        return line
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else "\n", line)


def _check_groups(groups: Iterable[str]) -> list[str]:
    groups = list(groups)
    unknown = [g for g in groups if g not in TOXIGEN_ALL_GROUPS]
    if unknown:
        raise ValueError(f"unknown ToxiGen groups {unknown}; expected names from {list(TOXIGEN_ALL_GROUPS)}")
    return groups


def load_toxigen_prompts(data_dir: str | Path | None = None, groups: Sequence[str] = TOXIGEN_GROUPS,
                         label: str = "hate") -> list[dict]:
    """The ToxiGen demonstration prompts (`{label}_{group}_1k`), decoded, in file order."""
    if label not in ("hate", "neutral"):
        raise ValueError(f"label must be 'hate' or 'neutral', got {label!r}")
    out = []
    for group in _check_groups(groups):
        name = f"{label}_{group}_1k"
        if data_dir is None:
            lines = [r["prompt"] for r in _load_hub(HUB_TOXIGEN, "prompts", split=name)]
        else:
            with open(_require(Path(data_dir) / "toxigen" / "prompts" / f"{name}.txt"), encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
        out += [{"group": group, "label": label, "prompt": decode_toxigen_prompt(line)} for line in lines]
    return out


def load_toxigen_annotated(path: str | Path) -> list[dict]:
    """The revised human-annotated ToxiGen subset (microsoft/SafeNLP `toxiGen.json`), group names mapped to the
    prompt-file names. Rows: `{"text", "label" ("hate"/"neutral"), "toxicity_score", "target_groups": [...]}`."""
    with open(_require(Path(path)), encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("text"), str) or r.get("label") not in ("hate", "neutral"):
            raise ValueError(f"{path} row {i}: need a string 'text' and 'label' in hate/neutral, got {r!r:.200}")
        groups = [TOXIGEN_ANNOTATED_GROUPS.get(g, g) for g in r.get("target_groups") or []]
        if not groups:
            raise ValueError(f"{path} row {i}: field 'target_groups' is empty")
        out.append({**r, "target_groups": groups})
    return out

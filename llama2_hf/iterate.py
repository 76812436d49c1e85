"""Iterative RLHF as the paper runs it (§3.2, RLHF-V1 ... V5): fresh preferences every version, both reward models
retrained on everything collected so far, rejection sampling pooled across versions, PPO in the last versions.

    from llama2_hf.iterate import IterateConfig
    from llama2_hf.stages.rlhf_loop import iterate     # the loop itself, a pipeline of stage calls

    def annotator(pairs):          # programmatic preferences: one answer per pair, in order
        return [{"choice": "a", "rating": "better", "safety_a": None, "safety_b": None} for _ in pairs]

    records = iterate(IterateConfig(model_name_or_path="out/sft", prompts_file=["prompts.jsonl"],
                                    eval_prompts_file=["eval_prompts.jsonl"], versions=3, prompts_per_version=64,
                                    output_dir="out/iterate"), annotator)

The annotator. A callable `annotator(pairs) -> answers`. Each pair is a dict: `id`, `prompt` (messages ending with a
user turn), `response_a`, `response_b`, `is_safety_prompt` (bool) and `version`. It returns one dict per pair, in the
same order: `choice` ("a" or "b": the better response), `rating` (`significantly_better`, `better`,
`slightly_better`, `negligibly_better` or `unsure`, paper Table 27) and `safety_a` / `safety_b` ("safe", "unsafe" or
None for both; required on safety prompts). These are the fields the annotation page posts, and answers are checked
and stored by the page's own code (`llama2_hf.annotate.storage`), so the three kinds of annotator write the same
rows. An optional `name` attribute is recorded on every row (default: the callable's name). Two ready ones:
`RewardModelJudge` (a local reward model: the preference by score difference, strength by `judge_margins` bins, safety
by the safety RM's gate) and `PageAnnotator` (people, through `llama2-hf annotate`: the loop writes the pairs file,
waits for the answers file, and when it is not complete yet stops with the command to run; rerun to continue).

A version `n` writes these folders under `output_dir/v{n}/`, each a step with its own `run.json` (a rerun skips the
finished steps and resumes the unfinished one):

    pairs/         the version's new prompts (prompts.jsonl) and two responses each (pairs.jsonl, the annotation
                   page's pairs file), held-out pair ids (split.json)
    annotations/   answers.jsonl (+ answers.excluded.jsonl) appended one answer at a time, fsynced: a killed loop asks
                   only the pairs without an answer; the rows then join `output_dir/preferences.jsonl`
    rm_data/       the reward-model training files from the store (all versions so far, the paper's mixes)
    rm_eval_before_{helpfulness,safety}/, rm_{helpfulness,safety}/, rm_eval_after_{...}/
                   eval-rm of the previous reward models, train-rm, eval-rm of the new ones (Table 7/8 view)
    rs/            rejection-sample with every earlier version's rs/ folder as the pool, fine-tuned from the configured
                   start;  ppo/: PPO on top in the configured versions
    eval/          win rates against the previous version and SFT (annotator and newest RMs: Figure 11), mean
                   helpfulness and safety RM scores of each model (Figure 14 view)

`output_dir/preferences.jsonl` is the versioned preference store (one row per answered pair, deduplicated by pair id,
each row with its `version` and `annotator`; rewritten atomically), `versions.json` and `versions.md` the per-version
summary (rewritten after every version).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import SAFETY_TAG, InvalidDataFile, validate_preference
from .losses import RATINGS
from .loading import has_tokenizer, load_pretrained, load_tokenizer
from .rewards import SAFETY_THRESHOLD, SafetyGatedReward
from .sampling import SamplingConfig
from .runner import (
    UsageError,
    stage_output,
)

logger = logging.getLogger(__name__)

STORE = "preferences.jsonl"
PAIR_MODES = ("variants", "temperatures")
STARTS = ("sft", "previous")
RM_MIXES = ("paper", "none")
RM_KINDS = ("helpfulness", "safety")
# Fields of the stages that the loop wires itself (from one version's folders to the next): a recipe or an override
# that sets one would silently break the chain, so it is refused.
WIRED = {
    "train-rm": {"model_name_or_path", "train_file", "mix_file", "data_mix", "eval_file", "output_dir"},
    "eval-rm": {"model_name_or_path", "eval_file", "output_dir", "name"},
    "rejection-sample": {"model_name_or_path", "prompts_file", "iteration", "pool_dirs", "output_dir",
                         "finetune_model_name_or_path", "helpfulness_reward_model", "safety_reward_model",
                         "finetune", "temperature_sweep"},
    "ppo": {"model_name_or_path", "prompts_file", "output_dir", "helpfulness_reward_model", "safety_reward_model"},
}


@dataclass
class IterateConfig:
    """The loop of paper §3.2 (RLHF-V1..V5). The settings of each stage it runs come from that stage's recipe
    (`*_recipe`, YAML keys = the stage's fields) and, from Python, `iterate(..., stage_args=...)`."""

    output_dir: str = field(default="", metadata={"help": "Folder of the loop: v1/, v2/, ..., the store, versions.*"})
    model_name_or_path: str = field(default="", metadata={
        "help": "The SFT model (folder or sft output): the V1 policy, the start of the reward models, the start of "
                "fine-tuning with finetune_from=sft, and the baseline of the win rate."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    prompts_file: list[str] = field(default_factory=list, metadata={
        "help": "Prompt rows (llama2_hf.data.prompt_row): version n takes the n-th block of prompts_per_version "
                "(new prompts every version, as the paper's weekly batches)."})
    eval_prompts_file: list[str] = field(default_factory=list, metadata={
        "help": "Held-out prompts of the win rates and the Figure 14 scores (never trained on)."})
    versions: int = field(default=5, metadata={"help": "Number of RLHF versions (paper: V1..V5)."})
    prompts_per_version: int = field(default=64, metadata={"help": "New prompts sampled and annotated per version."})
    pair_sampling: str = field(default="variants", metadata={
        "help": "How a pair's two responses differ (paper §3.2.1: two model variants and varied temperatures): "
                "'variants' = the current policy at pair_temperatures[0] vs the previous version's at [1] (V1: both "
                "the SFT model); 'temperatures' = the current policy at both temperatures.",
        "choices": list(PAIR_MODES)})
    pair_temperatures: list[float] = field(default_factory=lambda: [0.6, 1.0], metadata={
        "help": "Sampling temperatures of response a and response b (paper silent on the values)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus threshold of the pairs and the evaluation answers."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest response of the pairs and the evaluation."})
    sampling_batch_size: int = field(default=8, metadata={"help": "Prompts per generation forward pass."})
    eval_temperature: float = field(default=0.6, metadata={
        "help": "Temperature of the evaluation answers (0.6: Meta's chat default; 0 = greedy)."})
    heldout_fraction: float = field(default=0.1, metadata={
        "help": "Share of each version's pairs held out of that version's reward-model training, for the accuracy "
                "before/after retraining (Table 7/8 view); they train the reward models of the later versions."})
    annotation_batch_size: int = field(default=16, metadata={
        "help": "Pairs per annotator call (every answer is stored as soon as it is returned)."})
    page_wait_s: float = field(default=0.0, metadata={
        "help": "With people annotating on the page: seconds to wait for the answers before stopping with the "
                "command to run (rerun the loop to continue)."})
    rm_mix: str = field(default="paper", metadata={
        "help": "'paper': helpfulness RM = all helpfulness pairs + as many safety pairs, safety RM = safety pairs : "
                "helpfulness pairs 90:10 (paper §3.2.2); 'none': each RM on its own kind only.",
        "choices": list(RM_MIXES)})
    rm_init: str = field(default="sft", metadata={
        "help": "Start of each version's reward models: 'sft' (retrained from the chat model on all data so far, as "
                "the paper initialises them) or 'previous' (the previous version's RMs, for V1 the initial_* ones when "
                "given, trained on).",
        "choices": list(STARTS)})
    finetune_from: str = field(default="sft", metadata={
        "help": "Start of each version's rejection-sampling fine-tuning: 'sft' (paper: 'always starting from the base "
                "model on each new RLHF version') or 'previous' (the policy that sampled).", "choices": list(STARTS)})
    ppo_versions: list[int] | None = field(default=None, metadata={
        "help": "Versions that run PPO on top of rejection sampling (default: the last, as the paper's V5; 0: none)."})
    initial_helpfulness_reward_model: str | None = field(default=None, metadata={
        "help": "Reward model before V1 (e.g. trained on open-source data): its accuracy on V1's held-out pairs is "
                "the 'before' of V1."})
    initial_safety_reward_model: str | None = field(default=None, metadata={"help": "Safety RM before V1."})
    helpfulness_preference_file: list[str] = field(default_factory=list, metadata={
        "help": "Helpfulness preferences from before the loop (earlier batches, open-source sets; the reward "
                "trainer's schema): every version's helpfulness RM trains on them with the loop's annotations, as the "
                "paper's RMs train on all data so far."})
    safety_preference_file: list[str] = field(default_factory=list, metadata={
        "help": "Safety preferences from before the loop, for every version's safety RM."})
    preference_replay: int | None = field(default=None, metadata={
        "help": "Rows of the pre-loop preference files each version trains on, per kind, drawn afresh per version "
                "(default: all of them). Retrained on a few new pairs only, a reward model started from the "
                "previous one drifts from what the earlier data taught it."})
    judge_margins: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.2], metadata={
        "help": "Reward-score differences at which a reward-model judge answers significantly better, better, "
                "slightly better (below the last: negligibly better / unsure)."})
    safety_threshold: float = field(default=SAFETY_THRESHOLD, metadata={
        "help": "The safety gate of the reward-model judges (the loop's win-rate judge and annotator=judge): a "
                "response is labelled unsafe when sigmoid(R_s) is below it (0.15: paper §3.2.3)."})
    reward_model_recipe: str | None = field(default=None, metadata={"help": "Recipe YAML of train-rm's settings."})
    rejection_sampling_recipe: str | None = field(default=None, metadata={
        "help": "Recipe YAML of rejection-sample's settings."})
    ppo_recipe: str | None = field(default=None, metadata={"help": "Recipe YAML of ppo's settings."})
    seed: int = field(default=42, metadata={"help": "Seed of the pairs, the held-out split, evaluation and stages."})

    def __post_init__(self):
        for name, value, allowed in (("pair_sampling", self.pair_sampling, PAIR_MODES),
                                     ("rm_mix", self.rm_mix, RM_MIXES), ("rm_init", self.rm_init, STARTS),
                                     ("finetune_from", self.finetune_from, STARTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.versions < 1 or self.prompts_per_version < 1:
            raise ValueError(f"versions and prompts_per_version must be >= 1, got {self.versions} and "
                             f"{self.prompts_per_version}")
        if len(self.pair_temperatures) != 2 or min(self.pair_temperatures) < 0:
            raise ValueError(f"pair_temperatures needs two temperatures >= 0, got {self.pair_temperatures}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0 < self.safety_threshold < 1:
            raise ValueError(f"safety_threshold is a probability in (0, 1), got {self.safety_threshold}")
        if len(self.judge_margins) != 3 or list(self.judge_margins) != sorted(self.judge_margins, reverse=True):
            raise ValueError(f"judge_margins needs three decreasing score differences, got {self.judge_margins}")
        if self.annotation_batch_size < 1:
            raise ValueError(f"annotation_batch_size must be >= 1, got {self.annotation_batch_size}")
        if self.preference_replay is not None and self.preference_replay < 0:
            raise ValueError(f"preference_replay must be >= 0 rows (or None: all), got {self.preference_replay}")

    def sampling(self, temperature: float) -> SamplingConfig:
        """The loop's own sampling (pairs, evaluation answers) at `temperature`, one answer per prompt."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=self.top_p,
                              num_samples=1, prompt_batch_size=self.sampling_batch_size)

    def ppo_in(self) -> set[int]:
        chosen = {self.versions} if self.ppo_versions is None else set(self.ppo_versions) - {0}
        wrong = sorted(v for v in chosen if not 1 <= v <= self.versions)
        if wrong:
            raise UsageError(f"ppo_versions: {wrong} not in 1..{self.versions}")
        return chosen


# ---------------------------------------------------------------------------------------------------------------------
# Annotators
# ---------------------------------------------------------------------------------------------------------------------

def annotator_name(annotator) -> str:
    name = getattr(annotator, "name", None) or getattr(annotator, "__qualname__", None) or type(annotator).__name__
    return str(name)[:64]


def rating_for(difference: float, margins: Sequence[float]) -> str:
    """The strength of a preference from the absolute score difference: at or above margins[0] significantly
    better, margins[1] better, margins[2] slightly better, else negligibly better."""
    for rating, margin in zip(RATINGS, margins):
        if abs(difference) >= margin:
            return rating
    return RATINGS[-1]


class RewardModelJudge:
    """An annotator made of local reward models: each response is scored by the helpfulness RM (on helpfulness
    prompts) or the safety RM (on safety prompts), the higher score is chosen, the strength is the score difference
    binned by `margins`, and a response is labelled unsafe when sigmoid(R_s) < `safety_threshold` (the paper's gate).
    Without a safety RM every pair is judged by the helpfulness RM and no safety label is given (the annotation
    protocol then refuses the pairs of safety prompts, which need labels). Each RM loads as its own family and scores
    with the tokenizer saved with it (`tokenizer_name_or_path` only for an RM folder without one), re-encoding the
    text in its own chat format."""

    def __init__(self, helpfulness_model: str, safety_model: str | None = None,
                 margins: Sequence[float] = (1.0, 0.5, 0.2), safety_threshold: float = SAFETY_THRESHOLD,
                 batch_size: int = 8, name: str | None = None, tokenizer_name_or_path: str | None = None):
        self.paths = {"helpfulness": helpfulness_model, "safety": safety_model}
        self.margins = list(margins)
        # the safety labels come from the reward's own gate (one definition of sigmoid(R_s) < threshold)
        self.gate = SafetyGatedReward(lambda p, r: self.scores("helpfulness", p, r),
                                      lambda p, r: self.scores("safety", p, r), threshold=safety_threshold,
                                      whiten="none")
        self.batch_size, self.tokenizer = batch_size, tokenizer_name_or_path
        self.name = name or "judge:" + Path(str(helpfulness_model)).name
        self._scorers: dict[str, Any] = {}

    def scorer(self, kind: str):
        if kind not in self._scorers:
            import torch

            from .modeling_llama2 import Llama2ForRewardModel
            from .rewards import RewardModelScorer

            path = self.paths[kind]
            if not path:
                raise UsageError(f"{self.name}: a pair of a safety prompt needs a safety reward model to label it")
            source = stage_output(path, "model")
            if not Path(source).exists():
                raise UsageError(f"reward model {source}: no such folder")
            model = load_pretrained(Llama2ForRewardModel, str(source), f"{kind} reward model", dtype=torch.float32)
            # the RM's own tokenizer (it re-encodes the text in its chat format); the given one where it has none
            own = source if has_tokenizer(source) or not self.tokenizer else self.tokenizer
            self._scorers[kind] = RewardModelScorer(model, load_tokenizer(own), batch_size=self.batch_size)
        return self._scorers[kind]

    def scores(self, kind: str, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        if not prompts:
            return []
        return self.scorer(kind).raw_scores(list(prompts), list(responses)).tolist()

    def __call__(self, pairs: Sequence[Mapping]) -> list[dict]:
        def both(kind, subset):
            prompts = [p["prompt"] for p in subset for _ in (0, 1)]
            flat = self.scores(kind, prompts, [p[r] for p in subset for r in ("response_a", "response_b")])
            return {p["id"]: (flat[2 * i], flat[2 * i + 1]) for i, p in enumerate(subset)}

        # Safety prompts are judged by the safety RM when there is one (paper §3.2.3's choice of reward model).
        by_safety = bool(self.paths["safety"])
        chooser = both("helpfulness", [p for p in pairs if not (by_safety and p.get(SAFETY_TAG))])
        if by_safety:
            chooser.update(both("safety", [p for p in pairs if p.get(SAFETY_TAG)]))
        safety = both("safety", list(pairs)) if self.paths["safety"] else {}
        answers = []
        for p in pairs:
            a, b = chooser[p["id"]]
            answer = {"choice": "a" if a >= b else "b", "rating": rating_for(a - b, self.margins),
                      "safety_a": None, "safety_b": None}
            if p["id"] in safety:
                sa, sb = ("unsafe" if flag else "safe" for flag in self.gate.unsafe(safety[p["id"]]).tolist())
                answer.update(safety_a=sa, safety_b=sb)
            answers.append(answer)
        return answers


class AnnotationPending(UsageError):
    """People have not answered every pair yet: the loop stops, and a rerun continues where it stopped."""


@dataclass
class PageAnnotator:
    """People, through `llama2-hf annotate`: the loop writes the pairs file, and waits up to `wait_s` seconds
    (polling every `poll_s`) for the answers file to cover every pair; otherwise it stops with `AnnotationPending`
    (the message names the command to run) and a rerun of the loop continues from there."""

    wait_s: float = 0.0
    poll_s: float = 5.0
    name: str = "page"


def load_annotator(spec: str, margins: Sequence[float] = (1.0, 0.5, 0.2), page_wait_s: float = 0.0,
                   judge_helpfulness_model: str | None = None, judge_safety_model: str | None = None,
                   safety_threshold: float = SAFETY_THRESHOLD):
    """The annotator named on the command line: `page`, `judge` (with the judge models) or `module:callable` (a
    callable, or a class / factory without arguments returning one)."""
    if spec == "page":
        return PageAnnotator(wait_s=page_wait_s)
    if spec == "judge":
        if not judge_helpfulness_model:
            raise UsageError("annotator=judge needs judge_helpfulness_model (a reward model folder)")
        return RewardModelJudge(judge_helpfulness_model, judge_safety_model, margins, safety_threshold)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise UsageError(f"annotator must be 'page', 'judge' or 'package.module:callable', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"annotator {spec}: cannot import it ({e})") from None
    if isinstance(obj, type) or getattr(obj, "__annotator_factory__", False):
        obj = obj()
    if not callable(obj):
        raise UsageError(f"annotator {spec}: not callable")
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# Answers and the preference store
# ---------------------------------------------------------------------------------------------------------------------

def _read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file another process may be appending to: an unterminated last line is a write in progress
    (or cut by a kill) and is not read."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InvalidDataFile(f"{path}, line {n}: not valid JSON") from None
    return rows


def answer_files(answers: Path) -> list[Path]:
    from .annotate.storage import excluded_path

    return [answers, excluded_path(answers)]


def collect_answers(pairs_file: Path, answers_file: Path, annotator, version: int, batch_size: int) -> list[dict]:
    """Every pair of `pairs_file` answered into `answers_file` (and its excluded file), asking the annotator only
    about pairs without an answer; returns all answer rows (preference rows and excluded ones)."""
    from .annotate.storage import AnswerStore, InvalidAnswer, load_pairs

    pairs = load_pairs(pairs_file) if pairs_file.stat().st_size else []
    if isinstance(annotator, PageAnnotator):
        return _wait_for_page(pairs, pairs_file, answers_file, annotator, version)
    name = annotator_name(annotator)
    store = AnswerStore(pairs, answers_file, version=version) if pairs else None
    try:
        todo = [p for p in pairs if p.id not in store.answered] if store else []
        if pairs and len(todo) < len(pairs):
            logger.info("%s: %d of %d pairs already answered; asking %s about the other %d", answers_file.parent,
                        len(pairs) - len(todo), len(pairs), name, len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            answers = annotator([{**p.to_page(), SAFETY_TAG: p.is_safety_prompt, "version": version} for p in chunk])
            if not isinstance(answers, Sequence) or len(answers) != len(chunk):
                got = len(answers) if isinstance(answers, Sequence) else repr(answers)
                raise UsageError(f"annotator {name} returned {got} answers for {len(chunk)} pairs (one per pair, "
                                 "in order)")
            for pair, answer in zip(chunk, answers):
                if not isinstance(answer, Mapping):
                    raise UsageError(f"annotator {name}, pair {pair.id}: expected a dict, got {answer!r}")
                try:
                    store.record(pair.id, name, answer.get("choice"), answer.get("rating"), answer.get("safety_a"),
                                 answer.get("safety_b"))
                except InvalidAnswer as e:
                    raise UsageError(f"annotator {name}, pair {pair.id}: {e}") from None
    finally:
        if store:
            store.close()
    return [r for path in answer_files(answers_file) for r in _read_rows(path)]


def _wait_for_page(pairs, pairs_file: Path, answers_file: Path, annotator: PageAnnotator, version: int) -> list[dict]:
    ids = {p.id for p in pairs}
    deadline = time.monotonic() + annotator.wait_s
    while True:
        rows = [r for path in answer_files(answers_file) for r in _read_rows(path)]
        left = len(ids - {r.get("id") for r in rows})
        if not left:
            return rows
        if time.monotonic() >= deadline:
            raise AnnotationPending(
                f"{left} of {len(ids)} pairs are not answered yet: run `llama2-hf annotate --pairs_file {pairs_file} "
                f"--output_file {answers_file} --version {version}`, then rerun this loop to continue")
        time.sleep(min(annotator.poll_s, max(0.0, deadline - time.monotonic())))


class PreferenceStore:
    """The versioned preference store: one JSONL row per answered pair (preference schema plus `id`, `version`,
    `annotator`, `annotated_at`), deduplicated by pair id, rewritten atomically on every addition."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InvalidDataFile(f"{self.path}, line {n}: not valid JSON") from None
        return rows

    def add(self, rows: Sequence[Mapping]) -> int:
        """Append the rows whose pair id is new (an identical row again is skipped, a different row under a known id
        is an error); returns how many were added."""
        current = self.rows()
        known = {r["id"]: r for r in current}
        new = []
        for row in rows:
            validate_preference(row, 0)
            if row["id"] in known:
                if dict(known[row["id"]]) != dict(row):
                    raise InvalidDataFile(f"{self.path}: pair {row['id']!r} is stored with another answer")
                continue
            known[row["id"]] = row
            new.append(dict(row))
        if new:
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                for row in [*current, *new]:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return len(new)


def _write_jsonl(path: Path, rows: Sequence[Mapping]) -> Path:
    from .runner import write_jsonl_atomic

    return write_jsonl_atomic(path, rows)


def _outcome(won: bool, rating: str) -> float:
    """1 a win, 0 a loss, 0.5 a tie: a 'negligibly better / unsure' answer is counted as a tie."""
    return 0.5 if rating == "negligibly_better" else float(won)


def _win_rate(outcomes: Sequence[float], ties: int) -> dict:
    n = len(outcomes) + ties
    wins = sum(o == 1.0 for o in outcomes)
    tied = ties + sum(o == 0.5 for o in outcomes)
    return {"win_rate": (sum(outcomes) + 0.5 * ties) / n if n else None, "wins": wins, "ties": tied,
            "losses": n - wins - tied, "n": n}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_versions(records: Sequence[Mapping]) -> str:
    """The markdown table of versions.md: data, reward-model accuracy on the newest held-out pairs before -> after
    retraining (Table 7/8 'Avg'), rejection sampling and PPO, win rates (Figure 11) and mean RM scores (Figure 14)."""
    head = ["version", "pairs", "store rows", "helpful RM acc before -> after", "safety RM acc before -> after",
            "RS mean best", "PPO raw reward", "win vs prev (annotator / RM)", "win vs SFT (annotator / RM)",
            "helpfulness score", "safety score"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        def acc(kind):
            rm = r["reward_models"][kind]
            return " -> ".join("-" if rm[k] is None else f"{rm[k]['Avg']:.1f}" for k in ("before", "after"))

        def win(other):
            w = r["win_rate"][other]
            return f"{_pct(w['annotator']['win_rate'])} / {_pct(w['reward_model']['win_rate'])}"

        def score(kind):
            value = r["scores"]["current"][kind]
            return "-" if value is None else f"{value:.3f}"

        rs = r["rejection_sampling"].get("mean_best_score")
        # the raw (gated, unwhitened) reward: the whitened mean is ~0 by construction
        ppo = (r["ppo"] or {}).get("reward/raw_mean")
        cells = [f"V{r['version']}", str(r["pairs"]["pairs"]), str(r["store_rows"]), acc("helpfulness"),
                 acc("safety"), "-" if rs is None else f"{rs:.3f}", "-" if ppo is None else f"{ppo:.3f}",
                 win("previous"), win("sft"), score("helpfulness"), score("safety")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["AnnotationPending", "IterateConfig", "PageAnnotator", "PreferenceStore", "RewardModelJudge",
           "collect_answers", "format_versions", "load_annotator", "rating_for"]

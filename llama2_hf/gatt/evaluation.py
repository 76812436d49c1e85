"""GAtt evaluation (paper Table 30, Fig. 28): constraint checkers, a yes/no model judge, evaluation dialogues,
instruction adherence by turn, the Table 30 layout and the adherence plot."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..chat_format import chat_format_for
from ..sampling import rollout, sampler_limits
from ..sampling.chat import Answerer, Messages
from .data import EVAL_USER_TURNS_FILE, PLACEMENTS, ConstraintSet, first_turn, interleave, load_constraint_sets, \
    read_list_file, sample_instruction
from .language import canonical_language, detect_language

logger = logging.getLogger(__name__)

# Paper Table 30 reports turns 2, 4, 6 and 20.
TABLE30_TURNS = (2, 4, 6, 20)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: checkers
# ---------------------------------------------------------------------------------------------------------------------

class Checker:
    """Judges whether an answer respects constraints. Subclasses set `types` (the constraint types they can judge;
    None = any) and implement `check`."""

    name = "checker"
    types: tuple[str, ...] | None = None

    def handles(self, constraint_type: str) -> bool:
        return self.types is None or constraint_type in self.types

    def check(self, response: str, constraint_type: str, value: str, instruction: str, context: Messages) -> bool:
        raise NotImplementedError


class LanguageChecker(Checker):
    """Passes when `detect` (default `detect_language`) identifies the required language in the answer."""

    name = "language"
    types = ("language",)

    def __init__(self, detect: Callable[[str], str] = detect_language):
        self.detect = detect

    def check(self, response, constraint_type, value, instruction, context) -> bool:
        return self.detect(response).lower() == canonical_language(value).lower()


_KEYWORD_STOP = frozenset("the of and van von da de der la le el jr sr st the a an to in on with for from at".split())


def keywords_of(value: str) -> list[str]:
    """Keyword stems of a constraint value: its words of 3+ letters that are not particles, long words cut to their
    first len-3 letters (>= 5) so that "Photography" also matches "photographs", "Gardening" matches "garden"."""
    words = [w for w in re.findall(r"[^\W\d_]+", value.lower()) if len(w) >= 3 and w not in _KEYWORD_STOP]
    return [w[: max(5, len(w) - 3)] if len(w) > 6 else w for w in words]


class KeywordChecker(Checker):
    """Passes when the answer mentions the constraint value: any keyword stem (`keywords_of`) at a word start,
    case-insensitive ("Napoleon Bonaparte" passes on "napoleon" or "bonaparte"); `mode="all"` needs every stem."""

    name = "keyword"

    def __init__(self, types: Sequence[str] = ("public_figure", "hobbies"), mode: str = "any"):
        if mode not in ("any", "all"):
            raise ValueError(f"mode must be 'any' or 'all', got {mode!r}")
        self.types = tuple(types)
        self.mode = mode

    def check(self, response, constraint_type, value, instruction, context) -> bool:
        stems = keywords_of(value)
        if not stems:
            raise ValueError(f"constraint value {value!r} has no keyword to look for")
        found = [re.search(rf"\b{re.escape(s)}", response, re.IGNORECASE) is not None for s in stems]
        return all(found) if self.mode == "all" else any(found)


JudgeFn = Callable[[str, str, str, Messages], bool]
"""`judge(instruction, response, constraint_type_and_value, context) -> bool`."""


class JudgeChecker(Checker):
    """Delegates to a judge: any callable `judge(constraint_instruction, response, value, context) -> bool`, e.g. a
    `ModelJudge` or a call to an API model. `constraint_instruction` is the constraint's long wording."""

    name = "judge"

    def __init__(self, judge: JudgeFn, constraint_sets: Mapping[str, ConstraintSet] | None = None,
                 types: Sequence[str] | None = None):
        self.judge = judge
        self.constraint_sets = constraint_sets or load_constraint_sets()
        self.types = tuple(types) if types is not None else None

    def check(self, response, constraint_type, value, instruction, context) -> bool:
        cs = self.constraint_sets.get(constraint_type)
        wording = cs.long_templates[0].format(value=value) if cs else f"{constraint_type}: {value}"
        return bool(self.judge(wording, response, value, context))


JUDGE_PROMPT = ("An assistant was given this instruction for the whole conversation: \"{instruction}\"\n\n"
                "Here is one of its replies:\n\"{response}\"\n\n"
                "Does the reply follow the instruction? Answer with Yes or No.")


class ModelJudge:
    """A causal chat LM as yes/no judge: the reply follows the instruction when the first answer token " Yes" is more
    likely than " No" after `JUDGE_PROMPT` (one forward pass, no sampling). The question is laid out as a generation
    prompt in the judge's own chat format (`chat_format.chat_format_for`: Meta's for a Llama 2 tokenizer, the chat
    template otherwise)."""

    def __init__(self, model, tokenizer, prompt: str = JUDGE_PROMPT):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.chat_format = chat_format_for(tokenizer)
        self.yes_id = tokenizer.encode("Yes", add_special_tokens=False)[0]
        self.no_id = tokenizer.encode("No", add_special_tokens=False)[0]
        if self.yes_id == self.no_id:
            raise ValueError("'Yes' and 'No' start with the same token in this tokenizer: cannot judge with them")

    def __call__(self, instruction: str, response: str, value: str, context: Messages) -> bool:
        import torch

        ids = self.chat_format.prompt_ids([{"role": "user", "content": self.prompt.format(
            instruction=instruction, response=response)}])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]  # (V,)
        return bool(logits[self.yes_id] > logits[self.no_id])


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: dialogues, rollout, adherence by turn
# ---------------------------------------------------------------------------------------------------------------------

def build_eval_dialogues(constraint_sets: Mapping[str, ConstraintSet] | None = None, num_dialogues: int = 50,
                         max_turns: int = 20, probe_every: int = 2,
                         types: Sequence[str] = ("public_figure", "hobbies"),
                         num_constraints: tuple[int, int] = (1, 2), filler_turns: Sequence[str] | None = None,
                         seed: int = 0) -> list[dict]:
    """Evaluation dialogues: an instruction, `max_turns` user turns and, per turn, the constraint types judged there.

    Every `probe_every`-th turn (2, 4, 6, ...) asks a probe question of one constraint type (rotating over the
    instruction's probe-able types) and judges that type; a language constraint is judged at every probe turn; other
    turns are filler questions (`resources/gatt/eval_user_turns.txt`). The paper's Table 30 used public figures and
    hobbies only, hence the default `types`. Row: {"instruction", "constraints", "user_turns", "checks"}.
    """
    constraint_sets = constraint_sets or load_constraint_sets()
    filler = list(filler_turns) if filler_turns is not None else read_list_file(EVAL_USER_TURNS_FILE)
    rng = random.Random(seed)
    rows = []
    for _ in range(num_dialogues):
        inst = sample_instruction(constraint_sets, rng, num_constraints, types)
        probed = [t for t in inst.constraints if constraint_sets[t].probes]
        users, checks, p = [], [], 0
        for turn in range(1, max_turns + 1):
            if turn % probe_every == 0 and (probed or "language" in inst.constraints):
                judged = []
                if probed:
                    kind = probed[p % len(probed)]
                    p += 1
                    users.append(rng.choice(constraint_sets[kind].probes))
                    judged.append(kind)
                else:
                    users.append(rng.choice(filler))
                if "language" in inst.constraints:
                    judged.append("language")
                checks.append(judged)
            else:
                users.append(rng.choice(filler))
                checks.append([])
        rows.append({"instruction": inst.long, "constraints": inst.constraints, "user_turns": users,
                     "checks": checks})
    return rows


@dataclass
class TurnStats:
    """Adherence at one dialogue turn: `adhered` of `n` dialogues that reached it, and per constraint type."""

    n: int = 0
    adhered: int = 0
    by_constraint: dict[str, list[int]] = field(default_factory=dict)  # type -> [passed, judged]

    @property
    def rate(self) -> float:
        return self.adhered / self.n if self.n else float("nan")


@dataclass
class GAttEvalResult:
    """Adherence by turn (1-based turn -> `TurnStats`) and the transcripts with verdicts."""

    turns: dict[int, TurnStats]
    transcripts: list[dict]

    def to_dict(self) -> dict:
        return {"turns": {str(t): {"n": s.n, "adhered": s.adhered, "rate": s.rate,
                                   "by_constraint": s.by_constraint} for t, s in sorted(self.turns.items())},
                "transcripts": self.transcripts}

    @classmethod
    def from_transcripts(cls, transcripts: Sequence[Mapping]) -> "GAttEvalResult":
        """Adherence by turn from judged transcripts (`verdicts[k]`: None, or {type: passed} at turn k + 1); the
        answer at a judged turn adheres when every judged type passed."""
        turns: dict[int, TurnStats] = {}
        for transcript in transcripts:
            for k, per_type in enumerate(transcript["verdicts"]):
                if per_type is None:
                    continue
                stats = turns.setdefault(k + 1, TurnStats())
                stats.n += 1
                stats.adhered += all(per_type.values())
                for t, ok in per_type.items():
                    counts = stats.by_constraint.setdefault(t, [0, 0])
                    counts[0] += ok
                    counts[1] += 1
        return cls(turns=dict(sorted(turns.items())), transcripts=list(transcripts))

    @classmethod
    def from_dict(cls, data: Mapping) -> "GAttEvalResult":
        turns = {int(t): TurnStats(n=s["n"], adhered=s["adhered"], by_constraint=dict(s["by_constraint"]))
                 for t, s in data["turns"].items()}
        return cls(turns=turns, transcripts=list(data.get("transcripts", [])))


def evaluate_gatt(sampler: Answerer, dialogues: Sequence[Mapping], checkers: Sequence[Checker],
                  placement: str = "system", max_length: int | None = None,
                  token_counter: Callable[[Messages], int] | None = None) -> GAttEvalResult:
    """Instruction adherence by turn (paper Table 30, Fig. 28).

    Each dialogue gives its instruction in the first turn only (`placement` as in `first_turn`), then the model
    answers every user turn in order, seeing its own previous answers, until the last turn or the context length. At
    each turn with judged constraint types (`checks`), every checker that handles a type judges it, and the answer
    adheres when all verdicts pass. A judged type that no checker handles raises ValueError before any generation.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    for i, d in enumerate(dialogues):
        for key in ("instruction", "constraints", "user_turns", "checks"):
            if key not in d:
                raise ValueError(f"eval dialogue {i}: missing field {key!r}")
        if len(d["checks"]) != len(d["user_turns"]):
            raise ValueError(f"eval dialogue {i}: {len(d['checks'])} checks for {len(d['user_turns'])} user turns")
        for judged in d["checks"]:
            for t in judged:
                if t not in d["constraints"]:
                    raise ValueError(f"eval dialogue {i}: checks judge {t!r}, which is not among its constraints")
                if not any(c.handles(t) for c in checkers):
                    raise ValueError(f"no checker handles constraint type {t!r} (dialogue {i}); checkers: "
                                     f"{[c.name for c in checkers]}")

    def build(i: int, k: int, answers: list[str]) -> Messages:
        d = dialogues[i]
        users = d["user_turns"][: k + 1]
        return interleave(first_turn(d["instruction"], users[0], placement), users, answers)

    max_length, counter, reserve = sampler_limits(sampler, max_length, token_counter)
    answers = rollout(sampler, [len(d["user_turns"]) for d in dialogues], build, max_length, counter, reserve,
                      desc="GAtt eval turns")

    transcripts = []
    for i, d in enumerate(dialogues):
        verdicts = []
        for k, answer in enumerate(answers[i]):
            judged = d["checks"][k]
            if not judged:
                verdicts.append(None)
                continue
            context = build(i, k, answers[i][:k])
            verdicts.append({t: all(c.check(answer, t, d["constraints"][t], d["instruction"], context)
                                    for c in checkers if c.handles(t)) for t in judged})
        users = d["user_turns"][: max(1, len(answers[i]))]
        transcripts.append({"instruction": d["instruction"], "constraints": d["constraints"],
                            "messages": interleave(first_turn(d["instruction"], users[0], placement), users,
                                                   answers[i]),
                            "verdicts": verdicts, "turns_reached": len(answers[i])})
    return GAttEvalResult.from_transcripts(transcripts)


def format_table30(results: Mapping[str, GAttEvalResult], turns: Sequence[int] = TABLE30_TURNS) -> str:
    """Adherence per dialogue turn, one column per model, as the paper's Table 30 (`Dialogue Turn | Baseline |
    + GAtt`, percentages). A turn no dialogue reached (context exhausted or fewer turns) shows "-"."""
    names = list(results)
    header = ["Dialogue Turn", *names]
    rows = [[str(t)] + [f"{100 * s.rate:.0f}%" if (s := results[m].turns.get(t)) and s.n else "-" for m in names]
            for t in turns]
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def plot_adherence(results: Mapping[str, GAttEvalResult], path: str | Path, title: str = "GAtt instruction "
                   "adherence") -> Path:
    """Adherence (%) against dialogue turn, one line per model, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        points = sorted((t, 100 * s.rate) for t, s in result.turns.items() if s.n)
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("dialogue turn")
    ax.set_ylabel("instruction adherence (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

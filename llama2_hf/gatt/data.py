"""GAtt data: constraint sets and instructions, the synthetic training dialogues, their validation and
tokenization, and constraint lists written by a chat model (paper §3.3)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..sampling import rollout, sampler_limits
from ..sampling.chat import Answerer, Messages
from .language import SUPPORTED_LANGUAGES

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "gatt"
CONSTRAINTS_FILE = RESOURCES / "constraints.json"
EVAL_USER_TURNS_FILE = RESOURCES / "eval_user_turns.txt"
PLACEMENTS = ("system", "prefix")


# ---------------------------------------------------------------------------------------------------------------------
# Constraint sets and instructions
# ---------------------------------------------------------------------------------------------------------------------

def read_list_file(path: str | Path) -> list[str]:
    """Values of a list file: one per line, blank lines and lines starting with '#' skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


@dataclass
class ConstraintSet:
    """One constraint type of GAtt: its values and how an instruction states it.

    `long_templates` are verbose forms ("Always act as {value} from now."), one drawn per instruction; `short_template`
    is the terse form ("Figure: {value}"); `list_prompt` asks a chat model for `{n}` new values (the `gatt-lists` stage);
    `probes` are user questions that make the constraint visible, used at the evaluated turns.
    """

    name: str
    values: list[str]
    long_templates: list[str]
    short_template: str
    list_prompt: str = ""
    probes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"constraint set {self.name!r} has no values")
        if not self.long_templates:
            raise ValueError(f"constraint set {self.name!r} has no long instruction template")
        for t in [*self.long_templates, self.short_template]:
            if "{value}" not in t:
                raise ValueError(f"constraint set {self.name!r}: template {t!r} has no '{{value}}' placeholder")

    def long_form(self, value: str, rng: random.Random) -> str:
        return rng.choice(self.long_templates).format(value=value)

    def short_form(self, value: str) -> str:
        return self.short_template.format(value=value)


def load_constraint_sets(path: str | Path | None = None,
                         value_files: Mapping[str, str | Path] | None = None) -> dict[str, ConstraintSet]:
    """Constraint sets from a JSON spec (default: the shipped `resources/gatt/constraints.json`).

    Each entry: `values` (a list, or a list file relative to the JSON), `long` (templates), `short`, optional
    `list_prompt` and `probes`. `value_files` replaces the values of named sets by the lines of other list files
    (e.g. ones written by the `gatt-lists` stage).
    """
    path = Path(path) if path is not None else CONSTRAINTS_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    sets = {}
    for name, entry in spec.items():
        if name.startswith("_"):
            continue
        for key in ("values", "long", "short"):
            if key not in entry:
                raise ValueError(f"{path}: constraint set {name!r} is missing {key!r}")
        values = entry["values"]
        if isinstance(values, str):
            values = read_list_file(path.parent / values)
        sets[name] = ConstraintSet(name=name, values=list(values), long_templates=list(entry["long"]),
                                   short_template=entry["short"], list_prompt=entry.get("list_prompt", ""),
                                   probes=list(entry.get("probes", [])))
    for name, file in (value_files or {}).items():
        if name not in sets:
            raise ValueError(f"no constraint set named {name!r} to take values from {file}; known: {sorted(sets)}")
        sets[name] = dataclasses.replace(sets[name], values=read_list_file(file))  # re-validated
    return sets


@dataclass
class Instruction:
    """A GAtt instruction: the constraints it combines and its long and short wordings."""

    constraints: dict[str, str]
    long: str
    short: str


def sample_instruction(constraint_sets: Mapping[str, ConstraintSet], rng: random.Random,
                       num_constraints: tuple[int, int] = (1, 3), types: Sequence[str] | None = None) -> Instruction:
    """A random combination of constraints: k types drawn uniformly in `num_constraints` (inclusive, capped by the
    number of types), one random value each. The long form joins the verbose sentences with spaces, the short form
    joins the terse "Key: value" lines with newlines; types keep the order of `constraint_sets`."""
    names = list(types) if types is not None else list(constraint_sets)
    unknown = [n for n in names if n not in constraint_sets]
    if unknown:
        raise ValueError(f"unknown constraint types {unknown}; known: {sorted(constraint_sets)}")
    lo, hi = num_constraints
    if not 1 <= lo <= hi:
        raise ValueError(f"num_constraints must be (min, max) with 1 <= min <= max, got {num_constraints}")
    k = rng.randint(min(lo, len(names)), min(hi, len(names)))
    chosen = set(rng.sample(names, k))
    picked = [n for n in constraint_sets if n in chosen]
    constraints = {n: rng.choice(constraint_sets[n].values) for n in picked}
    long = " ".join(constraint_sets[n].long_form(v, rng) for n, v in constraints.items())
    short = "\n".join(constraint_sets[n].short_form(v) for n, v in constraints.items())
    return Instruction(constraints=constraints, long=long, short=short)


# ---------------------------------------------------------------------------------------------------------------------
# GAtt data generation
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class GAttDataConfig:
    """How `make_gatt_data` builds the synthetic dialogues (the `gatt` stage's config; choices in the package docstring).

    Constraint values (issue of provenance, paper §3.3): the paper had Llama 2-Chat write its hobby and public-figure
    lists. The default here is the hand-written lists shipped in `resources/gatt` (`constraint_lists=None`); pass the
    folder of a `gatt-lists` run (lists written by a chat model, the paper's way) to use those instead.
    """

    short_form_prob: float = field(default=0.5, metadata={
        "help": "Probability of the short instruction form in the final data (paper §3.3: 'half of the time')."})
    min_constraints: int = field(default=1, metadata={"help": "Fewest constraint types combined per instruction."})
    max_constraints: int = field(default=3, metadata={
        "help": "Most constraint types combined per instruction (paper silent; drawn uniformly in [min, max])."})
    constraint_types: list[str] | None = field(default=None, metadata={
        "help": "Constraint types to combine (default: every type of the constraint spec)."})
    instructions: list[str] | None = field(default=None, metadata={
        "help": "Fixed instruction texts used instead of constraint combinations (one drawn per dialogue)."})
    constraints_file: str | None = field(default=None, metadata={
        "help": "Constraint spec JSON (templates, probes, list prompts); default: resources/gatt/constraints.json."})
    constraint_lists: str | None = field(default=None, metadata={
        "help": "Source of the constraint values. Default (unset): the hand-written lists shipped in resources/gatt. "
                "A gatt-lists output folder: the lists a chat model wrote (how the paper built its hobby and "
                "public-figure lists); its TYPE.txt files replace the shipped values of those types."})
    placement: str = field(default="system", metadata={
        "help": "Where the instruction lives in the first turn of the final data: a system message or a prefix of "
                "the first user message.", "choices": ["system", "prefix"]})
    separator: str = field(default="\n\n", metadata={
        "help": "Between the instruction and a user message when they are concatenated."})
    max_turns: int | None = field(default=None, metadata={"help": "Cap on the turns taken from each dialogue."})
    max_length: int | None = field(default=None, metadata={
        "help": "Context limit in tokens (default: the sampling model's context, 4096 for Llama 2)."})
    examples: str = field(default="last", metadata={
        "help": "'last': one example per dialogue trained on its last turn; 'prefixes': also every shorter prefix.",
        "choices": ["last", "prefixes"]})
    seed: int = field(default=0, metadata={"help": "Seed of the instructions, their forms and the sampling."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_form_prob <= 1.0:
            raise ValueError(f"short_form_prob must be in [0, 1], got {self.short_form_prob}")
        if not 1 <= self.min_constraints <= self.max_constraints:
            raise ValueError(f"need 1 <= min_constraints <= max_constraints, got {self.min_constraints} and "
                             f"{self.max_constraints}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.examples not in ("last", "prefixes"):
            raise ValueError(f"examples must be 'last' or 'prefixes', got {self.examples!r}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")

    @property
    def num_constraints(self) -> tuple[int, int]:
        return self.min_constraints, self.max_constraints

    def constraint_sets(self) -> dict[str, ConstraintSet]:
        """The constraint sets this config names (spec file and value source, see the class docstring)."""
        return load_constraint_sets(self.constraints_file, list_folder_files(self.constraint_lists))


def list_folder_files(folder: str | Path | None) -> dict[str, Path]:
    """`{type: TYPE.txt}` of a folder of constraint lists (a `gatt-lists` output); {} for None."""
    if folder is None:
        return {}
    from ..runner import UsageError

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"constraint_lists {folder}: no such folder (expected a gatt-lists output)")
    files = {p.stem: p for p in sorted(folder.glob("*.txt"))}
    if not files:
        raise UsageError(f"constraint_lists {folder}: no TYPE.txt list file (expected a gatt-lists output)")
    return files


def user_turns_of(row: Mapping, index: int) -> tuple[list[str], bool]:
    """The user messages of a source dialogue row (`messages`), and whether it had a system message. A bad row
    raises `data.InvalidExample` (row and field), which `data.read_rows` turns into file + line."""
    from ..data import InvalidExample
    from ..tokenization_llama2 import validate_messages

    messages = row.get("messages")
    if messages is None:
        raise InvalidExample(index, "messages", "missing_field",
                             f"a source dialogue needs a 'messages' field, got keys {sorted(row)}")
    try:
        validate_messages(messages)
    except ValueError as err:
        raise InvalidExample(index, "messages", "bad_roles", str(err)) from None
    users = [m["content"] for m in messages if m["role"] == "user"]
    if any(not u.strip() for u in users):
        raise InvalidExample(index, "messages", "empty_message", "a user message is empty")
    return users, messages[0]["role"] == "system"


def first_turn(instruction: str, user: str, placement: str, separator: str = "\n\n") -> Messages:
    """The first turn carrying the instruction: a system message, or a prefix of the first user message."""
    if placement == "system":
        return [{"role": "system", "content": instruction}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{instruction}{separator}{user}"}]


def interleave(first: Messages, users: Sequence[str], answers: Sequence[str]) -> Messages:
    """`first` (system + first user turn) followed by the alternating later turns; ends with the last given turn."""
    messages = list(first)
    for k, user in enumerate(users):
        if k:
            messages.append({"role": "user", "content": user})
        if k < len(answers):
            messages.append({"role": "assistant", "content": answers[k]})
    return messages


@dataclass
class GAttPlan:
    """What one source dialogue becomes before any sampling: its user turns, its instruction and form."""

    index: int
    users: list[str]
    instruction: Instruction
    short: bool
    had_system: bool


def plan_gatt_dialogues(dialogues: Iterable[Mapping], constraint_sets: Mapping[str, ConstraintSet] | None = None,
                        config: GAttDataConfig | None = None) -> list[GAttPlan]:
    """Draw every dialogue's instruction (a random combination of constraints, or one of `config.instructions`) and
    form, in input order from `config.seed`: the same plan on every rank and on a resume, whatever is sampled."""
    config = config or GAttDataConfig()
    if not config.instructions:
        constraint_sets = constraint_sets or config.constraint_sets()
    rng = random.Random(config.seed)
    plans = []
    for index, row in enumerate(dialogues):
        turns, had_system = user_turns_of(row, index)
        turns = turns[: config.max_turns] if config.max_turns else turns
        if config.instructions:  # a given text has no short form
            text = rng.choice(list(config.instructions))
            plans.append(GAttPlan(index, turns, Instruction(constraints={}, long=text, short=text), False, had_system))
        else:
            inst = sample_instruction(constraint_sets, rng, config.num_constraints, config.constraint_types)
            plans.append(GAttPlan(index, turns, inst, rng.random() < config.short_form_prob, had_system))
    return plans


def sample_gatt_rows(plans: Sequence[GAttPlan], sampler: Answerer, config: GAttDataConfig | None = None,
                     token_counter: Callable[[Messages], int] | None = None) -> list[dict]:
    """Sample the answers of planned dialogues turn by turn, the long instruction concatenated to every user
    message, then keep the instruction in the first turn only. Rows follow the schema of the package docstring."""
    config = config or GAttDataConfig()

    def sampling_messages(i: int, k: int, answers: list[str]) -> Messages:
        inst = plans[i].instruction.long
        with_inst = [f"{inst}{config.separator}{u}" for u in plans[i].users[: k + 1]]
        return interleave([{"role": "user", "content": with_inst[0]}], with_inst, answers)

    max_length, counter, reserve = sampler_limits(sampler, config.max_length, token_counter)
    answers = rollout(sampler, [len(p.users) for p in plans], sampling_messages, max_length, counter, reserve,
                      desc="GAtt turns")
    rows = []
    for plan, answered in zip(plans, answers):
        inst, n = plan.instruction, len(answered)
        text = inst.short if plan.short else inst.long
        first = first_turn(text, plan.users[0], config.placement, config.separator)
        for m in (range(1, n + 1) if config.examples == "prefixes" else [n] if n else []):
            rows.append({
                "messages": interleave(first, plan.users[:m], answered[:m]),
                "train_on": "last",
                "instruction": text,
                "instruction_form": "short" if plan.short else "long",
                "sampling_instruction": inst.long,
                "constraints": dict(inst.constraints),
                "placement": config.placement,
                "num_turns": m,
                "source_index": plan.index,
            })
    return rows


def gatt_stats(plans: Sequence[GAttPlan], rows: Sequence[Mapping]) -> dict:
    """Counts of a GAtt data run (`dialogues`, `rows`, `short_form`, `stopped_at_context`, `skipped_too_long`,
    `replaced_system`), logged as warnings where dialogues were cut, skipped or had their system message replaced."""
    reached: dict[int, int] = {}
    for row in rows:
        reached[row["source_index"]] = max(reached.get(row["source_index"], 0), row["num_turns"])
    stopped = sum(0 < reached.get(p.index, 0) < len(p.users) for p in plans)
    skipped = sum(reached.get(p.index, 0) == 0 for p in plans)
    replaced = sum(p.had_system for p in plans)
    stats = {"dialogues": len(plans), "rows": len(rows), "short_form": sum(p.short for p in plans),
             "stopped_at_context": stopped, "skipped_too_long": skipped, "replaced_system": replaced}
    if stopped or skipped:
        logger.warning("GAtt data: %d dialogues stopped early at the context length, %d skipped (first turn does "
                       "not fit)", stopped, skipped)
    if replaced:
        logger.warning("GAtt data: replaced the system message of %d source dialogues by the GAtt instruction",
                       replaced)
    logger.info("GAtt data: %s", stats)
    return stats


def make_gatt_data(dialogues: Iterable[Mapping], sampler: Answerer,
                   constraint_sets: Mapping[str, ConstraintSet] | None = None,
                   config: GAttDataConfig | None = None,
                   token_counter: Callable[[Messages], int] | None = None) -> tuple[list[dict], dict]:
    """Build the GAtt SFT dataset (schema in the package docstring) from source dialogues and a chat sampler, in
    one process: `plan_gatt_dialogues`, then `sample_gatt_rows` over all of them (every dialogue batched at each
    turn). Returns the rows and `gatt_stats`. The `gatt` stage runs the same two steps split across ranks."""
    config = config or GAttDataConfig()
    plans = plan_gatt_dialogues(dialogues, constraint_sets, config)
    rows = sample_gatt_rows(plans, sampler, config, token_counter)
    return rows, gatt_stats(plans, rows)


GATT_COLUMNS = ("messages", "train_on", "instruction", "instruction_form", "sampling_instruction", "constraints",
                "placement", "num_turns", "source_index")


def validate_gatt_row(row: Mapping, index: int) -> None:
    """Check a row against the GAtt dataset schema (module docstring); ValueError naming the row and field."""
    from ..tokenization_llama2 import validate_messages

    missing = [c for c in GATT_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"row {index}: missing GAtt fields {missing}")
    if row["train_on"] != "last":
        raise ValueError(f"row {index}, field 'train_on': GAtt rows train on the last turn only, got "
                         f"{row['train_on']!r}")
    try:
        validate_messages(row["messages"])
    except ValueError as err:
        raise ValueError(f"row {index}, field 'messages': {err}") from None
    if row["messages"][-1]["role"] != "assistant":
        raise ValueError(f"row {index}, field 'messages': must end with an assistant answer")
    if row["placement"] not in PLACEMENTS:
        raise ValueError(f"row {index}, field 'placement': expected one of {PLACEMENTS}, got {row['placement']!r}")
    if row["instruction_form"] not in ("long", "short"):
        raise ValueError(f"row {index}, field 'instruction_form': expected 'long' or 'short'")
    if not isinstance(row["constraints"], Mapping):
        raise ValueError(f"row {index}, field 'constraints': expected a {{type: value}} mapping")


def tokenize_gatt_dataset(rows, tokenizer, max_length: int | None = None, on_overlength: str = "error"):
    """GAtt rows -> a `datasets.Dataset` of `input_ids` and `labels` with the loss on the last assistant turn only.

    Every token of earlier turns, their answers included, is labelled -100 (paper §3.3: "set the loss to 0 for all
    the tokens from the previous turns"); the last answer and its EOS keep their ids. Uses the SFT stage's
    `data.prepare_sft_dataset(train_on="last")`, so the result feeds the SFT collators and trainer, packed or padded.
    Returns the dataset and the `DataReport`.
    """
    from datasets import Dataset

    from ..data import prepare_sft_dataset

    if not isinstance(rows, Dataset):
        rows = list(rows)
        for i, row in enumerate(rows):
            validate_gatt_row(row, i)
        rows = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    elif "train_on" in rows.column_names:
        bad = [i for i, t in enumerate(rows["train_on"]) if t != "last"]
        if bad:
            raise ValueError(f"row {bad[0]}, field 'train_on': GAtt rows train on the last turn only")
    return prepare_sft_dataset(rows.select_columns(["messages"]), tokenizer, max_length, train_on="last",
                               on_overlength=on_overlength, name="gatt")


# ---------------------------------------------------------------------------------------------------------------------
# Constraint lists generated by a chat model (the paper had Llama 2-Chat write its hobby and figure lists)
# ---------------------------------------------------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*(?:[-*•·‣▪◦–—>]+|\(?\d{1,3}\s*[.):\]]|\(?[a-zA-Z][.)](?=\s))\s*")
_EXPLANATION = re.compile(r"\s+[-–—]\s+|:\s+|\s+\(|,\s+(?:which|who|where|a|an|the)\s")
_PREAMBLE = re.compile(r"^(?:sure|here|of course|certainly|okay|ok|i hope|note|these|this list|let me|absolutely)\b",
                       re.IGNORECASE)


def parse_generated_list(text: str, max_words: int = 6) -> list[str]:
    """Items of a list a chat model wrote, in order, deduplicated (case- and space-insensitive).

    Handles numbered ("1.", "2)", "(3)") and bulleted ("-", "*", "•") lines, markdown bold, quotes, explanations after
    " - ", ": " or "(", a single comma-separated line, and preamble or closing sentences (skipped: lines ending with
    ":" or "?", starting with "Sure"/"Here"/..., or longer than `max_words` words once cleaned).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) <= 2 and any(line.count(",") >= 2 for line in lines):  # "Here they are: tennis, chess and golf."
        lines = [part for line in lines for part in re.split(r",|;|\band\b", line.rpartition(":")[2])
                 if part.strip()]
    items, seen = [], set()
    for raw in lines:
        line = raw.strip()
        if line.endswith((":", "?")) or _PREAMBLE.match(_BULLET.sub("", line)):
            continue
        line = _BULLET.sub("", line).replace("**", "").replace("__", "")
        line = _EXPLANATION.split(line, maxsplit=1)[0]
        line = line.strip().strip("\"'`“”‘’").strip().rstrip(".,;:!?").strip()
        if not line or len(line.split()) > max_words or not any(c.isalpha() for c in line):
            continue
        key = " ".join(line.lower().split())
        if key not in seen:
            seen.add(key)
            items.append(line)
    return items


def generate_constraint_list(sampler: Answerer, constraint_set: ConstraintSet, n: int, existing: Iterable[str] = (),
                             samples_per_round: int = 4, max_rounds: int = 10) -> list[str]:
    """Ask a chat model for `n` new values of a constraint type (`constraint_set.list_prompt`), parse and dedupe.

    Each round sends `samples_per_round` copies of the prompt (sampled answers differ); rounds repeat until `n` new
    values (not in `existing`, case-insensitive) are collected or `max_rounds` is reached (then a warning).
    """
    if not constraint_set.list_prompt:
        raise ValueError(f"constraint set {constraint_set.name!r} has no 'list_prompt' to ask a model with")
    seen = {" ".join(v.lower().split()) for v in existing}
    new: list[str] = []
    prompt = constraint_set.list_prompt.format(n=n)
    for _ in range(max_rounds):
        for answer in sampler([[{"role": "user", "content": prompt}]] * samples_per_round):
            for item in parse_generated_list(answer):
                key = " ".join(item.lower().split())
                if key not in seen:
                    seen.add(key)
                    new.append(item)
        if len(new) >= n:
            break
    else:
        logger.warning("gatt-lists %s: only %d of %d new values after %d rounds", constraint_set.name, len(new), n,
                       max_rounds)
    if constraint_set.name == "language":
        unsupported = [v for v in new if v.lower() not in {s.lower() for s in SUPPORTED_LANGUAGES}]
        if unsupported:
            logger.warning("languages not recognised by detect_language (fine for data, not checkable in "
                           "evaluation): %s", unsupported)
    return new[:n]

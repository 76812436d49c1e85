"""Ghost Attention (GAtt, paper §3.3, §A.3.5, Table 30, Fig. 9-10, 28): data generation, training data, evaluation.

GAtt keeps a system instruction alive over many turns by editing fine-tuning data:
1. take multi-turn dialogues and an instruction `inst` that should hold for the whole dialogue, built as a random
   combination of constraints (hobby, language, public figure);
2. sample the assistant's answers turn by turn with `inst` concatenated to every user message;
3. keep `inst` in the first turn only (as the system message, or as a prefix of the first user message), using its
   short form ("Figure: Napoleon" instead of "Always act as Napoleon from now") half of the time;
4. train with the loss on the last assistant turn only: every token of previous turns, assistant answers included,
   gets no loss (`train_on="last"`).

GAtt SFT dataset (JSONL, one dialogue per row; `write_jsonl` / `llama2-hf gatt make-data`):
    messages              list of {"role", "content"}: ["system" with the instruction (placement "system")],
                          then user/assistant alternating from user, ending with assistant. Only the first turn
                          carries the instruction; the assistant answers are the sampled ones.
    train_on              "last": loss on the final assistant turn only (see `tokenize_gatt_dataset`).
    instruction           the instruction text as it appears in the first turn (long or short form).
    instruction_form      "long" | "short".
    sampling_instruction  the long form, concatenated to every user turn while sampling.
    constraints           {constraint type: value}, e.g. {"public_figure": "Napoleon Bonaparte", "language": "French"};
                          {} for an instruction given as text (`GAttDataConfig.instructions`).
    placement             "system" | "prefix".
    num_turns             number of user/assistant pairs in `messages`.
    source_index          row of the source dialogue in the input dataset.

Evaluation (`evaluate_gatt`, `llama2-hf gatt eval`): dialogues whose instruction is given in the first turn only
(as at inference), answers generated turn by turn until `max_turns` or the context length, and at probe turns each
constraint judged by pluggable checkers (`LanguageChecker`: the light-weight `detect_language` below, no download;
`KeywordChecker`: persona and hobby keywords; `JudgeChecker`: a yes/no judge such as `ModelJudge`). Adherence by
turn is printed in Table 30's layout (`format_table30`) and plotted (`plot_adherence`).

Choices where the paper is silent (all options):
- sampling concatenates the long instruction to *every* user message, the first included, separated by a blank line;
  in the final data the instruction is a system message (`placement="system"`, how Llama 2-Chat takes instructions
  at inference) and the short form replaces the long one with probability 0.5 (paper: "half of the time");
- an instruction combines 1 to 3 constraint types, uniformly;
- one training example per dialogue, trained on its last turn (`examples="last"`); `examples="prefixes"` also emits
  every shorter prefix, each trained on its own last turn;
- a dialogue stops early when the next prompt plus `max_new_tokens` no longer fits the context (counted, logged);
- a source dialogue's own system message is replaced by the GAtt instruction (counted, logged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources" / "gatt"
CONSTRAINTS_FILE = RESOURCES / "constraints.json"
EVAL_USER_TURNS_FILE = RESOURCES / "eval_user_turns.txt"

Messages = list[dict]
Sampler = Callable[[list[Messages]], list[str]]
"""`sampler(conversations) -> one answer per conversation`; each conversation ends with a user message."""

# Paper Table 30 reports turns 2, 4, 6 and 20.
TABLE30_TURNS = (2, 4, 6, 20)


# ---------------------------------------------------------------------------------------------------------------------
# Light-weight language identification (no downloads)
# ---------------------------------------------------------------------------------------------------------------------

# Frequent function words, chosen to separate the Latin-script languages (shared words count for every language).
_STOPWORDS: dict[str, str] = {
    "English": "the and is are you your of to in that it was for with this have be not on what my me we they do can "
               "will would about there from at but or so very like just how an i'm it's don't",
    "French": "le la les et est je vous tu nous une des du dans pour pas que qui sur avec ce cette mais très bien "
              "suis êtes mon ma mes votre au aux sont être oui non aussi comme où il elle ils j'aime c'est",
    "Spanish": "el la los las y es yo usted tú una un del en para por que con pero muy mi su está estoy son como "
               "más qué también hay sí nosotros porque cuando soy eres gracias me gusta",
    "German": "der die das und ist ich sie du wir ein eine nicht mit auf für zu von den dem es sehr auch aber oder "
              "wie was mein ihr bin sind haben habe gut danke ja nein gerne heute immer",
    "Italian": "il lo la gli le e è io lei tu noi un una di del della che per con non sono molto mi ti ma anche come "
               "questo questa sei siamo ciao grazie perché più cosa mio mia",
    "Portuguese": "o a os as e é eu você um uma de do da dos em no na para por que com não muito mas também como "
                  "mais meu minha sou está estou obrigado sim isso então são",
    "Dutch": "de het een en is ik je jij u wij we niet met op voor van dat die zijn ben maar ook heel wat hoe mijn "
             "jouw hebben heb graag dank ja nee er naar bij",
    "Swedish": "och är jag du vi en ett inte med på för till av det den som men också mycket vad hur min mitt din "
               "har ha tack ja nej om från kan vill",
    "Polish": "i w na jest nie się że to jak ja ty my jestem jesteś z do co mój moja bardzo ale też tak dziękuję czy "
              "dla od przez który być mam",
    "Turkish": "ve bir bu ben sen biz çok ne için ile da de değil var yok evet hayır teşekkür ederim nasıl gibi ama "
               "daha mi mı benim senin olarak her şey",
}
STOPWORDS: dict[str, frozenset[str]] = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}

# Letters that only one of the Latin-script languages above uses; each occurrence adds half a stopword hit.
_DISTINCT_LETTERS = {"Spanish": "ñ¿¡", "German": "ß", "Portuguese": "ãõ", "Polish": "łąęśźżćń", "Turkish": "ğşı",
                     "Swedish": "å", "French": "œêûî"}

# Unicode script (from the character name) -> language, for the non-Latin scripts.
_SCRIPT_LANGUAGE = {"CYRILLIC": "Russian", "GREEK": "Greek", "ARABIC": "Arabic", "HEBREW": "Hebrew",
                    "DEVANAGARI": "Hindi", "HANGUL": "Korean", "THAI": "Thai"}
SUPPORTED_LANGUAGES = tuple(STOPWORDS) + tuple(_SCRIPT_LANGUAGE.values()) + ("Chinese", "Japanese")
UNKNOWN_LANGUAGE = "unknown"

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _script(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    if not name:
        return None
    if name.startswith(("HIRAGANA", "KATAKANA")):
        return "KANA"
    if name.startswith("CJK"):
        return "HAN"
    first = name.split()[0]
    return first if first in _SCRIPT_LANGUAGE or first == "LATIN" else "OTHER"


def detect_language(text: str, min_score: float = 1.0) -> str:
    """Best-guess language of `text` (one of `SUPPORTED_LANGUAGES`), or "unknown".

    Non-Latin scripts decide by the majority script of the letters (kana present -> Japanese, Han only -> Chinese);
    Latin-script text is scored per language by its stopword hits plus half a point per language-specific letter,
    and needs at least `min_score` points. Meant for checking "answer in French"-style instructions on answers of a
    sentence or more, not for short or mixed-language strings.
    """
    scripts = Counter(s for ch in text if ch.isalpha() and (s := _script(ch)) is not None)
    if not scripts:
        return UNKNOWN_LANGUAGE
    if scripts["KANA"] or scripts["HAN"]:
        cjk = scripts["KANA"] + scripts["HAN"]
        if cjk * 2 >= sum(scripts.values()):
            return "Japanese" if scripts["KANA"] else "Chinese"
    script, count = scripts.most_common(1)[0]
    if script in _SCRIPT_LANGUAGE and count * 2 >= sum(scripts.values()):
        return _SCRIPT_LANGUAGE[script]
    lowered = text.lower().replace("\u2019", "'")
    words = _WORD.findall(lowered)
    scores = {lang: sum(w in stop for w in words) for lang, stop in STOPWORDS.items()}
    for lang, letters in _DISTINCT_LETTERS.items():
        scores[lang] += 0.5 * sum(lowered.count(c) for c in letters)
    best = max(scores, key=scores.get)
    return best if scores[best] >= min_score else UNKNOWN_LANGUAGE


def canonical_language(name: str) -> str:
    """The `SUPPORTED_LANGUAGES` spelling of a language name (case-insensitive); ValueError if not supported."""
    for lang in SUPPORTED_LANGUAGES:
        if lang.lower() == name.strip().lower():
            return lang
    raise ValueError(f"language {name!r} is not recognised by detect_language; supported: {SUPPORTED_LANGUAGES}")


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
    is the terse form ("Figure: {value}"); `list_prompt` asks a chat model for `{n}` new values (`make-lists`);
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
    (e.g. ones written by `make-lists`).
    """
    path = Path(path) if path is not None else CONSTRAINTS_FILE
    spec = json.loads(path.read_text(encoding="utf-8"))
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
# Sampling chat answers
# ---------------------------------------------------------------------------------------------------------------------

class ChatSampler:
    """Answers a batch of chat conversations with a causal LM through the pipeline's `generation.generate_text`.

    `config` is a `generation.SamplingConfig` with `num_samples=1` (default: Meta's chat defaults, temperature 0.6,
    top-p 0.9; temperature 0 is greedy). Also counts prompt tokens (`count_tokens`) and knows the model's context
    (`max_length`), so turn-by-turn rollouts can stop at the context length.
    """

    def __init__(self, model, tokenizer, config=None, seed: int | None = None, progress: bool = False):
        from .generation import SamplingConfig

        self.config = config if config is not None else SamplingConfig()
        if self.config.num_samples != 1:
            raise ValueError(f"ChatSampler answers once per conversation: num_samples must be 1, got "
                             f"{self.config.num_samples}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.generator = None
        if seed is not None:
            import torch

            self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.progress = progress

    @classmethod
    def from_pretrained(cls, model_dir: str, tokenizer_dir: str | None = None, config=None,
                        **kwargs) -> "ChatSampler":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        return cls(model, tokenizer, config, **kwargs)

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def count_tokens(self, messages: Messages) -> int:
        from .tokenization_llama2 import encode_dialog

        return len(encode_dialog(self.tokenizer, messages))

    def __call__(self, conversations: list[Messages]) -> list[str]:
        from .generation import generate_text

        if not conversations:
            return []
        out = generate_text(self.model, self.tokenizer, conversations, self.config, generator=self.generator,
                            progress=self.progress)
        return [samples[0] for samples in out]


def rollout(sampler: Sampler, num_turns: Sequence[int], build_messages: Callable[[int, int, list[str]], Messages],
            max_length: int | None = None, token_counter: Callable[[Messages], int] | None = None,
            reserve_tokens: int = 0, desc: str = "turns") -> list[list[str]]:
    """Generate the assistant's answers of many dialogues turn by turn, batching all dialogues at each turn.

    `build_messages(i, k, answers)` returns the conversation of dialogue i up to its user turn k (0-based), given its
    answers to turns 0..k-1. Dialogue i runs for `num_turns[i]` turns, or stops early once the prompt plus
    `reserve_tokens` exceeds `max_length` tokens (when `max_length` and `token_counter` are given). Returns each
    dialogue's answers (possibly fewer than its turns).
    """
    answers: list[list[str]] = [[] for _ in num_turns]
    stopped = [False] * len(num_turns)
    for k in tqdm(range(max(num_turns, default=0)), desc=desc, disable=len(num_turns) < 2):
        batch, conversations = [], []
        for i, n in enumerate(num_turns):
            if stopped[i] or k >= n:
                continue
            messages = build_messages(i, k, answers[i])
            if max_length is not None and token_counter is not None and \
                    token_counter(messages) + reserve_tokens > max_length:
                stopped[i] = True
                continue
            batch.append(i)
            conversations.append(messages)
        if not batch:
            break
        responses = sampler(conversations)
        if len(responses) != len(batch):
            raise ValueError(f"the sampler returned {len(responses)} answers for {len(batch)} conversations")
        for i, response in zip(batch, responses):
            answers[i].append(response)
    return answers


def _sampler_limits(sampler, max_length: int | None, token_counter):
    """Context limit, token counter and reserved answer length, from the arguments or the sampler."""
    max_length = max_length if max_length is not None else getattr(sampler, "max_length", None)
    token_counter = token_counter or getattr(sampler, "count_tokens", None)
    return max_length, token_counter, getattr(sampler, "max_new_tokens", 0)


# ---------------------------------------------------------------------------------------------------------------------
# GAtt data generation
# ---------------------------------------------------------------------------------------------------------------------

PLACEMENTS = ("system", "prefix")


@dataclass
class GAttDataConfig:
    """How `make_gatt_data` builds the synthetic dialogues (see the module docstring for the choices)."""

    short_form_prob: float = 0.5  # 0.5: "half of the time" the instruction is made less verbose, paper §3.3
    num_constraints: tuple[int, int] = (1, 3)  # constraint types combined per instruction (min, max)
    constraint_types: tuple[str, ...] | None = None  # None: every loaded constraint set
    instructions: tuple[str, ...] | None = None  # fixed instruction texts instead of constraint combinations
    placement: str = "system"  # where the instruction lives in the first turn of the final data
    separator: str = "\n\n"  # between the instruction and a user message when concatenated
    max_turns: int | None = None  # cap on the turns taken from each source dialogue
    max_length: int | None = None  # context limit in tokens (None: the sampler's model context, 4096 for Llama 2)
    examples: str = "last"  # "last": one example per dialogue; "prefixes": also every shorter prefix
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_form_prob <= 1.0:
            raise ValueError(f"short_form_prob must be in [0, 1], got {self.short_form_prob}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.examples not in ("last", "prefixes"):
            raise ValueError(f"examples must be 'last' or 'prefixes', got {self.examples!r}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")


def user_turns_of(row: Mapping, index: int) -> tuple[list[str], bool]:
    """The user messages of a source dialogue row (`messages`), and whether it had a system message."""
    from .tokenization_llama2 import validate_messages

    messages = row.get("messages")
    if messages is None:
        raise ValueError(f"row {index}: a source dialogue needs a 'messages' field, got keys {sorted(row)}")
    try:
        validate_messages(messages)
    except ValueError as err:
        raise ValueError(f"row {index}, field 'messages': {err}") from None
    users = [m["content"] for m in messages if m["role"] == "user"]
    if any(not u.strip() for u in users):
        raise ValueError(f"row {index}, field 'messages': a user message is empty")
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


def make_gatt_data(dialogues: Iterable[Mapping], sampler: Sampler,
                   constraint_sets: Mapping[str, ConstraintSet] | None = None,
                   config: GAttDataConfig | None = None,
                   token_counter: Callable[[Messages], int] | None = None) -> tuple[list[dict], dict]:
    """Build the GAtt SFT dataset (schema in the module docstring) from source dialogues and a chat sampler.

    For each source dialogue (a row with `messages`), draw an instruction (a random combination of constraints, or
    one of `config.instructions`), sample the assistant's answers turn by turn with the long instruction
    concatenated to every user message, then keep the instruction in the first turn only. Returns the rows and
    counts (`dialogues`, `rows`, `short_form`, `stopped_at_context`, `skipped_too_long`, `replaced_system`).
    """
    config = config or GAttDataConfig()
    if not config.instructions:
        constraint_sets = constraint_sets or load_constraint_sets()
    rng = random.Random(config.seed)
    sources = list(dialogues)
    users, instructions, short = [], [], []
    replaced_system = 0
    for index, row in enumerate(sources):
        turns, had_system = user_turns_of(row, index)
        replaced_system += had_system
        users.append(turns[: config.max_turns] if config.max_turns else turns)
        if config.instructions:  # a given text has no short form
            text = rng.choice(config.instructions)
            instructions.append(Instruction(constraints={}, long=text, short=text))
            short.append(False)
        else:
            instructions.append(sample_instruction(constraint_sets, rng, config.num_constraints,
                                                   config.constraint_types))
            short.append(rng.random() < config.short_form_prob)

    def sampling_messages(i: int, k: int, answers: list[str]) -> Messages:
        inst = instructions[i].long
        with_inst = [f"{inst}{config.separator}{u}" for u in users[i][: k + 1]]
        return interleave([{"role": "user", "content": with_inst[0]}], with_inst, answers)

    max_length, counter, reserve = _sampler_limits(sampler, config.max_length, token_counter)
    answers = rollout(sampler, [len(u) for u in users], sampling_messages, max_length, counter, reserve,
                      desc="GAtt turns")

    rows, stopped, skipped = [], 0, 0
    for i, (turns, inst) in enumerate(zip(users, instructions)):
        n = len(answers[i])
        if n == 0:
            skipped += 1
            continue
        stopped += n < len(turns)
        text = inst.short if short[i] else inst.long
        first = first_turn(text, turns[0], config.placement, config.separator)
        lengths = range(1, n + 1) if config.examples == "prefixes" else [n]
        for m in lengths:
            rows.append({
                "messages": interleave(first, turns[:m], answers[i][:m]),
                "train_on": "last",
                "instruction": text,
                "instruction_form": "short" if short[i] else "long",
                "sampling_instruction": inst.long,
                "constraints": dict(inst.constraints),
                "placement": config.placement,
                "num_turns": m,
                "source_index": i,
            })
    stats = {"dialogues": len(sources), "rows": len(rows), "short_form": sum(short),
             "stopped_at_context": stopped, "skipped_too_long": skipped, "replaced_system": replaced_system}
    if stopped or skipped:
        logger.warning("GAtt data: %d dialogues stopped early at the context length, %d skipped (first turn does "
                       "not fit)", stopped, skipped)
    if replaced_system:
        logger.warning("GAtt data: replaced the system message of %d source dialogues by the GAtt instruction",
                       replaced_system)
    logger.info("GAtt data: %s", stats)
    return rows, stats


GATT_COLUMNS = ("messages", "train_on", "instruction", "instruction_form", "sampling_instruction", "constraints",
                "placement", "num_turns", "source_index")


def validate_gatt_row(row: Mapping, index: int) -> None:
    """Check a row against the GAtt dataset schema (module docstring); ValueError naming the row and field."""
    from .tokenization_llama2 import validate_messages

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

    from .data import prepare_sft_dataset

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


def generate_constraint_list(sampler: Sampler, constraint_set: ConstraintSet, n: int, existing: Iterable[str] = (),
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
        logger.warning("make-lists %s: only %d of %d new values after %d rounds", constraint_set.name, len(new), n,
                       max_rounds)
    if constraint_set.name == "language":
        unsupported = [v for v in new if v.lower() not in {s.lower() for s in SUPPORTED_LANGUAGES}]
        if unsupported:
            logger.warning("languages not recognised by detect_language (fine for data, not checkable in "
                           "evaluation): %s", unsupported)
    return new[:n]


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
    likely than " No" after `JUDGE_PROMPT` (one forward pass, no sampling)."""

    def __init__(self, model, tokenizer, prompt: str = JUDGE_PROMPT):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.yes_id = tokenizer.encode("Yes", add_special_tokens=False)[0]
        self.no_id = tokenizer.encode("No", add_special_tokens=False)[0]
        if self.yes_id == self.no_id:
            raise ValueError("'Yes' and 'No' start with the same token in this tokenizer: cannot judge with them")

    def __call__(self, instruction: str, response: str, value: str, context: Messages) -> bool:
        import torch

        from .tokenization_llama2 import encode_dialog

        ids = encode_dialog(self.tokenizer, [{"role": "user", "content": self.prompt.format(
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
    def from_dict(cls, data: Mapping) -> "GAttEvalResult":
        turns = {int(t): TurnStats(n=s["n"], adhered=s["adhered"], by_constraint=dict(s["by_constraint"]))
                 for t, s in data["turns"].items()}
        return cls(turns=turns, transcripts=list(data.get("transcripts", [])))


def evaluate_gatt(sampler: Sampler, dialogues: Sequence[Mapping], checkers: Sequence[Checker],
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

    max_length, counter, reserve = _sampler_limits(sampler, max_length, token_counter)
    answers = rollout(sampler, [len(d["user_turns"]) for d in dialogues], build, max_length, counter, reserve,
                      desc="GAtt eval turns")

    turns: dict[int, TurnStats] = {}
    transcripts = []
    for i, d in enumerate(dialogues):
        verdicts = []
        for k, answer in enumerate(answers[i]):
            judged = d["checks"][k]
            if not judged:
                verdicts.append(None)
                continue
            context = build(i, k, answers[i][:k])
            per_type = {}
            for t in judged:
                per_type[t] = all(c.check(answer, t, d["constraints"][t], d["instruction"], context)
                                  for c in checkers if c.handles(t))
            stats = turns.setdefault(k + 1, TurnStats())
            stats.n += 1
            stats.adhered += all(per_type.values())
            for t, ok in per_type.items():
                counts = stats.by_constraint.setdefault(t, [0, 0])
                counts[0] += ok
                counts[1] += 1
            verdicts.append(per_type)
        users = d["user_turns"][: max(1, len(answers[i]))]
        transcripts.append({"instruction": d["instruction"], "constraints": d["constraints"],
                            "messages": interleave(first_turn(d["instruction"], users[0], placement), users,
                                                   answers[i]),
                            "verdicts": verdicts, "turns_reached": len(answers[i])})
    return GAttEvalResult(turns=turns, transcripts=transcripts)


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


# ---------------------------------------------------------------------------------------------------------------------
# I/O and command line
# ---------------------------------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {i + 1}: not valid JSON ({err})") from None
    return rows


def write_jsonl(rows: Iterable[Mapping], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_dialogues(source: str, split: str = "train") -> list[dict]:
    """Source dialogues: a JSONL file, a `datasets` directory saved to disk, or a Hub dataset name."""
    path = Path(source)
    if path.is_file():
        return read_jsonl(path)
    from datasets import load_dataset, load_from_disk

    ds = load_from_disk(source) if path.is_dir() else load_dataset(source, split=split)
    if hasattr(ds, "keys") and split in ds:
        ds = ds[split]
    return list(ds)


def _value_files(specs: Sequence[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            raise ValueError(f"--values expects TYPE=FILE, got {spec!r}")
        out[name] = file
    return out


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", required=True, help="chat model directory (the latest RLHF model, paper §3.3)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit per turn")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per generation batch")
    p.add_argument("--seed", type=int, default=0, help="random seed (instructions and sampling)")


def _add_constraint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--constraints", default=None, help="constraint spec JSON (default: the shipped one)")
    p.add_argument("--values", action="append", default=[], metavar="TYPE=FILE",
                   help="replace the values of a constraint type by a list file (e.g. from make-lists); repeatable")


def sampler_from_args(args) -> ChatSampler:
    from .generation import SamplingConfig

    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            prompt_batch_size=args.batch_size)
    return ChatSampler.from_pretrained(args.model, args.tokenizer, config, seed=args.seed, progress=True)


def write_run_json(out_dir: Path, stage: str, args, metrics: Mapping) -> None:
    record = {"stage": stage, "config": {k: v for k, v in vars(args).items() if k != "func"}, "metrics": metrics}
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")


def _cmd_make_data(args) -> int:
    config = GAttDataConfig(short_form_prob=args.short_form_prob, num_constraints=(args.min_constraints,
                            args.max_constraints), constraint_types=tuple(args.types) if args.types else None,
                            instructions=tuple(args.instruction) if args.instruction else None,
                            placement=args.placement, max_turns=args.max_turns, max_length=args.max_length,
                            examples=args.examples, seed=args.seed)
    sets = load_constraint_sets(args.constraints, _value_files(args.values))
    dialogues = load_dialogues(args.dialogues, args.split)
    if args.limit:
        dialogues = dialogues[: args.limit]
    rows, stats = make_gatt_data(dialogues, sampler_from_args(args), sets, config)
    out = Path(args.output_dir)
    write_jsonl(rows, out / "gatt.jsonl")
    write_run_json(out, "gatt-make-data", args, stats)
    print(json.dumps(stats))
    return 0


def _cmd_make_lists(args) -> int:
    sets = load_constraint_sets(args.constraints, _value_files(args.values))
    types = args.types or [name for name, cs in sets.items() if cs.list_prompt]
    sampler = sampler_from_args(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in types:
        if name not in sets:
            raise ValueError(f"unknown constraint type {name!r}; known: {sorted(sets)}")
        existing = sets[name].values if args.merge else []
        new = generate_constraint_list(sampler, sets[name], args.n, existing=existing,
                                       samples_per_round=args.samples_per_round, max_rounds=args.max_rounds)
        values = [*existing, *new]
        path = out / f"{name}.txt"
        path.write_text(f"# {name}: {len(new)} values generated by {args.model}\n" + "\n".join(values) + "\n",
                        encoding="utf-8")
        counts[name] = len(new)
        print(f"{name}: {len(new)} new values -> {path}")
    write_run_json(out, "gatt-make-lists", args, counts)
    return 0


def _checkers(args, sets) -> list[Checker]:
    checkers: list[Checker] = []
    for name in args.checkers.split(","):
        name = name.strip()
        if name == "language":
            checkers.append(LanguageChecker())
        elif name == "keyword":
            checkers.append(KeywordChecker())
        elif name == "judge":
            if not args.judge_model:
                raise ValueError("the 'judge' checker needs --judge-model")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            judge = ModelJudge(AutoModelForCausalLM.from_pretrained(args.judge_model),
                               AutoTokenizer.from_pretrained(args.judge_model))
            checkers.append(JudgeChecker(judge, sets, types=args.judge_types or None))
        elif name:
            raise ValueError(f"unknown checker {name!r}; expected language, keyword or judge")
    return checkers


def _cmd_eval(args) -> int:
    sets = load_constraint_sets(args.constraints, _value_files(args.values))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.dialogues:
        dialogues = read_jsonl(args.dialogues)
    else:
        dialogues = build_eval_dialogues(sets, args.num_dialogues, args.max_turns, types=args.types,
                                         seed=args.seed)
        write_jsonl(dialogues, out / "eval_dialogues.jsonl")
    checkers = _checkers(args, sets)
    result = evaluate_gatt(sampler_from_args(args), dialogues, checkers, placement=args.placement,
                           max_length=args.max_length)
    name = args.name or Path(args.model).name
    (out / f"gatt_eval_{name}.json").write_text(json.dumps({name: result.to_dict()}, indent=2, ensure_ascii=False),
                                                encoding="utf-8")
    return _report({name: result}, args.turns, out, args.title)


def _report(results: Mapping[str, GAttEvalResult], turns: Sequence[int], out: Path, title: str) -> int:
    print(format_table30(results, turns))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table30.md").write_text(format_table30(results, turns) + "\n", encoding="utf-8")
    print(f"plot: {plot_adherence(results, out / 'gatt_adherence.png', title)}")
    return 0


def _cmd_table(args) -> int:
    results: dict[str, GAttEvalResult] = {}
    for file in args.results:
        for name, data in json.loads(Path(file).read_text(encoding="utf-8")).items():
            results[name] = GAttEvalResult.from_dict(data)
    return _report(results, args.turns, Path(args.output_dir), args.title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama2-hf gatt", description="Ghost Attention (paper §3.3): synthetic "
                                     "multi-turn data, constraint lists and instruction-adherence evaluation.")
    sub = parser.add_subparsers(dest="action", required=True)

    p = sub.add_parser("make-data", help="sample GAtt dialogues and write the SFT dataset (gatt.jsonl)")
    p.add_argument("--dialogues", required=True, help="source multi-turn dialogues: JSONL with 'messages', a saved "
                                                      "dataset directory or a Hub dataset name")
    p.add_argument("--split", default="train", help="split of a Hub or saved dataset")
    p.add_argument("--limit", type=int, default=None, help="use only the first N dialogues")
    p.add_argument("--output-dir", required=True, help="where gatt.jsonl and run.json are written")
    p.add_argument("--types", nargs="*", default=None, help="constraint types to combine (default: all)")
    p.add_argument("--instruction", action="append", default=None,
                   help="a fixed instruction text to use instead of constraint combinations; repeatable (one is "
                        "drawn per dialogue)")
    p.add_argument("--min-constraints", type=int, default=1, help="fewest constraint types per instruction")
    p.add_argument("--max-constraints", type=int, default=3, help="most constraint types per instruction")
    p.add_argument("--short-form-prob", type=float, default=0.5, help="probability of the short instruction form "
                                                                      "in the final data (paper: half of the time)")
    p.add_argument("--placement", choices=PLACEMENTS, default="system",
                   help="instruction in the first turn as a system message or as a prefix of the user message")
    p.add_argument("--max-turns", type=int, default=None, help="cap on turns per dialogue")
    p.add_argument("--max-length", type=int, default=None, help="context limit in tokens (default: the model's)")
    p.add_argument("--examples", choices=("last", "prefixes"), default="last",
                   help="one example per dialogue, or also every shorter prefix")
    _add_constraint_args(p)
    add_sampling_arguments(p, temperature=0.6)
    p.set_defaults(func=_cmd_make_data)

    p = sub.add_parser("make-lists", help="have a chat model write constraint value lists (hobbies, figures, ...)")
    p.add_argument("--output-dir", required=True, help="one TYPE.txt list file per constraint type is written here")
    p.add_argument("--types", nargs="*", default=None, help="constraint types (default: all with a list_prompt)")
    p.add_argument("--n", type=int, default=50, help="new values wanted per type")
    p.add_argument("--merge", action="store_true", help="keep the current values and add only new ones")
    p.add_argument("--samples-per-round", type=int, default=4, help="answers sampled per round")
    p.add_argument("--max-rounds", type=int, default=10, help="rounds before giving up on reaching --n")
    _add_constraint_args(p)
    add_sampling_arguments(p, temperature=1.0)
    p.set_defaults(func=_cmd_make_lists)

    p = sub.add_parser("eval", help="instruction adherence by turn (Table 30 layout + PNG plot)")
    p.add_argument("--output-dir", required=True, help="results JSON, table30.md and gatt_adherence.png go here")
    p.add_argument("--name", default=None, help="column name of this model in the table (default: directory name)")
    p.add_argument("--dialogues", default=None, help="eval dialogues JSONL (instruction, constraints, user_turns, "
                                                     "checks); default: built from the shipped resources")
    p.add_argument("--num-dialogues", type=int, default=50, help="dialogues to build when --dialogues is not given")
    p.add_argument("--max-turns", type=int, default=20, help="turns per built dialogue (probes at every 2nd turn)")
    p.add_argument("--types", nargs="*", default=["public_figure", "hobbies"],
                   help="constraint types of built dialogues (paper Table 30: public figures and hobbies)")
    p.add_argument("--turns", type=int, nargs="*", default=list(TABLE30_TURNS), help="turns shown in the table")
    p.add_argument("--checkers", default="language,keyword", help="comma-separated: language, keyword, judge")
    p.add_argument("--judge-model", default=None, help="chat model directory for the 'judge' checker")
    p.add_argument("--judge-types", nargs="*", default=None, help="constraint types the judge rules on (all)")
    p.add_argument("--placement", choices=PLACEMENTS, default="system", help="where the instruction is given")
    p.add_argument("--max-length", type=int, default=None, help="context limit in tokens (default: the model's)")
    p.add_argument("--title", default="GAtt instruction adherence", help="plot title")
    _add_constraint_args(p)
    add_sampling_arguments(p, temperature=0.6)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("table", help="merge eval result files into one Table 30 and plot (e.g. baseline vs GAtt)")
    p.add_argument("results", nargs="+", help="gatt_eval_*.json files written by 'eval'")
    p.add_argument("--output-dir", required=True, help="where table30.md and gatt_adherence.png are written")
    p.add_argument("--turns", type=int, nargs="*", default=list(TABLE30_TURNS), help="turns shown in the table")
    p.add_argument("--title", default="GAtt instruction adherence", help="plot title")
    p.set_defaults(func=_cmd_table)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


__all__ = [
    "TABLE30_TURNS", "SUPPORTED_LANGUAGES", "STOPWORDS", "ChatSampler", "Checker", "ConstraintSet", "GAttDataConfig",
    "GAttEvalResult", "Instruction", "JudgeChecker", "KeywordChecker", "LanguageChecker", "ModelJudge", "TurnStats",
    "build_eval_dialogues", "canonical_language", "detect_language", "evaluate_gatt", "first_turn",
    "format_table30", "generate_constraint_list", "interleave", "keywords_of", "load_constraint_sets",
    "make_gatt_data", "parse_generated_list", "plot_adherence", "read_jsonl", "read_list_file", "rollout",
    "sample_instruction", "tokenize_gatt_dataset", "validate_gatt_row", "write_jsonl", "main",
]

"""Loading a model for the role a stage gives it, refusing weights that do not fit.

transformers' `from_pretrained` loads any checkpoint into any class: weights the class expects but the checkpoint
lacks are initialised at random, weights it does not expect are dropped, and a load report is printed. A causal LM
given as a reward model then scores with a random head, and a checkpoint whose layers are named differently trains
as a random model, both with exit code 0. Here every missing or unexpected weight is an error naming the folder, the
role and the first names, raised before any work.

A new head is allowed only where a stage documents it (`new_head=True`: a reward model or critic started from a
chat model's decoder): the backbone must then load in full, and only weights outside it may be missing (the new
head) or unused (the old one).

Any transformers family loads as itself: a checkpoint whose config says `model_type: llama2` gets the class the
caller names (`Llama2ForCausalLM`, `Llama2ForRewardModel`, ...); any other model type gets the Auto class of the same
role (`AutoModelForCausalLM` for a causal LM, `AutoModelForSequenceClassification` with `num_labels=1` for a reward
model), so a Qwen2 or Mistral checkpoint stays a Qwen2 or Mistral model. The tokenizer follows the same rule
(`load_tokenizer`). Code shipped with a checkpoint is never run: one that needs `trust_remote_code` is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UsageError

logger = logging.getLogger(__name__)

# The load report (checked here instead) and the tensor-parallel plan's note on layers it leaves whole (our models
# declare a plan for the layers worth sharding only; the note concerns no one who loads them).
_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report",
                   "transformers.distributed.tensor_parallel")
_new_head_logged: set[tuple[str, str]] = set()


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report for one load: the mismatches it lists are checked (and reported) here."""
    loggers = [logging.getLogger(name) for name in _REPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def weight_misfit(model, info: dict, new_head: bool = False) -> str | None:
    """What does not fit in a load's `output_loading_info`, as one phrase, or None when everything does."""
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]
    if new_head:
        backbone = f"{model.base_model_prefix}."
        missing = {k for k in missing if k.startswith(backbone)}
        unexpected = {k for k in unexpected if k.startswith(backbone)}
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights of {type(model).__name__} are missing from it ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its weights are not part of {type(model).__name__} "
                     f"({_first(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} weights have other shapes ({_first(mismatched)})")
    return "; ".join(parts) or None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_tokenizer_folder(source, role: str = "tokenizer") -> None:
    """Refuse a local folder without tokenizer files, naming it (transformers would ask to install sentencepiece or
    tiktoken, as if the files were there and a converter missing)."""
    path = Path(str(source)).expanduser()
    if not path.exists() and looks_local(str(source)):
        raise UsageError(f"{role} {source}: no such folder")
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{role} {source}: the folder holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save "
                         "the tokenizer with the model, or give tokenizer_name_or_path")


def has_tokenizer(source) -> bool:
    """Whether a folder (or a Hub id in the local cache) holds tokenizer files."""
    return any(_has_file(source, name) for name in TOKENIZER_FILES)


def looks_local(source: str) -> bool:
    """A name that can only be a path (a Hub id is `name` or `owner/name`)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith("/")


def not_found(source: str, role: str, error: BaseException) -> UsageError:
    """The error for a model that is neither a local folder nor loadable from the Hub."""
    path = Path(source).expanduser()
    if path.exists():
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UsageError(f"cannot load the {role} from {source}: {first}")
    if looks_local(source):
        return UsageError(f"{role} {source}: no such folder")
    return UsageError(f"{role} {source}: no such folder here, and the Hub repo {source} could not be read "
                      f"({type(error).__name__}; offline, or not a model the token can read)")


def _checkpoint_json(source, name: str) -> dict | None:
    """`name` (config.json, tokenizer_config.json) of a folder or of a Hub id in the local cache, or None."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        file = path / name
    else:
        if looks_local(str(source)):
            return None
        from transformers.utils.hub import cached_file

        try:
            found = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            return None
        if found is None:
            return None
        file = Path(found)
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_model_type(source) -> str | None:
    """The `model_type` of a checkpoint's config.json (None when it has none or cannot be read here)."""
    config = _checkpoint_json(source, "config.json")
    return config.get("model_type") if config else None


def _has_file(source, name: str) -> bool:
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return (path / name).is_file()
    if looks_local(str(source)):
        return False
    from transformers.utils.hub import cached_file

    try:
        return cached_file(str(source), name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None
    except (OSError, ValueError):
        return False


def is_llama2_checkpoint(source) -> bool:
    """Whether the tokenizer of `source` is a Llama 2 tokenizer, read with `Llama2Tokenizer` (SentencePiece-exact,
    Meta's chat format): one saved as `Llama2Tokenizer`, one next to a `model_type: llama2` config, or a
    SentencePiece `tokenizer.model` of the Llama family (meta-llama/Llama-2-*-hf) whose chat template, if any, is
    Llama 2's `[INST]` layout. Every other tokenizer (Qwen2, Mistral, Llama 3, a Llama model with another chat
    template) is read by `AutoTokenizer` and lays dialogues out with its own chat template."""
    tok_config = _checkpoint_json(source, "tokenizer_config.json") or {}
    tokenizer_class = str(tok_config.get("tokenizer_class") or "")
    if tokenizer_class == "Llama2Tokenizer" or checkpoint_model_type(source) == "llama2":
        return True
    if tokenizer_class not in ("", "LlamaTokenizer", "LlamaTokenizerFast") or not _has_file(source, "tokenizer.model"):
        return False
    template = tok_config.get("chat_template")
    if template is None and _has_file(source, "chat_template.jinja"):
        return False  # a separate template file: a checkpoint that chose its own layout
    return not template or "[INST]" in str(template)


def ensure_pad_token(tokenizer, order: tuple[str, ...] | None = None):
    """Give a tokenizer without a pad token one, deterministically: the first of `order` it has (with an id in its
    vocabulary); by default `unk` for a Llama 2 tokenizer (as Meta's code pads), else EOS (as TRL does), else `unk`.
    Padding is masked out of every loss and attention, so any id serves causal LMs; reward models need a pad that does
    not end a dialogue (`reward_pad_token`). Mutates and returns it."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    from .chat_format import is_llama2_tokenizer

    if order is None:
        order = ("unk_token", "eos_token") if is_llama2_tokenizer(tokenizer) else ("eos_token", "unk_token")
    for name in order:
        if getattr(tokenizer, name, None) is not None and getattr(tokenizer, f"{name}_id", None) is not None:
            tokenizer.pad_token = getattr(tokenizer, name)
            return tokenizer
    names = " or ".join(name.removesuffix("_token") for name in order)
    raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}: it has no "
                     f"pad, {names} token to pad batches with; set pad_token in its tokenizer_config.json")


def _reward_pad(tokenizer) -> str:
    from .chat_format import chat_format_for

    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]
    last = chat_format_for(tokenizer).encode(probe).input_ids[-1]
    for name in ("pad_token", "unk_token", "eos_token", "bos_token"):
        token = getattr(tokenizer, name, None)
        if token is not None and tokenizer.convert_tokens_to_ids(token) != last:
            return token
    raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}: none of its "
                     "pad, unk, EOS and BOS tokens can pad reward-model inputs (each ends a dialogue); set a distinct "
                     "pad_token in its tokenizer_config.json")


def reward_pad_token(tokenizer) -> int:
    """Set the pad token a reward model reads around, and return its id. transformers' sequence-classification heads
    score the rightmost token that is not `config.pad_token_id`, so the pad must never be the last token of a
    dialogue (Llama 2 and Mistral end every answer with EOS): the first of the tokenizer's pad, unk, EOS and BOS that
    is not the last token of a probe dialogue in the tokenizer's chat format. For Llama 2 this is its rule (`unk`
    whenever pad is unset or EOS)."""
    tokenizer.pad_token = _reward_pad(tokenizer)
    return tokenizer.pad_token_id


def reward_pad_id(model, tokenizer) -> int:
    """The id to pad a reward model's inputs with, the tokenizer left as it is: the model config's `pad_token_id`
    (the id its head skips when it looks for the last real token), else the choice of `reward_pad_token`, which is
    written into the config of a transformers head (ours, `Llama2ForRewardModel`, reads the attention mask)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "pad_token_id", None) is not None:
        return config.pad_token_id
    pad = tokenizer.convert_tokens_to_ids(_reward_pad(tokenizer))
    if getattr(config, "model_type", None) != "llama2":
        config.pad_token_id = pad
    return pad


def load_tokenizer(name_or_path):
    """The tokenizer saved with a model (or a tokenizer folder / Hub id): `Llama2Tokenizer` for a Llama 2 checkpoint
    (`is_llama2_checkpoint`), `AutoTokenizer` for any other, never running code shipped with it. A tokenizer without a
    pad token gets one (`ensure_pad_token`: `unk` for Llama 2, else EOS)."""
    check_tokenizer_folder(name_or_path)
    source = str(name_or_path)
    if is_llama2_checkpoint(source):
        from .tokenization_llama2 import Llama2Tokenizer as cls
    else:
        from transformers import AutoTokenizer as cls
    try:
        tokenizer = cls.from_pretrained(source, **({} if cls.__name__ == "Llama2Tokenizer" else
                                                  {"trust_remote_code": False}))
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UsageError(f"tokenizer {source}: it needs code shipped with the checkpoint (trust_remote_code), "
                             "which is never run here; give a tokenizer transformers can read") from None
        raise not_found(source, "tokenizer", e) from None
    except OSError as e:
        raise not_found(source, "tokenizer", e) from None
    return ensure_pad_token(tokenizer)


def family_class(cls, source, kwargs: dict):
    """The class that loads `source` for the role of `cls`: `cls` itself for a `model_type: llama2` checkpoint (or
    one whose config cannot be read here), else the Auto class of the same role: `AutoModelForCausalLM` for a causal
    LM, `AutoModelForSequenceClassification` for a sequence classifier, with `num_labels=1` (set in `kwargs`) for a
    reward model. Other classes are kept."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel, Llama2ForSequenceClassification

    model_type = checkpoint_model_type(source)
    if model_type in (None, "llama2") or not isinstance(cls, type):
        return cls
    if issubclass(cls, Llama2ForCausalLM):
        return AutoModelForCausalLM
    if issubclass(cls, Llama2ForSequenceClassification):
        if issubclass(cls, Llama2ForRewardModel):
            kwargs["num_labels"] = 1
        return AutoModelForSequenceClassification
    return cls


def load_pretrained(cls, source: str, role: str, *, new_head: bool = False, **kwargs):
    """`cls.from_pretrained(source, **kwargs)` for the model playing `role` ("policy", "safety reward model", ...),
    refusing (`UsageError`) a checkpoint whose weights do not all fit `cls`; see the module docstring. A source that
    is neither a folder nor a loadable Hub id is a `UsageError` too."""
    source = str(source)
    cls = family_class(cls, source, kwargs)
    if cls.__name__.startswith("Auto"):
        kwargs.setdefault("trust_remote_code", False)  # refused below in one line, never asked on stdin
    try:
        with _quiet_load_report():
            model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    except RuntimeError as e:  # size mismatches, conversion errors: transformers raises after its report
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{role} {source}: its weights do not fit {cls.__name__} ({first})") from None
    except OSError as e:  # no such folder / repo, offline
        raise not_found(source, role, e) from None
    except ValueError as e:  # huggingface_hub's repo-id validation of a name that is not a folder
        if "trust_remote_code" in str(e):
            raise UsageError(f"{role} {source}: it needs code shipped with the checkpoint (trust_remote_code), which "
                             "is never run here; give a checkpoint of a family transformers knows") from None
        if Path(source).expanduser().exists():
            raise
        raise not_found(source, role, e) from None
    misfit = weight_misfit(model, info, new_head)
    if misfit:
        raise UsageError(f"{role} {source}: not a checkpoint of {type(model).__name__}: {misfit}. Give the {role} a "
                         f"checkpoint of that kind")
    fresh = sorted(k for k in info.get("missing_keys") or () if not k.startswith(f"{model.base_model_prefix}."))
    if new_head and fresh and (source, role) not in _new_head_logged:
        _new_head_logged.add((source, role))
        logger.info("%s %s: the decoder of this checkpoint starts the %s; its head (%s) is new", role, source, role,
                    _first(fresh))
    return model


__all__ = ["check_tokenizer_folder", "checkpoint_model_type", "ensure_pad_token", "family_class",
           "has_tokenizer", "is_llama2_checkpoint", "load_pretrained", "load_tokenizer", "looks_local", "not_found", "reward_pad_id",
           "reward_pad_token", "weight_misfit"]

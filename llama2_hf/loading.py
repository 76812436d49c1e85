"""Loading a model for the role a stage gives it, refusing weights that do not fit.

transformers' `from_pretrained` loads any checkpoint into any class: weights the class expects but the checkpoint
lacks are initialised at random, weights it does not expect are dropped, and a load report is printed. A causal LM
given as a reward model then scores with a random head, and a checkpoint whose layers are named differently trains
as a random model, both with exit code 0. Here every missing or unexpected weight is an error naming the folder, the
role and the first names, raised before any work.

A new head is allowed only where a stage documents it (`new_head=True`: a reward model or critic started from a
chat model's decoder): the backbone must then load in full, and only weights outside it may be missing (the new
head) or unused (the old one).
"""

from __future__ import annotations

import contextlib
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


def load_tokenizer(name_or_path):
    """The Llama 2 tokenizer saved with a model (or a tokenizer folder / Hub id); padding uses `unk` when the
    tokenizer has no pad token (its positions are masked out of every loss and attention)."""
    check_tokenizer_folder(name_or_path)
    from .tokenization_llama2 import Llama2Tokenizer

    try:
        tokenizer = Llama2Tokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise not_found(str(name_or_path), "tokenizer", e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def load_pretrained(cls, source: str, role: str, *, new_head: bool = False, **kwargs):
    """`cls.from_pretrained(source, **kwargs)` for the model playing `role` ("policy", "safety reward model", ...),
    refusing (`UsageError`) a checkpoint whose weights do not all fit `cls`; see the module docstring. A source that
    is neither a folder nor a loadable Hub id is a `UsageError` too."""
    source = str(source)
    try:
        with _quiet_load_report():
            model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    except RuntimeError as e:  # size mismatches, conversion errors: transformers raises after its report
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{role} {source}: its weights do not fit {cls.__name__} ({first})") from None
    except OSError as e:  # no such folder / repo, offline
        raise not_found(source, role, e) from None
    except ValueError as e:  # huggingface_hub's repo-id validation of a name that is not a folder
        if Path(source).expanduser().exists():
            raise
        raise not_found(source, role, e) from None
    misfit = weight_misfit(model, info, new_head)
    if misfit:
        raise UsageError(f"{role} {source}: not a checkpoint of {cls.__name__}: {misfit}. Give the {role} a "
                         f"checkpoint of that kind")
    fresh = sorted(k for k in info.get("missing_keys") or () if not k.startswith(f"{model.base_model_prefix}."))
    if new_head and fresh and (source, role) not in _new_head_logged:
        _new_head_logged.add((source, role))
        logger.info("%s %s: the decoder of this checkpoint starts the %s; its head (%s) is new", role, source, role,
                    _first(fresh))
    return model


__all__ = ["check_tokenizer_folder", "load_pretrained", "load_tokenizer", "looks_local", "not_found",
           "weight_misfit"]

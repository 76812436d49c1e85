"""Settings shared by all tasks, the result type of a task, and loading of the models a protocol needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..loading import load_pretrained
from ..loading import load_tokenizer as _load_checkpoint_tokenizer
from .prompts import chat_prompt, template_chat_prompt

logger = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """What every task runner needs besides the model: data source, batching, chat format, seeding."""

    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass / generate call."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is available."})
    limit: int | None = field(default=None, metadata={
        "help": "First N examples per task (per MMLU subject, per ToxiGen group), as lm-eval --limit."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Local benchmark files laid out as llama2_hf.evaluation.data describes; unset: the Hub datasets."})
    chat: bool = field(default=False, metadata={"help": "Wrap every prompt in the Llama 2-Chat format."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System prompt of the chat format ('default': Llama 2-Chat's release-time prompt)."})
    max_length: int | None = field(default=None, metadata={
        "help": "Context length; unset: the model's (lm-eval's rule)."})
    seed: int = field(default=1234, metadata={"help": "Seeds sampling (TruthfulQA, ToxiGen, GSM8K maj@k) and the "
                                                      "random TruthfulQA primer."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    device: str | None = field(default=None, metadata={
        "help": "Torch device of the judges / classifier; unset: the evaluated model's."})
    # (rank, world size) of a launch: each task evaluates only this rank's contiguous share of its examples.
    shard: tuple = field(default=(0, 1), init=False, repr=False, compare=False)
    # A `sampling.Sampler` on an engine over the evaluated weights (vLLM): generation tasks sample with it,
    # log-likelihood tasks keep using the PyTorch model.
    sampler: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")

    def take(self, rows: list) -> list:
        return rows[: self.limit] if self.limit is not None else rows

    @property
    def whole(self) -> bool:
        """True when this process evaluates every example (no launch, or one process)."""
        return self.shard[1] == 1

    def my_share(self, rows: list) -> list[tuple[int, object]]:
        """`(position, row)` of this rank's contiguous share of `rows` (all of them in a single process)."""
        rank, world = self.shard
        start, stop = len(rows) * rank // world, len(rows) * (rank + 1) // world
        return [(i, rows[i]) for i in range(start, stop)]


@dataclass
class ChatOptions:
    """Per-task chat settings; None falls back to the run's `RunSettings.chat` / `system_prompt`."""

    chat: bool | None = None
    system_prompt: str | None = None

    def resolve(self, settings: RunSettings) -> tuple[bool, str | None]:
        chat = settings.chat if self.chat is None else self.chat
        system = self.system_prompt if self.system_prompt is not None else settings.system_prompt
        if system is not None and not chat:
            raise ValueError("a system prompt needs the chat format: set chat=True (CLI --chat)")
        return chat, system


@dataclass
class TaskResult:
    """`metrics`: name -> value (fractions in [0, 1]); `samples`: one JSON-able dict per evaluated example.

    Under a launch a rank evaluates a share: `positions` are its samples' places among all `total` examples of the
    task (None: `range(len(samples))`), and `metrics` is empty until the shares are merged (`api.task_metrics`)."""

    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    positions: list[int] | None = None
    total: int | None = None


def format_context(prompt: str, chat: bool, system_prompt: str | None, tokenizer=None) -> str:
    """The task prompt, as one user turn of the chat format when `chat`: Llama 2-Chat's `[INST]` text
    (`prompts.chat_prompt`) for a Llama 2 tokenizer (or none given), the tokenizer's own chat template
    (`prompts.template_chat_prompt`) for any other. Without `chat` the plain few-shot text, whatever the model."""
    if not chat:
        return prompt
    from ..chat_format import is_llama2_tokenizer

    if tokenizer is None or is_llama2_tokenizer(tokenizer):
        return chat_prompt(prompt, system_prompt)
    return template_chat_prompt(tokenizer, prompt, system_prompt)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a checkpoint, read as the training stages read it (`llama2_hf.loading.load_tokenizer`):
    `Llama2Tokenizer` (SentencePiece-exact ids; transformers' own conversion is not exact) for a Llama 2 checkpoint
    (`loading.is_llama2_checkpoint`: Meta's Llama 2 tokenizer, a `model_type: llama2` folder), `AutoTokenizer` for any
    other family (Qwen2, Mistral, a Llama with another template), never running code shipped with it. Its pad token,
    when it had none: UNK for Llama 2 (lm-eval's choice), EOS for the others."""
    return _load_checkpoint_tokenizer(name_or_path)


def resolve_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {['auto', *names]}, got {dtype!r}")
    return names[dtype]


def check_model_source(name_or_path: str, role: str, hint: str = "") -> None:
    """Fail now, before any generation, when the model `role` needs cannot be loaded: a missing local folder, or a
    Hub id that is neither in the local cache nor reachable (offline). Only `config.json` is resolved."""
    from pathlib import Path

    from transformers.utils.hub import cached_file

    from ..runner import UsageError

    source = str(name_or_path)
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.suffix or source.count("/") > 1
    if path.exists() or looks_local:
        if not (path / "config.json").is_file():
            raise UsageError(f"{role} {source}: no such model folder (no config.json){hint}")
        return
    try:
        cached_file(source, "config.json")
    except Exception as e:  # noqa: BLE001 - OSError, HTTP and offline errors alike: all mean "cannot load it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{role} {source!r} cannot be loaded (not in the local Hub cache and the Hub is not "
                         f"reachable: {reason}){hint}") from None


def load_model(name_or_path: str, kind: str = "causal_lm", device: str | None = None, dtype="auto"):
    """A causal LM (`kind="causal_lm"`) or sequence classifier (`"classifier"`) in eval mode on `device`.

    Weights load through `from_pretrained` (safetensors, or `torch.load(weights_only=True)`); remote code is never
    trusted: Llama 2 checkpoints of this package load through the Auto classes it registers.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .. import Llama2Config  # noqa: F401  (importing the package registers model_type "llama2")

    classes = {"causal_lm": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification}
    if kind not in classes:
        raise ValueError(f"kind must be one of {list(classes)}, got {kind!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    logger.info("loading %s %s on %s", kind, name_or_path, device)
    role = {"causal_lm": "model", "classifier": "classifier"}[kind]
    model = load_pretrained(classes[kind], name_or_path, role, dtype=resolve_dtype(dtype))
    return model.to(device).eval()


def ensure_pad_token(tokenizer) -> None:
    """Batching needs a pad id: use UNK as lm-eval does, else EOS, when the tokenizer has none
    (`loading.ensure_pad_token` in lm-eval's order; a token counts only when it has an id). Mutates it."""
    from ..loading import ensure_pad_token as pad_with

    pad_with(tokenizer, ("unk_token", "eos_token"))



"""What a command prints before its answer: library notices that do not concern our users are dropped at the logger
that emits them, and the progress bars of the libraries (weight loading and saving, dataset maps, Hub transfers)
follow the command's `--progress`.

Each dropped notice is matched by its logger and the start of its message, so every other record of the same library
still reaches the console: nothing is silenced by level or by a global warnings filter.
"""

from __future__ import annotations

import logging

# logger name -> starts of the messages that say nothing a user of this package can act on
LIBRARY_NOTICES: dict[str, tuple[str, ...]] = {
    # Printed when bitsandbytes is imported (peft imports it) on a CPU with AVX512-bf16: an optional Hub kernel for
    # 4-bit matmuls is missing; bitsandbytes falls back to its built-in kernel, and 4-bit loading works either way.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Printed on stdout when accelerate imports DeepSpeed (to unwrap a model) on a machine without a GPU.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def drop_library_notices() -> None:
    """Attach the `LIBRARY_NOTICES` filters to their loggers (idempotent; the libraries need not be imported yet,
    so the filters are in place before the import that prints)."""
    for name, starts in LIBRARY_NOTICES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in log.filters):
            log.addFilter(_DropNotices(starts))


def library_progress(enabled: bool) -> None:
    """Turn the progress bars of transformers, datasets and huggingface_hub on or off (our own bars and the
    Trainer's step bar have their own switches: `--progress`, `--disable_tqdm`)."""
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    if enabled:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
        hub_utils.enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        hub_utils.disable_progress_bars()


def align_pad_token(model, tokenizer) -> None:
    """Give the model's config (and generation config) the tokenizer's pad token when they have none, as the Trainer
    would at `train()`, with a warning: we chose that pad token (`unk`, masked out of every loss and attention), so
    the warning would ask the user about our own choice."""
    config = model.config.get_text_config()
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or getattr(config, "pad_token_id", None) is not None:
        return
    config.pad_token_id = pad
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = pad

"""`llama2-hf push`: upload a stage's model, reward model, adapter or tokenizer to the Hub with a model card.

    llama2-hf push --model_name_or_path out/ppo --repo_id me/llama-2-7b-chat-ppo
    llama2-hf push --model_name_or_path out/rm-safety --repo_id me/rm --dry_run true --output_dir out/push-rm

Input: a folder written by `save_pretrained`, or the folder of a stage that saved a model (its `model` output). The
card (stage, data with hashes, hyperparameters, evaluation, versions, base model followed through the run records)
is built from the folder's `run.json` (`llama2_hf.hub`). A model of another family (Qwen2, Mistral, ...) is
uploaded as it is, with a card naming its stage and family and no license (`hub.family_of`; the base model's
license applies: set `license:` in the card before publishing); remote code is added for `model_type: llama2` only.
The token is `hub_token`, else `HF_TOKEN` or the stored login; it is never written to a record. Under a launch only
rank 0 uploads. With `output_dir`, the generated card and a `run.json` holding the commit URL are written there, and
a rerun with the same arguments returns that record without uploading again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..hub import STAGE_ALIASES, STAGES, collect_upload, push_to_hub
from ..runner import (
    RunRecord, Stage, StageRun, UsageError, distributed_state, library_versions, resolved_args, stage_output
)

logger = logging.getLogger(__name__)


@dataclass
class PushArguments:
    """What to upload, where, and how the card describes it."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Folder to upload (written by save_pretrained), or a stage's output folder."})
    repo_id: str | None = field(default=None, metadata={
        "help": "Target repository 'namespace/name' (created if it does not exist)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private (ignored if it exists)."})
    hub_token: str | None = field(default=None, metadata={
        "help": "Hub token with write access (default: $HF_TOKEN or the stored login; prefer those: a token on the "
                "command line shows in the process list). Never recorded."})
    stage: str | None = field(default=None, metadata={
        "help": f"Pipeline stage named in the card, one of {', '.join(STAGES)} (or a command name such as "
                "train-rm); default: the record's stage, else guessed from config.json."})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the base model for the card (default: followed through the run records)."})
    commit_message: str | None = field(default=None, metadata={
        "help": "Commit summary (default: 'Upload <stage> with llama2_hf')."})
    model_card: bool = field(default=True, metadata={
        "help": "Generate README.md (false: upload the folder's own README.md)."})
    dry_run: bool = field(default=False, metadata={
        "help": "List the files and write the card to output_dir (when given); upload nothing."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Optional folder for the generated card (README.md) and this push's run.json."})

    def __post_init__(self):
        known = set(STAGES) | set(STAGE_ALIASES)
        if self.stage is not None and self.stage not in known:
            raise ValueError(f"stage must be one of {sorted(known)}, got {self.stage!r}")


def main(args: PushArguments) -> RunRecord:
    from huggingface_hub.errors import HfHubHTTPError

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not args.model_name_or_path or not args.repo_id:
        raise UsageError("model_name_or_path and repo_id are required")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError:
        raise UsageError(f"repo_id {args.repo_id!r} is not a Hub repo id: expected `owner/name` (letters, digits, "
                         "'-', '_' and '.')") from None
    values = resolved_args(args)
    values.pop("hub_token")  # a secret: never in run_args.json / run.json
    state = distributed_state()  # under a launch one process uploads
    run = StageRun("push", args.output_dir, values) if args.output_dir else None
    if run is not None and run.done:
        return run.record
    folder = Path(stage_output(args.model_name_or_path, "model"))
    files = collect_upload(folder, args.repo_id, stage=args.stage, base_model=args.base_model,
                           model_card=args.model_card)
    card = files.get("README.md") if isinstance(files.get("README.md"), bytes) else None
    metrics = {"files": len(files), "dry_run": args.dry_run}
    if state.is_main_process and args.dry_run:
        logger.info("would upload to %s:\n%s", args.repo_id, "\n".join(
            f"  {path}  ({'generated' if isinstance(src, bytes) else 'from folder'})" for path, src in files.items()))
        if card is not None:  # a page of Markdown: read it in a file, not scrolled past on the console
            where = (f"written to {Path(args.output_dir) / 'README.md'}" if args.output_dir else
                     "give --output_dir to write it to <output_dir>/README.md")
            logger.info("model card: %d lines, %s", card.decode().count("\n") + 1, where)
    elif state.is_main_process:
        try:
            metrics["commit_url"] = push_to_hub(folder, args.repo_id, stage=args.stage, base_model=args.base_model,
                                                private=args.private or None, token=args.hub_token,
                                                commit_message=args.commit_message, model_card=args.model_card)
        except HfHubHTTPError as e:  # 401 bad token, 403 no write access, 404 unknown namespace, ...
            raise UsageError(f"the Hub refused the upload to {args.repo_id}: {e}") from None
        logger.info("uploaded %s", metrics["commit_url"])
    if run is None:
        return RunRecord(stage="push", args=values, metrics=metrics, versions=library_versions())
    if card is not None and state.is_main_process:
        (Path(args.output_dir) / "README.md").write_bytes(card)
        run.outputs["card"] = "README.md"
    run.add_input("model", folder)
    run.metrics.update(metrics)
    return run.finish()


STAGE = Stage("push", "upload a model, tokenizer or reward model to the Hub with a model card",
              (PushArguments,), main)

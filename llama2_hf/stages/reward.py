"""`llama2-hf train-rm`: a helpfulness or safety reward model with the margin ranking loss (paper §3.2.2).

    llama2-hf train-rm --model_name_or_path out/sft --train_file data/helpful.jsonl --output_dir out/rm --use_cpu true
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m llama2_hf.cli train-rm \\
        --config recipes/reward/llama2-7b.yaml

Inputs: a causal LM of any transformers family (the SFT model: the RM gets a new scalar head, as the sequence
classifier of its own family unless it is `model_type: llama2`) or a reward model (training continues), and
preference files (`llama2_hf.data` schema). `data_mix` builds the paper's training mixes from `train_file` and
`mix_file`. Output: the reward model (and its tokenizer) at the root of `output_dir`, Trainer checkpoints beside it,
and `run.json` (with the held-out metrics when `eval_file` is given). A rerun in a folder with checkpoints resumes
from the newest one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import ModelConfig

from ..preference_data import load_preference_files, mix_helpfulness_rm_data, mix_safety_rm_data
from ..modeling_llama2 import Llama2ForRewardModel
from ..runner import RunRecord, Stage, StageRun, UsageError, resolved_args, stage_output
from ..trainers.reward import Llama2RewardConfig, Llama2RewardTrainer
from .common import load_model, load_tokenizer, peft_config
from .training import finish_training, run_training

logger = logging.getLogger(__name__)

DATA_MIXES = ("none", "helpfulness", "safety")


@dataclass
class RewardDataArguments:
    """Data of the reward-model stage."""

    train_file: list[str] = field(default_factory=list, metadata={
        "help": "Preference data: .jsonl/.json/.parquet files (prompt, chosen, rejected, rating, optional "
                "safety_label / is_safety_prompt), Hub dataset names, or folders of stages that wrote them."})
    eval_file: list[str] | None = field(default=None, metadata={
        "help": "Held-out preference data, scored after training (accuracy per rating, Table 8 layout)."})
    mix_file: list[str] | None = field(default=None, metadata={
        "help": "Preference data sampled into the training mix (see data_mix)."})
    data_mix: str = field(default="none", metadata={
        "help": "Training mix of paper §3.2.2: 'none' (train_file only), 'helpfulness' (all of train_file plus as "
                "many pairs sampled from mix_file) or 'safety' (train_file : mix_file = 90 : 10).",
        "choices": list(DATA_MIXES)})
    allow_unrated: bool = field(default=False, metadata={
        "help": "Accept pairs without a rating (margin 0; HH-RLHF transcripts or TRL conversations). Off: a missing "
                "rating is an error naming the file and line."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})

    def __post_init__(self):
        if self.data_mix not in DATA_MIXES:
            raise ValueError(f"data_mix must be one of {DATA_MIXES}, got {self.data_mix!r}")


def load_reward_model(model_args: ModelConfig):
    """The model to train: a reward model folder as it is, or a causal LM whose decoder starts a reward model with a
    freshly initialised scalar head (as `reward_model_from_causal_lm`; loading through `from_pretrained` keeps
    quantized and sharded loading working). The decoder must load in full: only the head may be new (logged once).
    A checkpoint that is not `model_type: llama2` becomes its own family's sequence classifier (`num_labels=1`)."""
    model = load_model(Llama2ForRewardModel, model_args, role="reward model", new_head=True, num_labels=1)
    model.config.architectures = [type(model).__name__]
    return model


def load_training_data(script_args: RewardDataArguments, config: Llama2RewardConfig):
    """Every preference input read and checked (train, mix and eval files), then the training mix; nothing is left
    to fail after training has started."""
    if not script_args.train_file:
        raise UsageError("train_file is required")
    if script_args.data_mix != "none" and not script_args.mix_file:
        raise UsageError(f"data_mix={script_args.data_mix!r} needs mix_file (the data sampled into the mix)")
    if script_args.data_mix == "none" and script_args.mix_file:
        raise UsageError("mix_file is given but data_mix is 'none': set data_mix to 'helpfulness' or 'safety'")
    paths = {name: [stage_output(p, "data") for p in getattr(script_args, f"{name}_file") or []]
             for name in ("train", "mix", "eval")}
    loaded = {name: load_preference_files(p, config.on_invalid, script_args.allow_unrated) if p else (None, None)
              for name, p in paths.items()}
    for name, (dataset, report) in loaded.items():
        if dataset is not None and len(dataset) == 0:
            raise UsageError(f"no {name} preference pairs left after on_invalid={config.on_invalid!r}: dropped "
                             f"{dict(report.dropped)} of {report.total}")
    train, mix, evaluation = (loaded[n][0] for n in ("train", "mix", "eval"))
    if script_args.data_mix == "helpfulness":
        train = mix_helpfulness_rm_data({"train": train}, {"mix": mix}, seed=config.seed)
    elif script_args.data_mix == "safety":
        train = mix_safety_rm_data({"train": train}, {"mix": mix}, seed=config.seed)
    reports = {name: report for name, (_, report) in loaded.items() if report is not None}
    return paths, train, evaluation, reports


def main(script_args: RewardDataArguments, config: Llama2RewardConfig, model_args: ModelConfig) -> RunRecord:
    run = StageRun("train-rm", config.output_dir, resolved_args(script_args, config, model_args))
    if run.done:
        return run.record
    paths, train, evaluation, load_reports = load_training_data(script_args, config)
    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path)
    for name, group in paths.items():
        for i, p in enumerate(group):
            run.add_input(f"{name}_{i}", p)
    run.add_input("model", model_args.model_name_or_path)

    model = load_reward_model(model_args)
    trainer = Llama2RewardTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                                  processing_class=tokenizer, peft_config=peft_config(model_args))
    for name in ("train", "eval"):
        if name in trainer.data_reports and trainer.data_reports[name].kept == 0:
            raise UsageError(f"no {name} preference pairs left after on_overlength={config.on_overlength!r} / "
                             f"on_invalid={config.on_invalid!r}: {dict(trainer.data_reports[name].dropped)}")
    result = run_training(trainer)
    if evaluation is not None:
        run.metrics["eval"] = trainer.evaluate()
    run.metrics["loaded"] = {name: {"total": r.total, "kept": r.kept, "dropped": dict(r.dropped)}
                             for name, r in load_reports.items()}
    return finish_training(run, trainer, tokenizer, result)


STAGE = Stage("train-rm", "helpfulness or safety reward model with the margin ranking loss (paper §3.2.2)",
              (RewardDataArguments, Llama2RewardConfig, ModelConfig), main)

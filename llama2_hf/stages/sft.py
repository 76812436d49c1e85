"""`llama2-hf sft`: supervised fine-tuning with answer-only loss (paper §3.1).

    llama2-hf sft --model_name_or_path out/pretrain --train_file data/sft.jsonl --output_dir out/sft --use_cpu true
    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m llama2_hf.cli sft --config recipes/sft/llama2-7b.yaml

Inputs: a causal LM of any transformers family (Hub id or folder; a `model_type: llama2` checkpoint trains in Meta's
Llama 2-Chat format, any other in its tokenizer's chat template, and is saved as its own family) and SFT rows (`llama2_hf.data` schema), or the folder of a stage that wrote
SFT data (`gatt`, `distill`, `rejection-sample`: their `data` output). Output: the fine-tuned model (and its
tokenizer) in `output_dir`, Trainer checkpoints beside it, and `run.json`. A rerun in a folder with checkpoints
resumes from the newest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig

from ..data import load_data_files, sft_messages
from ..modeling_llama2 import Llama2ForCausalLM
from ..runner import RunRecord, Stage, StageRun, UsageError, resolved_args, stage_output
from ..trainers.sft import Llama2SFTConfig, Llama2SFTTrainer
from .common import load_model, load_tokenizer, peft_config
from .training import finish_training, run_training


@dataclass
class SFTArguments:
    """Data of the SFT stage."""

    train_file: list[str] = field(default_factory=list, metadata={
        "help": "SFT data: .jsonl/.json/.parquet files (rows with 'messages', or 'prompt' + 'answer'), Hub dataset "
                "names, or folders of stages that wrote SFT data."})
    eval_file: list[str] | None = field(default=None, metadata={"help": "Held-out SFT data in the same schema."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})


def main(script_args: SFTArguments, config: Llama2SFTConfig, model_args: ModelConfig) -> RunRecord:
    run = StageRun("sft", config.output_dir, resolved_args(script_args, config, model_args))
    if run.done:
        return run.record
    if not script_args.train_file:
        raise UsageError("train_file is required")
    # Every input is read and checked before the model is loaded (a bad eval row must not cost a training run).
    train_paths = [stage_output(p, "data") for p in script_args.train_file]
    eval_paths = [stage_output(p, "data") for p in script_args.eval_file or []]
    train = load_data_files(train_paths, sft_messages, config.on_invalid)
    evaluation = load_data_files(eval_paths, sft_messages, config.on_invalid) if eval_paths else None
    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path)
    for i, p in enumerate(train_paths):
        run.add_input(f"train_{i}", p)
    for i, p in enumerate(eval_paths):
        run.add_input(f"eval_{i}", p)
    run.add_input("model", model_args.model_name_or_path)

    model = load_model(Llama2ForCausalLM, model_args, role="model to fine-tune")
    trainer = Llama2SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                               processing_class=tokenizer, peft_config=peft_config(model_args))
    if len(trainer.train_dataset) == 0:
        raise UsageError(f"no SFT rows left to train on after on_invalid={config.on_invalid!r} / on_overlength="
                         f"{config.on_overlength!r}: {trainer.data_reports['train'].dropped}")
    result = run_training(trainer)
    return finish_training(run, trainer, tokenizer, result)


STAGE = Stage("sft", "supervised fine-tuning with answer-only loss (paper §3.1)",
              (SFTArguments, Llama2SFTConfig, ModelConfig), main)

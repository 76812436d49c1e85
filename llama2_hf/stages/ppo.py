"""`llama2-hf ppo`: PPO against the safety-gated reward with a per-token KL penalty to the initial policy (§3.2.3).

    llama2-hf ppo --model_name_or_path out/rs --prompts_file data/prompts.jsonl \
        --helpfulness_reward_model out/rm-helpful --safety_reward_model out/rm-safety --output_dir out/ppo
    accelerate launch --config_file recipes/accelerate/fsdp.yaml \
        -m llama2_hf.cli ppo --config recipes/ppo/llama2-7b.yaml

Inputs: the policy (a causal LM folder, e.g. the `rejection-sample` output, or a Hub id), prompt rows
(`llama2_hf.data.prompt_row` schema) or the folder of a stage that wrote them, and the reward models
(`RewardArguments`). Output: the policy at the root of `output_dir` (`"model": "."`, with its tokenizer), the critic
in `value_model/`, `metrics.jsonl` (one row per logged iteration), `checkpoint-*` folders and `run.json`.

Precision: the policy and critic are loaded in float32 (master weights and AdamW states); `bf16: true` is autocast
compute. Distribution: under `accelerate launch` every rank rolls out its share of the batch; an FSDP accelerate
config shards the policy, critic and reference with FSDP2 per decoder layer (on CPU too), other configs replicate
them and average gradients; the reward models are replicated (see `Llama2PPOTrainer`).

Sampling: `PPOSampling` (temperature, top-p, length, prompt batch, backend). The vLLM backend rolls out with a vLLM
engine, one per process, started after every input is checked; before each rollout the policy's current weights (LoRA merged, FSDP shards
gathered) are pushed to it, so rollouts never come from stale weights (`time/weight_sync` in the metrics).

Restart: a folder whose run finished with the same arguments returns its record; an interrupted run with the same
arguments resumes from its newest complete checkpoint (same number of processes) and cuts `metrics.jsonl` back to
it; other arguments are refused, naming the differences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import ModelConfig

from ..data import load_prompts
from ..loading import load_pretrained
from ..modeling_llama2 import Llama2ForCausalLM, Llama2ForRewardModel
from ..runner import RUN_ARGS, RUN_RECORD, RunRecord, Stage, StageRun, UsageError, resolved_args, stage_output
from ..sampling import open_sampler
from ..trainers.ppo_parts import _reward_model_of
from ..trainers.ppo import METRICS_FILE, Llama2PPOConfig, Llama2PPOTrainer, PPOSampling, latest_checkpoint
from .common import RewardArguments, check_prompt_lengths, load_model, load_reward, load_tokenizer, peft_config

logger = logging.getLogger(__name__)


@dataclass
class PPOArguments:
    """Data of the PPO stage."""

    prompts_file: list[str] = field(default_factory=list, metadata={
        "help": "Prompts: .jsonl/.json/.parquet files (rows with 'prompt' text or messages, or 'messages' ending "
                "with a user turn; optional bool 'is_safety_prompt' and 'id'), Hub dataset names, or folders of "
                "stages that wrote prompt data."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})


def _refuse_foreign_folder(output_dir: Path) -> None:
    """A folder with PPO checkpoints or metrics but no record of the run that wrote them is not ours to resume or
    to overwrite (its arguments are unknown)."""
    if (output_dir / RUN_RECORD).exists() or (output_dir / RUN_ARGS).exists():
        return
    leftovers = sorted(p.name for p in [*output_dir.glob("checkpoint-*"), output_dir / METRICS_FILE] if p.exists())
    if leftovers:
        raise UsageError(f"{output_dir} holds {', '.join(leftovers[:3])} of a run with unknown arguments (no "
                         f"{RUN_ARGS}): choose another output_dir")


def _device(config: Llama2PPOConfig) -> torch.device:
    from accelerate import PartialState

    return torch.device("cpu") if config.use_cpu else PartialState().device


def main(script_args: PPOArguments, config: Llama2PPOConfig, model_args: ModelConfig,
         reward_args: RewardArguments, sampling: PPOSampling | None = None) -> RunRecord:
    sampling = sampling or PPOSampling()
    _refuse_foreign_folder(Path(config.output_dir))
    run = StageRun("ppo", config.output_dir, resolved_args(script_args, config, model_args, reward_args, sampling))
    if run.done:
        return run.record
    if not script_args.prompts_file:
        raise UsageError("prompts_file is required")
    sampling.check_installed()
    # Every input is read and checked before a model is loaded (a bad prompt row must not cost a model load).
    prompt_paths = [stage_output(p, "data") for p in script_args.prompts_file]
    prompts = load_prompts(prompt_paths)
    if not prompts:
        raise UsageError(f"no prompt rows in {', '.join(map(str, prompt_paths))}")
    if config.value_model_name_or_path:
        critic_path = stage_output(config.value_model_name_or_path, "model")
        if str(critic_path).startswith((".", "/")) and not Path(critic_path).exists():
            raise UsageError(f"value_model_name_or_path {critic_path}: no such folder")
    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path)
    check_prompt_lengths(prompts, tokenizer, model_args.model_name_or_path)
    for i, p in enumerate(prompt_paths):
        run.add_input(f"prompts_{i}", p)
    run.add_input("model", model_args.model_name_or_path)
    for name in ("helpfulness_reward_model", "safety_reward_model"):
        run.add_input(name, getattr(reward_args, name))

    device = _device(config)
    reward = load_reward(reward_args, tokenizer, device)
    if not config.value_model_name_or_path and config.value_model_init == "reward_model":
        _reward_model_of(reward, tokenizer)  # an RM of another vocabulary cannot be the critic: refused before loading
    policy = load_model(Llama2ForCausalLM, model_args, role="policy").to(device)
    value_model = None
    if config.value_model_name_or_path:
        value_model = load_pretrained(Llama2ForRewardModel, str(critic_path), "critic", num_labels=1,
                                      dtype=torch.float32).to(device)
        run.add_input("value_model", critic_path)
    resume = latest_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
    # The trainer gives the sampler the policy's weights before every rollout (a vLLM engine may start from the
    # initial weights even on a resume).
    with open_sampler(policy, tokenizer, sampling.sampling_config(), sampling, seed=config.seed) as sampler:
        trainer = Llama2PPOTrainer(config, policy, tokenizer, reward, prompts, value_model=value_model,
                                   peft_config=peft_config(model_args), sampler=sampler)
        history = trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(config.output_dir)
    run.outputs.update({"model": ".", "value_model": "value_model", "metrics": METRICS_FILE})
    run.metrics.update(history[-1] if history else {})
    run.metrics["distributed"] = trainer.memory
    run.metrics["resumed_from"] = resume.name if resume else None
    return run.finish()


STAGE = Stage("ppo", "PPO against the safety-gated reward with a KL penalty to the initial policy (paper §3.2.3)",
              (PPOArguments, Llama2PPOConfig, ModelConfig, RewardArguments, PPOSampling), main)

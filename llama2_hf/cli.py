"""`llama2-hf` command line: one subcommand per pipeline stage, plus the quickstart.

Every stage subcommand parses its flags (or `--config recipe.yaml`) into the stage's dataclasses with TRL's
`TrlParser` and calls the stage's one runner (`llama2_hf.stages`); the same command runs under `accelerate launch`.
A mistake in the input prints one line and exits with code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys

from .stages import STAGES

# commands that are not pipeline stages: name -> ("module:function", help)
OTHER_COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("llama2_hf.quickstart:main", "the whole Llama 2-Chat pipeline on a laptop-sized example"),
    "annotate": ("llama2_hf.annotate:main", "a local web page to compare response pairs (paper §3.2.1); answers "
                 "become preference rows"),
    "plan": ("llama2_hf.plan:main", "memory per GPU of a recipe's stage under DDP, FSDP and ZeRO-3; what to change if it "
             "does not fit"),
    "setup-vllm": ("llama2_hf.sampling.vllm_engine:setup_main", "build vLLM's own environment for the vLLM sampling "
                   "backend (skipped when it exists)"),
}

STAGE_HELP = {
    "convert-meta": "convert Meta's consolidated.*.pth checkpoint to safetensors",
    "pretrain": "causal-LM pretraining on packed text (the base model of the chain)",
    "sft": "supervised fine-tuning with answer-only loss",
    "train-rm": "train a helpfulness or safety reward model (margin ranking loss)",
    "eval-rm": "reward-model accuracy by preference rating (paper Table 8 layout)",
    "rejection-sample": "best-of-K sampling scored by the safety-gated reward, then fine-tuning on the best",
    "ppo": "PPO against the safety-gated reward with a KL penalty",
    "gatt": "Ghost Attention training data (multi-turn sampling with the instruction on every turn)",
    "gatt-eval": "Ghost Attention adherence by turn (paper Table 30 / Figure 28)",
    "gatt-lists": "constraint value lists (hobbies, public figures) written by a chat model, as the paper's (§3.3)",
    "distill": "targeted safety context distillation",
    "refusals": "false-refusal rates on helpfulness prompts and a borderline set",
    "eval": "MMLU, GSM8K, TruthfulQA and ToxiGen (lm-evaluation-harness prompts; the paper's decoding for chat models)",
    "push": "upload a model, tokenizer or reward model to the Hub with a model card",
    "iterate": "iterative RLHF: fresh preferences, both reward models retrained on all data, pooled rejection "
               "sampling, PPO (paper §3.2)",
}
COMMANDS = {**{name: STAGE_HELP[name] for name in STAGES}, **{k: v[1] for k, v in OTHER_COMMANDS.items()}}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llama2-hf <command> [--config recipe.yaml] [--field value ...] [--debug]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "Run `llama2-hf <command> --help` for the arguments of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in COMMANDS:
        from .console import library_progress

        library_progress(False)  # a command with a `--progress` setting turns them back on with it
    if name in STAGES:
        from .stages import cli_main

        return cli_main(name, rest)
    if name in OTHER_COMMANDS:
        module_name, func_name = OTHER_COMMANDS[name][0].split(":")
        return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)
    print(f"llama2-hf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

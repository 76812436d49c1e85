"""`llama2-hf` command line: one subcommand per pipeline stage.

Each subcommand is a `main(argv: list[str] | None = None) -> int` function in its stage module, imported only when
that subcommand runs (so `llama2-hf --help` stays fast and a missing optional dependency affects one command only).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert-meta": ("llama2_hf.convert_meta:main", "convert Meta's consolidated.*.pth checkpoint to safetensors"),
    "demo": ("llama2_hf.demo:main", "build a tiny Llama 2 and tokenizer on the spot, train briefly, generate and chat"),
    "sft": ("llama2_hf.trainers.sft:main", "supervised fine-tuning with answer-only loss"),
    "train-rm": ("llama2_hf.trainers.reward:main", "train a helpfulness or safety reward model (margin ranking loss)"),
    "eval-rm": ("llama2_hf.rm_eval:main", "reward-model accuracy by preference rating (paper Table 8 layout)"),
    "rejection-sample": ("llama2_hf.rejection_sampling:main", "best-of-K sampling scored by the reward"),
    "ppo": ("llama2_hf.trainers.ppo:main", "PPO against the safety-gated reward with a KL penalty"),
    "gatt": ("llama2_hf.gatt:main", "Ghost Attention data generation and evaluation"),
    "distill": ("llama2_hf.safety_distill:main", "targeted safety context distillation"),
    "refusals": ("llama2_hf.refusals:main", "false-refusal rates on helpfulness prompts and a borderline set"),
    "eval": ("llama2_hf.evaluation.cli:main", "MMLU, GSM8K, TruthfulQA and ToxiGen as the paper measures them"),
    "push": ("llama2_hf.hub:main", "upload a model, tokenizer or reward model to the Hub with a model card"),
    "quickstart": ("llama2_hf.quickstart:main", "the whole Llama 2-Chat pipeline on a laptop-sized example"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llama2-hf <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `llama2-hf <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llama2-hf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if "--recipe" in rest or any(a.startswith("--recipe=") for a in rest):
        from .recipes import COMMAND_STAGES, recipe_main

        if name not in COMMAND_STAGES:
            print(f"llama2-hf: {name} takes no --recipe (recipes exist for {sorted(COMMAND_STAGES)})",
                  file=sys.stderr)
            return 2
        return recipe_main(name, rest)
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`llama2-hf eval`: MMLU, GSM8K, TruthfulQA and ToxiGen as the paper measures them."""

from __future__ import annotations

import argparse
import json
import logging

from ..tokenization_llama2 import DEFAULT_SYSTEM_PROMPT
from .api import DEFAULT_TASKS, TASKS, EvalConfig, evaluate_model, markdown_table
from .data import MMLU_SUBJECTS, TOXIGEN_ALL_GROUPS
from .gsm8k import GSM8KConfig
from .mmlu import MMLUConfig
from .toxigen import ToxiGenConfig
from .truthfulqa import TruthfulQAConfig


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2-hf eval", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id of the causal LM to evaluate")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model's)")
    p.add_argument("--tasks", type=_csv, default=list(DEFAULT_TASKS),
                   help=f"comma-separated tasks from {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None,
                   help="first N examples per task (per MMLU subject, per ToxiGen group), as lm-eval --limit")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass / generate call")
    p.add_argument("--data-dir", default=None,
                   help="local data laid out like ../shared/data; without it the Hub datasets are used")
    p.add_argument("--output", default=None,
                   help="results JSON; <stem>.samples.jsonl and <stem>.md are written next to it")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype of the evaluated model")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sampled generations")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    chat = p.add_argument_group("chat models")
    chat.add_argument("--chat", action="store_true", help="wrap every prompt in the Llama 2-Chat format")
    chat.add_argument("--chat-tasks", type=_csv, default=None,
                      help="wrap only these tasks' prompts (mmlu,gsm8k,truthfulqa,toxigen); implies chat for them")
    chat.add_argument("--system-prompt", default=None,
                      help="system prompt of the chat format; 'default' = Llama 2-Chat's release-time prompt")
    mmlu = p.add_argument_group("MMLU")
    mmlu.add_argument("--mmlu-subjects", type=_csv, default=None,
                      help=f"comma-separated subjects (default: all {len(MMLU_SUBJECTS)})")
    mmlu.add_argument("--mmlu-shots", type=int, default=MMLUConfig.num_fewshot, help="few-shot examples")
    mmlu.add_argument("--no-prefix-cache", action="store_true",
                      help="recompute each subject's few-shot prefix for every question (slower, same numbers)")
    gsm = p.add_argument_group("GSM8K")
    gsm.add_argument("--gsm8k-maj-k", type=int, default=GSM8KConfig.maj_k,
                     help="also report maj@k over k sampled chains (0 = off)")
    gsm.add_argument("--gsm8k-maj-temperature", type=float, default=GSM8KConfig.maj_temperature,
                     help="sampling temperature of the maj@k chains")
    gsm.add_argument("--gsm8k-max-new-tokens", type=int, default=GSM8KConfig.max_new_tokens,
                     help="generation length limit")
    tqa = p.add_argument_group("TruthfulQA")
    tqa.add_argument("--truthfulqa-greedy", action="store_true", help="greedy answers instead of T=0.1, top-p 0.9")
    tqa.add_argument("--truth-judge", default=TruthfulQAConfig.truth_judge, help="truthfulness judge (causal LM)")
    tqa.add_argument("--info-judge", default=TruthfulQAConfig.info_judge, help="informativeness judge (causal LM)")
    tqa.add_argument("--truthfulqa-max-new-tokens", type=int, default=TruthfulQAConfig.max_new_tokens,
                     help="answer length limit")
    tox = p.add_argument_group("ToxiGen")
    tox.add_argument("--toxigen-source", choices=["prompts", "annotated"], default=ToxiGenConfig.source,
                     help="demonstration prompt files, or prompts built from the revised annotated subset")
    tox.add_argument("--toxigen-annotated-path", default=None,
                     help="toxiGen.json of microsoft/SafeNLP (default: <data-dir>/toxigen/annotated/toxiGen.json)")
    tox.add_argument("--toxigen-groups", type=_csv, default=None,
                     help=f"comma-separated groups (default: the paper's 13; all: {', '.join(TOXIGEN_ALL_GROUPS)})")
    tox.add_argument("--toxigen-label", choices=["hate", "neutral"], default=ToxiGenConfig.prompt_label,
                     help="hateful or benign prompts")
    tox.add_argument("--toxigen-classifier", default=ToxiGenConfig.classifier,
                     help="sequence classifier scoring the continuations")
    tox.add_argument("--toxigen-toxic-label", type=int, default=ToxiGenConfig.toxic_label,
                     help="classifier label index meaning toxic")
    tox.add_argument("--toxigen-max-new-tokens", type=int, default=ToxiGenConfig.max_new_tokens,
                     help="continuation length limit")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    system = DEFAULT_SYSTEM_PROMPT if args.system_prompt == "default" else args.system_prompt
    chat_tasks = set(args.chat_tasks or [])
    unknown = chat_tasks - {"mmlu", "gsm8k", "truthfulqa", "toxigen"}
    if unknown:
        raise ValueError(f"--chat-tasks: unknown tasks {sorted(unknown)}")
    per_task = {t: dict(chat=True) if t in chat_tasks else {} for t in ("mmlu", "gsm8k", "truthfulqa", "toxigen")}
    if system is not None and chat_tasks and not args.chat:
        for t in chat_tasks:
            per_task[t]["system_prompt"] = system
        system = None
    toxigen_kwargs = {} if args.toxigen_groups is None else {"groups": args.toxigen_groups}
    return EvalConfig(
        batch_size=args.batch_size, limit=args.limit, data_dir=args.data_dir, chat=args.chat, system_prompt=system,
        max_length=args.max_length, seed=args.seed, progress=not args.no_progress, device=args.device,
        mmlu=MMLUConfig(subjects=args.mmlu_subjects, num_fewshot=args.mmlu_shots,
                        share_prefix=not args.no_prefix_cache, **per_task["mmlu"]),
        gsm8k=GSM8KConfig(maj_k=args.gsm8k_maj_k, maj_temperature=args.gsm8k_maj_temperature,
                          max_new_tokens=args.gsm8k_max_new_tokens, **per_task["gsm8k"]),
        truthfulqa=TruthfulQAConfig(greedy=args.truthfulqa_greedy, truth_judge=args.truth_judge,
                                    info_judge=args.info_judge, max_new_tokens=args.truthfulqa_max_new_tokens,
                                    **per_task["truthfulqa"]),
        toxigen=ToxiGenConfig(source=args.toxigen_source, annotated_path=args.toxigen_annotated_path,
                              prompt_label=args.toxigen_label, classifier=args.toxigen_classifier,
                              toxic_label=args.toxigen_toxic_label, max_new_tokens=args.toxigen_max_new_tokens,
                              **toxigen_kwargs, **per_task["toxigen"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        report = evaluate_model(args.model, args.tasks, tokenizer=args.tokenizer, config=config, output=args.output,
                                dtype=args.dtype)
    except ValueError as e:
        parser.error(str(e))
    print(markdown_table(report["results"]))
    print(json.dumps(report["results"]))
    return 0

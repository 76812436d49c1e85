"""`llama2-hf iterate`: the paper's iterative RLHF (§3.2, RLHF-V1..V5) over the stage runners.

    llama2-hf iterate --model_name_or_path out/sft --prompts_file data/prompts.jsonl \\
        --eval_prompts_file data/eval_prompts.jsonl --versions 5 --prompts_per_version 1000 \\
        --annotator judge --judge_helpfulness_model out/rm-helpful --judge_safety_model out/rm-safety \\
        --reward_model_recipe recipes/reward/llama2-7b.yaml --ppo_recipe recipes/ppo/llama2-7b.yaml \\
        --output_dir out/iterate
    llama2-hf iterate ... --annotator page --page_wait_s 3600     # people, through `llama2-hf annotate`
    llama2-hf iterate ... --annotator mypackage.preferences:annotate  # a Python callable annotator(pairs) -> answers

Each version samples pairs for new prompts, has them annotated, retrains both reward models on all the preferences so
far, runs rejection sampling (pooled over the versions) and, in `ppo_versions`, PPO, then measures the win rates and
reward scores; see `llama2_hf.iterate` for the folders, the store and the annotator contract. Restart: every step is a
folder with its own run.json, so a rerun with the same arguments continues where the loop stopped (annotations are
never asked twice); other arguments are refused, naming the differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..iterate import IterateConfig, load_annotator
from ..runner import RunRecord, Stage
from ..sampling import BackendArguments
from .rlhf_loop import iterate


@dataclass
class AnnotatorArguments:
    """Who answers the pairs."""

    annotator: str = field(default="page", metadata={
        "help": "'page' (people, through `llama2-hf annotate`), 'judge' (local reward models) or "
                "'package.module:callable' (a Python annotator(pairs) -> answers, or a class building one)."})
    judge_helpfulness_model: str | None = field(default=None, metadata={
        "help": "annotator=judge: the reward model that picks the better response (folder or train-rm output)."})
    judge_safety_model: str | None = field(default=None, metadata={
        "help": "annotator=judge: the safety reward model that judges safety prompts and labels responses unsafe."})


def main(annotator_args: AnnotatorArguments, config: IterateConfig, backend: BackendArguments | None = None) -> RunRecord:
    annotator = load_annotator(annotator_args.annotator, config.judge_margins, config.page_wait_s,
                               annotator_args.judge_helpfulness_model, annotator_args.judge_safety_model,
                               config.safety_threshold)
    iterate(config, annotator, backend=backend)
    return RunRecord.read(config.output_dir)


STAGE = Stage("iterate", "iterative RLHF: versions of annotation, reward models, rejection sampling and PPO "
              "(paper §3.2)", (AnnotatorArguments, IterateConfig, BackendArguments), main)

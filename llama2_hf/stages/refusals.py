"""`llama2-hf refusals`: false-refusal rates (paper §4.2.3, Fig. 33, Table 41).

    llama2-hf refusals --model_name_or_path out/ppo --prompts_file data/helpful_test.jsonl --output_dir out/refusals
    accelerate launch -m llama2_hf.cli refusals --model_name_or_path out/ppo --prompts_file data/helpful_test.jsonl

Inputs: the chat model, prompt sets (`data.prompt_row` rows; each file is one set named by its stem) and the
borderline set (the shipped one by default, `borderline_file` for your own, `borderline: false` to leave it out).
Every prompt is answered (greedy by default) and each answer is classified by the refusal detector (regular
expressions, or a sequence classifier with `classifier`). Outputs: `responses.jsonl` (set, prompt, response,
refusal per prompt), `refusals.json` (rate per set and the refused answers) and `run.json` (rates as metrics).

Under `accelerate launch` each rank answers its own contiguous share of all prompts into a part file, chunk by
chunk (resumable); rank 0 merges the parts (nothing lost or repeated) and computes the rates.

The vLLM backend (`sampling.BackendArguments`) samples with a vLLM engine, one per process, started after every input
is checked; each chunk's prompts are seeded from the chunk's seed as on the PyTorch backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig

from ..data import load_prompts
from ..loading import load_pretrained, load_tokenizer
from ..refusals import (
    BORDERLINE_PROMPTS_FILE,
    ClassifierRefusalDetector,
    PatternRefusalDetector,
    refusal_rate,
    with_system_prompt,
)
from ..runner import (
    RankParts, RunRecord, Stage, StageRun, UsageError, distributed_state, resolved_args, stage_output,
    write_json_atomic
)
from ..sampling import derive_seed, sampling_arguments
from .sampling import ChatSamplingArguments, chat_sampling, chunks


@dataclass
class RefusalArguments:
    """Inputs, detector and output folder of the `refusals` stage."""

    prompts_file: list[str] = field(default_factory=list, metadata={
        "help": "Helpfulness prompt sets (prompt or messages per row); each file is one set, named by its stem."})
    borderline: bool = field(default=True, metadata={
        "help": "Also measure the borderline set (benign prompts that look adversarial; paper: 210 prompts)."})
    borderline_file: str | None = field(default=None, metadata={
        "help": "Your own borderline prompts (default: the shipped resources/refusals/borderline_prompts.jsonl)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System prompt added to every conversation (the paper's measurement used none)."})
    classifier: str | None = field(default=None, metadata={
        "help": "Sequence-classification refusal classifier (folder or Hub id); default: the regex detector."})
    refusal_label: str = field(default="1", metadata={"help": "Classifier label (index or name) meaning refusal."})
    refusal_threshold: float = field(default=0.5, metadata={"help": "Classifier probability threshold."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id, when it is not saved with the model."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling (unused when greedy)."})
    output_dir: str = field(default="refusals", metadata={
        "help": "Where responses.jsonl, refusals.json and run.json are written."})


RefusalSampling = sampling_arguments(
    "RefusalSampling", "Decoding of the answers: greedy (temperature 0) and 128 new tokens by default; a refusal "
    "shows early.", base=ChatSamplingArguments, max_new_tokens=128, temperature=0.0)


def _detector(args: RefusalArguments):
    if not args.classifier:
        return PatternRefusalDetector()
    from transformers import AutoModelForSequenceClassification

    label: int | str = int(args.refusal_label) if args.refusal_label.isdigit() else args.refusal_label
    try:
        model = load_pretrained(AutoModelForSequenceClassification, args.classifier, "refusal classifier")
        tokenizer = load_tokenizer(args.classifier)
        return ClassifierRefusalDetector(model, tokenizer, refusal_label=label, threshold=args.refusal_threshold)
    except (OSError, ValueError) as err:
        raise UsageError(f"refusal classifier {args.classifier}: {err}") from None


def main(args: RefusalArguments, sampling: RefusalSampling, model_args: ModelConfig) -> RunRecord:
    distributed_state()  # join the launch's ranks before anything reads them
    run = StageRun("refusals", args.output_dir, resolved_args(args, sampling, model_args))
    if run.done:
        return run.record
    sets: dict[str, Path] = {}
    for p in args.prompts_file:
        path = stage_output(p, "data")
        if path.stem in sets:
            raise UsageError(f"two prompt sets are named {path.stem!r} ({sets[path.stem]} and {path}): rename one")
        sets[path.stem] = path
    if args.borderline:
        sets.setdefault("borderline", Path(args.borderline_file or BORDERLINE_PROMPTS_FILE))
    if not sets:
        raise UsageError("no prompt set: give prompts_file and/or keep borderline: true")
    # All prompt files are parsed before the model is loaded; items keep (set, row) in a fixed order for the ranks.
    items = [(name, row) for name, path in sets.items() for row in load_prompts(path)]
    detector = _detector(args)
    sampling.check_installed()
    for name, path in sets.items():
        run.add_input(f"prompts_{name}", path)
    run.add_input("model", model_args.model_name_or_path)

    parts = RankParts(run.dir / "parts", "responses")
    done = parts.done_indices()
    todo = [(i, item) for i, item in parts.my_share(items) if i not in done]
    if todo:
        with chat_sampling(model_args, args.tokenizer_name_or_path, sampling, args.seed) as sampler:
            for chunk in chunks(todo, sampling.prompt_batch_size):
                sampler.reseed(derive_seed(args.seed, chunk[0][0]))
                conversations = [with_system_prompt(row, args.system_prompt) for _, (_, row) in chunk]
                answers = sampler(conversations)
                texts = [c[-1]["content"] for c in conversations]
                flags = refusal_rate(texts, answers, detector).flags
                parts.append({"index": i, "set": name, "id": row.id, "prompt": text, "response": answer,
                              "refusal": flag}
                             for (i, (name, row)), text, answer, flag in zip(chunk, texts, answers, flags))
    records = parts.merge(run.dir / "responses.jsonl", expected=len(items))
    report = {}
    for name in sets:
        mine = [r for r in records if r["set"] == name]
        refused = [{"id": r["id"], "prompt": r["prompt"], "response": r["response"]} for r in mine if r["refusal"]]
        report[name] = {"refusals": len(refused), "total": len(mine), "rate": len(refused) / len(mine) if mine else 0.0,
                        "refused": refused}
    if run.is_main:
        write_json_atomic(run.dir / "refusals.json", report)
    run.outputs.update({"responses": "responses.jsonl", "report": "refusals.json"})
    run.metrics.update({name: {k: v for k, v in r.items() if k != "refused"} for name, r in report.items()})
    return run.finish()


STAGE = Stage("refusals", "false-refusal rates on helpfulness prompts and a borderline set (paper §4.2.3)",
              (RefusalArguments, RefusalSampling, ModelConfig), main)

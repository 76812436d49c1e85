"""The RLHF loop (paper §3.2, RLHF-V1 ... V5) as a pipeline of stage calls: each version samples pairs, has them
annotated, retrains both reward models on everything so far (`train-rm`, `eval-rm` before and after), runs pooled
rejection sampling (`rejection-sample`) and, in the configured versions, PPO (`ppo`), then measures win rates.

    from llama2_hf.iterate import IterateConfig
    from llama2_hf.stages.rlhf_loop import iterate

    records = iterate(IterateConfig(model_name_or_path="out/sft", prompts_file=["prompts.jsonl"],
                                    eval_prompts_file=["eval_prompts.jsonl"], versions=3, prompts_per_version=64,
                                    output_dir="out/iterate"), annotator)

`llama2_hf.iterate` holds what the loop works with (its configuration, the annotators, the preference store, the
version table) and the layout of the folders this module writes; it imports nothing of the stages. This module is the
one place that drives stages for the loop, through `llama2_hf.stages.run_stage` (the function behind every
`llama2-hf <stage>`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import progress
from ..data import SAFETY_TAG, InvalidExample, jsonl_rows, load_prompts, validate_preference
from ..iterate import (
    RM_KINDS, STORE, WIRED, IterateConfig, PageAnnotator, PreferenceStore, RewardModelJudge, _mean, _outcome,
    _read_rows, _win_rate, _write_jsonl, annotator_name, collect_answers, format_versions,
)
from ..loading import load_pretrained
from ..losses import RATINGS
from ..sampling import BackendArguments, derive_seed
from ..runner import RunRecord, StageRun, UsageError, build, field_names, stage_output, write_json_atomic
from . import get_stage, run_stage

logger = logging.getLogger(__name__)


def _recipe(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"recipe {path}: no such file") from None
    if not isinstance(raw, dict):
        raise UsageError(f"recipe {path}: expected a mapping of field: value")
    raw.pop("env", None)
    return raw


def _check_settings(label: str, stage: str, settings: Mapping) -> None:
    """Refuse settings of `stage` that are not its fields, or that the loop wires itself (WIRED)."""
    unknown = sorted(set(settings) - set(field_names(get_stage(stage))))
    if unknown:
        raise UsageError(f"{label} settings: {unknown} are not arguments of `llama2-hf {stage}`")
    wired = sorted(set(settings) & WIRED[stage])
    if wired:
        raise UsageError(f"{label} settings: {wired} are set by the loop from each version's folders")


class _Loop:
    def __init__(self, config: IterateConfig, annotator, stage_args: Mapping[str, Mapping] | None,
                 backend: BackendArguments | None = None):
        self.config, self.annotator = config, annotator
        self.backend = backend
        self.root = Path(config.output_dir)
        self.store = PreferenceStore(self.root / STORE)
        recipes = {"train-rm": config.reward_model_recipe, "rejection-sample": config.rejection_sampling_recipe,
                   "ppo": config.ppo_recipe}
        self.stage_args = {}
        for name in WIRED:
            merged = {**_recipe(recipes.get(name)), **dict((stage_args or {}).get(name, {}))}
            names = set(field_names(get_stage(name)))
            _check_settings(name, name, merged)
            if "seed" in names:
                merged.setdefault("seed", config.seed)
            if "tokenizer_name_or_path" in names and config.tokenizer_name_or_path:
                merged.setdefault("tokenizer_name_or_path", config.tokenizer_name_or_path)
            self.stage_args[name] = merged
        for kind in RM_KINDS:  # per-kind settings of the reward models, on top of train-rm's
            extra = dict((stage_args or {}).get(f"train-rm:{kind}", {}))
            _check_settings(f"train-rm:{kind}", "train-rm", extra)
            self.stage_args[f"train-rm:{kind}"] = {**self.stage_args["train-rm"], **extra}
        unknown = sorted(set(stage_args or {}) - set(WIRED) - {f"train-rm:{kind}" for kind in RM_KINDS})
        if unknown:
            raise UsageError(f"stage_args: {unknown} are not stages the loop runs ({sorted(WIRED)}, or "
                             "train-rm:helpfulness / train-rm:safety for one reward model)")

    # -- helpers ------------------------------------------------------------------------------------------------------
    def vdir(self, n: int) -> Path:
        return self.root / f"v{n}"

    def policy(self, n: int) -> str:
        """The model that version n+1 samples: version n's PPO model if it ran PPO, else its rejection-sampling one;
        the SFT model for n = 0."""
        if n == 0:
            return self.config.model_name_or_path
        ppo = self.vdir(n) / "ppo"
        return str(ppo if n in self.config.ppo_in() else self.vdir(n) / "rs")

    def reward_models(self, n: int) -> dict[str, str | None]:
        if n == 0:
            return {"helpfulness": self.config.initial_helpfulness_reward_model,
                    "safety": self.config.initial_safety_reward_model}
        return {kind: (str(self.vdir(n) / f"rm_{kind}") if (self.vdir(n) / f"rm_{kind}" / "run.json").is_file()
                       else self.reward_models(n - 1)[kind]) for kind in RM_KINDS}

    def step(self, name: str, folder: Path, args: Mapping, work: Callable[[StageRun], None]) -> RunRecord:
        run = StageRun(name, folder, {"output_dir": str(folder), **args})
        if run.done:
            return run.record
        folder.mkdir(parents=True, exist_ok=True)
        work(run)
        return run.finish()

    def answer(self, model: str, temperature: float, prompts, tag: str) -> list[str]:
        """One answer per prompt from `model` (a folder, or a stage folder holding one) on the loop's backend, seeded
        by `tag` (a role, not a path: the same loop in another folder samples the same answers)."""
        from ..modeling_llama2 import Llama2ForCausalLM
        from ..sampling import ChatSampler, open_sampler
        from .common import load_tokenizer
        from .sampling import stage_model

        source = stage_model(model)
        if not Path(str(source)).exists():
            raise UsageError(f"model {source}: no such folder")
        policy = load_pretrained(Llama2ForCausalLM, str(source), "policy")
        tokenizer = load_tokenizer(self.config.tokenizer_name_or_path or source)
        with open_sampler(policy, tokenizer, self.config.sampling(temperature), self.backend,
                          seed=self.config.seed) as sampler:
            return ChatSampler(sampler, seed=derive_seed(self.config.seed, tag))([p.messages for p in prompts])

    # -- the steps of a version --------------------------------------------------------------------------------------
    def pairs(self, n: int, prompts) -> RunRecord:
        c = self.config
        models = [self.policy(n - 1), self.policy(max(0, n - 2)) if c.pair_sampling == "variants" else
                  self.policy(n - 1)]

        def work(run: StageRun) -> None:
            folder = run.dir
            _write_jsonl(folder / "prompts.jsonl", [{"id": p.id, "prompt": p.messages, SAFETY_TAG: p.is_safety_prompt}
                                                     for p in prompts])
            a = self.answer(models[0], c.pair_temperatures[0], prompts, f"v{n}-a")
            b = self.answer(models[1], c.pair_temperatures[1], prompts, f"v{n}-b")
            rows, skipped = [], {"empty_response": 0, "identical_responses": 0}
            for p, ra, rb in zip(prompts, a, b):
                if not ra.strip() or not rb.strip():
                    skipped["empty_response"] += 1
                elif ra.strip() == rb.strip():
                    skipped["identical_responses"] += 1
                else:
                    rows.append({"id": f"v{n}-{p.id}", "prompt": p.messages, "response_a": ra, "response_b": rb,
                                 SAFETY_TAG: p.is_safety_prompt, "version": n})
            if any(skipped.values()):
                logger.warning("v%d: %s of %d prompts give no pair to compare", n, skipped, len(prompts))
            _write_jsonl(folder / "pairs.jsonl", rows)
            rng = random.Random(derive_seed(c.seed, f"v{n}-heldout"))
            k = round(c.heldout_fraction * len(rows))
            heldout = sorted(r["id"] for r in rng.sample(rows, k)) if k else []
            write_json_atomic(folder / "split.json", {"heldout": heldout})
            run.outputs.update(prompts="prompts.jsonl", pairs="pairs.jsonl", split="split.json")
            run.metrics.update(prompts=len(prompts), pairs=len(rows), heldout=len(heldout), skipped=skipped,
                               models=models)

        return self.step("iterate-pairs", self.vdir(n) / "pairs",
                         {"version": n, "prompt_ids": [p.id for p in prompts], "models": models,
                          "temperatures": c.pair_temperatures, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                          "heldout_fraction": c.heldout_fraction, "seed": c.seed}, work)

    def annotations(self, n: int) -> RunRecord:
        pairs_file = self.vdir(n) / "pairs" / "pairs.jsonl"

        def work(run: StageRun) -> None:
            rows = collect_answers(pairs_file, run.dir / "answers.jsonl", self.annotator, n,
                                   self.config.annotation_batch_size)
            from ..annotate.storage import EXCLUDED_LABEL

            kept = [r for r in rows if r.get("safety_label") != EXCLUDED_LABEL]
            added = self.store.add(kept)
            run.add_input("pairs", pairs_file)
            run.outputs.update(data="answers.jsonl")
            run.metrics.update(answered=len(rows), stored=len(kept), added_to_store=added,
                               excluded=len(rows) - len(kept), annotator=annotator_name(self.annotator),
                               ratings={r: sum(x["rating"] == r for x in kept) for r in RATINGS})

        return self.step("iterate-annotate", self.vdir(n) / "annotations",
                         {"version": n, "annotator": annotator_name(self.annotator)}, work)

    def rm_data(self, n: int) -> RunRecord:
        heldout = set(json.loads((self.vdir(n) / "pairs" / "split.json").read_text())["heldout"])

        c = self.config
        earlier = {"helpfulness": c.helpfulness_preference_file, "safety": c.safety_preference_file}

        def work(run: StageRun) -> None:
            rows = [r for r in self.store.rows() if r["version"] <= n]
            train = [r for r in rows if r["id"] not in heldout]
            test = [r for r in rows if r["id"] in heldout]
            counts = {}
            for kind in RM_KINDS:
                replay = self.replayed_preferences(n, kind)
                counts[f"replayed_{kind}"] = len(replay)
                for name, part in (("train", train), ("heldout", test)):
                    subset = [r for r in part if bool(r.get(SAFETY_TAG)) == (kind == "safety")]
                    if name == "train":
                        subset += replay
                    counts[f"{name}_{kind}"] = len(subset)
                    if subset:
                        _write_jsonl(run.dir / f"{name}_{kind}.jsonl", subset)
                        run.outputs[f"{name}_{kind}"] = f"{name}_{kind}.jsonl"
            run.metrics.update(counts=counts, store_rows=len(rows))

        return self.step("iterate-rm-data", self.vdir(n) / "rm_data",
                         {"version": n, "store_ids": sorted(r["id"] for r in self.store.rows() if r["version"] <= n),
                          "heldout": sorted(heldout), "earlier_preferences": earlier,
                          "preference_replay": c.preference_replay}, work)

    def replayed_preferences(self, n: int, kind: str) -> list[dict]:
        """Version n's rows of the pre-loop preference files of `kind`: all of them, or `preference_replay` drawn
        with a seed of the version (each row tagged `version: 0` and the file it came from)."""
        c = self.config
        files = c.helpfulness_preference_file if kind == "helpfulness" else c.safety_preference_file
        rows = []
        for k, path in enumerate(files):
            for line, row in jsonl_rows(path):
                try:
                    # the store's form: the prompt as messages (one JSONL file cannot mix text and message lists)
                    prompt = validate_preference(row, line - 1).prompt
                except InvalidExample as err:
                    raise UsageError(f"{path} line {line}: {err}") from None
                rows.append({**row, "prompt": prompt, "id": f"earlier-{k}-{line - 1}", "version": 0,
                             "source": str(path)})
        if c.preference_replay is not None and c.preference_replay < len(rows):
            rows = random.Random(derive_seed(c.seed, f"v{n}-{kind}-replay")).sample(rows, c.preference_replay)
        return rows

    def reward_model(self, n: int, kind: str, data: RunRecord) -> dict:
        c, folder, data_dir = self.config, self.vdir(n), self.vdir(n) / "rm_data"
        other = "safety" if kind == "helpfulness" else "helpfulness"
        train = data.outputs.get(f"train_{kind}")
        heldout = data.outputs.get(f"heldout_{kind}")
        before_model = self.reward_models(n - 1)[kind]
        out: dict[str, Any] = {"train_rows": data.metrics["counts"][f"train_{kind}"],
                               "heldout_rows": data.metrics["counts"][f"heldout_{kind}"], "before": None,
                               "after": None, "model": None}
        if heldout and before_model:
            out["before"] = self.evaluate_rm(before_model, folder / f"rm_eval_before_{kind}", data_dir / heldout,
                                             f"{kind} RM before v{n}")
        if not train:
            logger.warning("v%d: no %s pairs so far: the %s reward model is not (re)trained", n, kind, kind)
            out["model"] = before_model
            return out
        args = dict(self.stage_args[f"train-rm:{kind}"])
        mix = data.outputs.get(f"train_{other}")
        if c.rm_mix == "paper" and mix:
            args.update(mix_file=[str(data_dir / mix)], data_mix=kind)
        # rm_init=previous: the previous version's RMs (for V1, the initial ones when given)
        start = before_model if c.rm_init == "previous" and before_model else c.model_name_or_path
        record = run_stage("train-rm", model_name_or_path=str(start), train_file=[str(data_dir / train)],
                           output_dir=str(folder / f"rm_{kind}"), **args)
        out["model"] = str(folder / f"rm_{kind}")
        out["train_loss"] = record.metrics.get("train_loss")
        out["trained_on"] = record.metrics.get("loaded", {}).get("train", {}).get("total")
        if heldout:
            out["after"] = self.evaluate_rm(out["model"], folder / f"rm_eval_after_{kind}", data_dir / heldout,
                                            f"{kind} RM after v{n}")
        return out

    def evaluate_rm(self, model: str, folder: Path, heldout: Path, name: str) -> dict:
        args = {"use_cpu": bool(self.stage_args["train-rm"].get("use_cpu", False)), **self.stage_args["eval-rm"]}
        # Through the stage's main: eval-rm's `name` field would collide with run_stage's own `name` parameter.
        stage = get_stage("eval-rm")
        record = stage.main(*build(stage, model_name_or_path=str(model), eval_file=[str(heldout)],
                                   output_dir=str(folder), name=name, **args))
        return record.metrics["table8"]

    def rejection_sampling(self, n: int, rms: Mapping[str, str | None]) -> RunRecord:
        c = self.config
        return run_stage("rejection-sample", model_name_or_path=self.policy(n - 1),
                         prompts_file=[str(self.vdir(n) / "pairs" / "prompts.jsonl")], iteration=n,
                         pool_dirs=[str(self.vdir(k) / "rs") for k in range(1, n)],
                         finetune_model_name_or_path=c.model_name_or_path if c.finetune_from == "sft" else None,
                         helpfulness_reward_model=rms["helpfulness"], safety_reward_model=rms["safety"],
                         output_dir=str(self.vdir(n) / "rs"), **self.stage_args["rejection-sample"])

    def ppo(self, n: int, rms: Mapping[str, str | None]) -> RunRecord:
        return run_stage("ppo", model_name_or_path=str(self.vdir(n) / "rs"),
                         prompts_file=[str(self.vdir(n) / "pairs" / "prompts.jsonl")],
                         helpfulness_reward_model=rms["helpfulness"], safety_reward_model=rms["safety"],
                         output_dir=str(self.vdir(n) / "ppo"), **self.stage_args["ppo"])

    def evaluation(self, n: int, eval_prompts, rms: Mapping[str, str | None]) -> RunRecord:
        c = self.config
        models = {"current": self.policy(n), "previous": self.policy(n - 1), "sft": c.model_name_or_path}

        def work(run: StageRun) -> None:
            folder = run.dir
            cache = folder / "responses.jsonl"
            if cache.is_file():  # generated before a kill: the same answers are judged again
                responses = {r["model"]: r["responses"] for r in _read_rows(cache)}
            else:
                # seeded by the model's role, not its path: the same loop in another folder samples the same answers
                responses = {name: self.answer(path, c.eval_temperature, eval_prompts, f"v{n}-eval-{name}")
                             for name, path in models.items()}
                _write_jsonl(cache, [{"model": k, "path": models[k], "responses": v} for k, v in responses.items()])
            judge = RewardModelJudge(rms["helpfulness"], rms["safety"], c.judge_margins, c.safety_threshold,
                                     name=f"reward models v{n}", tokenizer_name_or_path=c.tokenizer_name_or_path)
            win_rates: dict[str, dict] = {}
            for other in ("previous", "sft"):
                if other == "previous" and models["previous"] == models["sft"]:
                    continue
                pairs, ties, rng = [], 0, random.Random(derive_seed(c.seed, f"v{n}-{other}"))
                for p, mine, theirs in zip(eval_prompts, responses["current"], responses[other]):
                    if mine.strip() == theirs.strip() or not mine.strip() or not theirs.strip():
                        ties += 1  # the same (or no) answer: nothing to compare, a tie
                        continue
                    swap = rng.random() < 0.5  # the current model's answer is not always response a
                    a, b = (theirs, mine) if swap else (mine, theirs)
                    pairs.append({"id": f"v{n}-vs-{other}-{p.id}", "prompt": p.messages, "response_a": a,
                                  "response_b": b, SAFETY_TAG: p.is_safety_prompt, "version": n,
                                  "_mine": "b" if swap else "a"})
                pairs_file = _write_jsonl(folder / f"pairs_vs_{other}.jsonl",
                                          [{k: v for k, v in q.items() if k != "_mine"} for q in pairs])
                by_annotator = collect_answers(pairs_file, folder / f"answers_vs_{other}.jsonl", self.annotator, n,
                                               c.annotation_batch_size)
                mine = {q["id"]: q["response_a" if q["_mine"] == "a" else "response_b"] for q in pairs}
                annotator_outcomes = [_outcome(r["chosen"] == mine[r["id"]], r["rating"]) for r in by_annotator
                                      if r["id"] in mine]
                rm_answers = judge([{k: v for k, v in q.items() if k != "_mine"} for q in pairs]) if pairs else []
                rm_outcomes = [_outcome(ans["choice"] == q["_mine"], ans["rating"])
                               for q, ans in zip(pairs, rm_answers)]
                win_rates[other] = {"annotator": _win_rate(annotator_outcomes, ties),
                                    "reward_model": _win_rate(rm_outcomes, ties)}
            if "previous" not in win_rates:
                win_rates["previous"] = win_rates["sft"]
            scores = {}
            for name, texts in responses.items():
                prompts = [p.messages for p in eval_prompts]
                scores[name] = {kind: _mean(judge.scores(kind, prompts, texts)) if rms[kind] else None
                                for kind in RM_KINDS}
            write_json_atomic(folder / "results.json", {"win_rate": win_rates, "scores": scores, "models": models})
            run.outputs.update(results="results.json", responses="responses.jsonl")
            run.metrics.update(win_rate=win_rates, scores=scores)

        return self.step("iterate-eval", self.vdir(n) / "eval",
                         {"version": n, "models": models, "reward_models": dict(rms),
                          "eval_prompt_ids": [p.id for p in eval_prompts], "temperature": c.eval_temperature,
                          "annotator": annotator_name(self.annotator), "seed": c.seed}, work)

    # -- one version and the summary -----------------------------------------------------------------------------------
    def version(self, n: int, prompts, eval_prompts) -> dict:
        logger.info("RLHF-V%d of %d: sampling pairs for %d new prompts", n, self.config.versions, len(prompts))
        with progress.part():
            pairs = self.pairs(n, prompts)
        with progress.part():
            annotations = self.annotations(n)
            data = self.rm_data(n)
        rm = {}
        for kind in RM_KINDS:
            with progress.part():
                rm[kind] = self.reward_model(n, kind, data)
        rms = {kind: rm[kind]["model"] for kind in RM_KINDS}
        if not rms["helpfulness"]:
            raise UsageError(f"v{n}: no helpfulness pairs annotated so far and no initial_helpfulness_reward_model: "
                             "rejection sampling needs a helpfulness reward model")
        with progress.part():
            rs = self.rejection_sampling(n, rms)
        ppo = None
        if n in self.config.ppo_in():
            with progress.part():
                ppo = self.ppo(n, rms)
        with progress.part():
            evaluation = self.evaluation(n, eval_prompts, rms)
        return {
            "version": n, "model": self.policy(n), "pairs": pairs.metrics, "annotations": annotations.metrics,
            "store_rows": data.metrics["store_rows"], "reward_models": rm,
            "rejection_sampling": {k: rs.metrics.get(k) for k in ("prompts", "selected_rows", "pool_wins",
                                                                  "mean_score", "mean_best_score", "train_loss")},
            "pool_dirs": rs.args.get("pool_dirs"),
            "ppo": None if ppo is None else {k: v for k, v in ppo.metrics.items() if isinstance(v, (int, float))},
            "win_rate": evaluation.metrics["win_rate"], "scores": evaluation.metrics["scores"],
        }

    def summary(self, records: list[dict]) -> None:
        write_json_atomic(self.root / "versions.json", records)
        text = format_versions(records)
        tmp = self.root / f".versions.md.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.root / "versions.md")
        logger.info("RLHF versions:\n%s", text)


def iterate(config: IterateConfig, annotator: Callable[[list[dict]], list[dict]],
            stage_args: Mapping[str, Mapping[str, Any]] | None = None,
            backend: BackendArguments | None = None) -> list[dict]:
    """Run (or resume) the versions of `config` with `annotator` (see the module docstring); returns one record per
    version (also in `output_dir/versions.json`). `stage_args`: per stage (`train-rm`, `eval-rm`,
    `rejection-sample`, `ppo`), field values on top of its recipe, e.g. `{"ppo": {"num_iterations": 50}}`;
    `train-rm:helpfulness` / `train-rm:safety` add settings of one reward model on top of `train-rm`'s. Each version
    is one stage bar of the job's `llama2_hf.progress.Progress` when one is open. `backend`: the engine the loop
    samples its pairs and evaluation answers with (default: PyTorch in this process)."""
    if not config.output_dir:
        raise UsageError("output_dir is required")
    if not config.model_name_or_path:
        raise UsageError("model_name_or_path (the SFT model) is required")
    if not callable(annotator) and not isinstance(annotator, PageAnnotator):
        raise UsageError(f"the annotator must be a callable annotator(pairs) -> answers, got {annotator!r}")
    if not config.prompts_file or not config.eval_prompts_file:
        raise UsageError("prompts_file and eval_prompts_file are required")
    # Every input is read and checked before any model is loaded.
    loop = _Loop(config, annotator, stage_args, backend)
    ppo_versions = sorted(config.ppo_in())
    prompts = load_prompts([stage_output(p, "data") for p in config.prompts_file])
    needed = config.versions * config.prompts_per_version
    if len(prompts) < needed:
        raise UsageError(f"prompts_file has {len(prompts)} prompts; {config.versions} versions of "
                         f"{config.prompts_per_version} new prompts need {needed}")
    eval_prompts = load_prompts([stage_output(p, "data") for p in config.eval_prompts_file])
    if not eval_prompts:
        raise UsageError("eval_prompts_file holds no prompts")
    source = Path(config.model_name_or_path)
    if not source.exists():
        raise UsageError(f"model_name_or_path {source}: no such folder")

    args = {**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
            "annotator": annotator_name(annotator), "stage_args": loop.stage_args, "ppo_versions": ppo_versions}
    run = StageRun("iterate", config.output_dir, args)
    if run.done:
        return json.loads((Path(config.output_dir) / "versions.json").read_text(encoding="utf-8"))
    records = []
    for n in range(1, config.versions + 1):
        block = prompts[(n - 1) * config.prompts_per_version: n * config.prompts_per_version]
        with progress.stage(f"RLHF-V{n}", parts=6 + (n in config.ppo_in())):
            records.append(loop.version(n, block, eval_prompts))
        loop.summary(records)
    for i, p in enumerate(config.prompts_file):
        run.add_input(f"prompts_{i}", stage_output(p, "data"))
    run.outputs.update(store=STORE, versions="versions.json", table="versions.md",
                       model=os.path.relpath(loop.policy(config.versions), config.output_dir))
    run.metrics["versions"] = records
    run.finish()
    return records


__all__ = ["iterate"]

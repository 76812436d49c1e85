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
one place that drives stages for the loop: each stage's typed configs are made once (from its recipe and the
caller's settings), and every version calls the stage on them, its own folders set (`runner.with_fields`):
`STAGE.call(*with_fields(configs, model_name_or_path=..., output_dir=...))`, the call behind every
`llama2-hf <stage>`.
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
from ..records import _jsonable
from ..runner import (
    OBSERVATION_FIELDS, RunRecord, StageRun, UsageError, build, field_names, stage_output, with_fields,
    write_json_atomic,
)
from ..sampling import BackendArguments, derive_seed
from . import get_stage

logger = logging.getLogger(__name__)


# The recipe of each stage the loop runs with settings of its own (IterateConfig field).
RECIPES = {"train-rm": "reward_model_recipe", "rejection-sample": "rejection_sampling_recipe", "ppo": "ppo_recipe"}


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


def _typed(value: Any) -> tuple | None:
    """`value` as a tuple of typed configs (one dataclass instance, or a tuple or list of them), or None for a
    mapping of field values."""
    if isinstance(value, Mapping):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise TypeError(f"stage settings are a mapping of field values or a tuple of typed configs, got {value!r}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _values(configs: tuple) -> dict[str, tuple[Any, Any]]:
    """Every init field of `configs`: (its value, its declared default)."""
    return {f.name: (getattr(inst, f.name), _field_default(f)) for inst in configs for f in dataclasses.fields(inst)
            if f.init}


def _check_typed(label: str, stage: str, configs: tuple) -> None:
    """Refuse typed configs of `stage` that set a field the loop wires itself: one whose value is not what the
    configs hold with the wired fields at their defaults."""
    values = _values(configs)
    wired = {name: default for name, (_, default) in values.items() if name in WIRED[stage]
             and default is not dataclasses.MISSING}
    plain = _values(with_fields(configs, **wired))
    changed = sorted(name for name in wired if _jsonable(values[name][0]) != _jsonable(plain[name][0]))
    if changed:
        raise UsageError(f"{label} settings: {changed} are set by the loop from each version's folders")


def _fill(configs: tuple, defaults: Mapping[str, Any]) -> tuple:
    """`configs` with the fields of `defaults` that they own and leave at their declared default set."""
    values = _values(configs)
    return with_fields(configs, **{name: v for name, v in defaults.items()
                                   if name in values and _jsonable(values[name][0]) == _jsonable(values[name][1])})


def _settings(configs: tuple, stage: str) -> dict[str, Any]:
    """What typed configs set beyond their declared defaults (the loop's record of a stage's settings), but for the
    wired fields and those that change how a run is observed (`OBSERVATION_FIELDS`)."""
    return {name: _jsonable(value) for name, (value, default) in _values(configs).items()
            if name not in WIRED[stage] | OBSERVATION_FIELDS and _jsonable(value) != _jsonable(default)}


class _Loop:
    def __init__(self, config: IterateConfig, annotator,
                 stage_args: Mapping[str, Mapping[str, Any] | tuple] | None,
                 backend: BackendArguments | None = None):
        """Every stage's settings checked, and its typed configs made once: from a tuple of configs the caller
        gives, or (from a mapping of field values on top of the stage's recipe) built on first use."""
        self.config, self.annotator = config, annotator
        self.backend = backend
        self.root = Path(config.output_dir)
        self.store = PreferenceStore(self.root / STORE)
        given = dict(stage_args or {})
        # per stage: its settings (the run record keeps them) and its typed configs (None: built on first use)
        self.settings: dict[str, dict] = {}
        self.configs: dict[str, tuple | None] = {}
        for name in WIRED:
            stage = get_stage(name)
            typed = _typed(given.get(name, {}))
            recipe = getattr(config, RECIPES[name]) if name in RECIPES else None
            if typed is None:
                merged = {**_recipe(recipe), **dict(given.get(name, {}))}
                _check_settings(name, name, merged)
                for key, value in self.defaults(name).items():
                    if key in field_names(stage) and key != "use_cpu":  # eval-rm's use_cpu: added when built
                        merged.setdefault(key, value)
                self.settings[name], self.configs[name] = merged, None
            else:
                if recipe:
                    raise UsageError(f"{name} settings: typed configs and the recipe {recipe} both given; set the "
                                     "recipe's values in the configs, or give field values")
                self.set_typed(name, name, typed)
        for kind in RM_KINDS:  # per-kind settings of the reward models, on top of train-rm's
            label = f"train-rm:{kind}"
            typed = _typed(given.get(label, {}))
            if typed is None:
                extra = dict(given.get(label, {}))
                _check_settings(label, "train-rm", extra)
                base = self.configs["train-rm"]
                self.configs[label] = None if base is None else with_fields(base, **extra)
                self.settings[label] = {**self.settings["train-rm"], **extra}
            else:  # the whole configuration of this reward model
                self.set_typed(label, "train-rm", typed)
        unknown = sorted(set(given) - set(WIRED) - {f"train-rm:{kind}" for kind in RM_KINDS})
        if unknown:
            raise UsageError(f"stage_args: {unknown} are not stages the loop runs ({sorted(WIRED)}, or "
                             "train-rm:helpfulness / train-rm:safety for one reward model)")

    def defaults(self, name: str) -> dict[str, Any]:
        """What the loop sets in stage `name` when its settings leave it unset: the loop's seed and tokenizer, its
        sampling backend when it is not the default (the sampling stages sample on it too); for eval-rm, train-rm's
        use_cpu (the reward models are scored where they train)."""
        out: dict[str, Any] = {"seed": self.config.seed}
        if self.backend is not None and self.backend.use_vllm and name in ("rejection-sample", "ppo"):
            out.update(dataclasses.asdict(self.backend))
        if self.config.tokenizer_name_or_path:
            out["tokenizer_name_or_path"] = self.config.tokenizer_name_or_path
        if name == "eval-rm":
            out["use_cpu"] = self.use_cpu("train-rm")
        return out

    def set_typed(self, label: str, name: str, typed: tuple) -> None:
        """Typed configs of stage `name` given for `label`: the whole configuration, but for the wired fields (which
        it must leave unset) and the loop's defaults where it leaves those fields at their declared defaults."""
        configs = get_stage(name).arrange(typed)
        _check_typed(label, name, configs)
        self.configs[label] = _fill(configs, self.defaults(name))
        self.settings[label] = _settings(self.configs[label], name)

    def stage_configs(self, label: str) -> tuple:
        """The typed configs of `label` (a stage, or train-rm:<kind>), made once; each call sets their wired fields
        with `with_fields`."""
        if self.configs[label] is None:
            name = label.split(":")[0]
            extra = {"use_cpu": self.use_cpu("train-rm")} if name == "eval-rm" else {}
            self.configs[label] = build(get_stage(name), **{**extra, **self.settings[label]})
        return self.configs[label]

    def use_cpu(self, label: str) -> bool:
        configs = self.configs[label]
        if configs is None:
            return bool(self.settings[label].get("use_cpu", False))
        return bool(_values(configs).get("use_cpu", (False,))[0])

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
        # rm_init=previous: the previous version's RMs (for V1, the initial ones when given)
        start = before_model if c.rm_init == "previous" and before_model else c.model_name_or_path
        wired = dict(model_name_or_path=str(start), train_file=[str(data_dir / train)],
                     output_dir=str(folder / f"rm_{kind}"))
        mix = data.outputs.get(f"train_{other}")
        if c.rm_mix == "paper" and mix:
            wired.update(mix_file=[str(data_dir / mix)], data_mix=kind)
        record = get_stage("train-rm").call(*with_fields(self.stage_configs(f"train-rm:{kind}"), **wired))
        out["model"] = str(folder / f"rm_{kind}")
        out["train_loss"] = record.metrics.get("train_loss")
        out["trained_on"] = record.metrics.get("loaded", {}).get("train", {}).get("total")
        if heldout:
            out["after"] = self.evaluate_rm(out["model"], folder / f"rm_eval_after_{kind}", data_dir / heldout,
                                            f"{kind} RM after v{n}")
        return out

    def evaluate_rm(self, model: str, folder: Path, heldout: Path, name: str) -> dict:
        configs = with_fields(self.stage_configs("eval-rm"), model_name_or_path=str(model), eval_file=[str(heldout)],
                              output_dir=str(folder), name=name)
        return get_stage("eval-rm").call(*configs).metrics["table8"]

    def rejection_sampling(self, n: int, rms: Mapping[str, str | None]) -> RunRecord:
        c = self.config
        configs = with_fields(
            self.stage_configs("rejection-sample"), model_name_or_path=self.policy(n - 1),
            prompts_file=[str(self.vdir(n) / "pairs" / "prompts.jsonl")], iteration=n,
            pool_dirs=[str(self.vdir(k) / "rs") for k in range(1, n)],
            finetune_model_name_or_path=c.model_name_or_path if c.finetune_from == "sft" else None,
            helpfulness_reward_model=rms["helpfulness"], safety_reward_model=rms["safety"],
            output_dir=str(self.vdir(n) / "rs"))
        return get_stage("rejection-sample").call(*configs)

    def ppo(self, n: int, rms: Mapping[str, str | None]) -> RunRecord:
        configs = with_fields(
            self.stage_configs("ppo"), model_name_or_path=str(self.vdir(n) / "rs"),
            prompts_file=[str(self.vdir(n) / "pairs" / "prompts.jsonl")],
            helpfulness_reward_model=rms["helpfulness"], safety_reward_model=rms["safety"],
            output_dir=str(self.vdir(n) / "ppo"))
        return get_stage("ppo").call(*configs)

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
            stage_args: Mapping[str, Mapping[str, Any] | tuple] | None = None,
            backend: BackendArguments | None = None) -> list[dict]:
    """Run (or resume) the versions of `config` with `annotator` (see the module docstring); returns one record per
    version (also in `output_dir/versions.json`). Each version is one stage bar of the job's
    `llama2_hf.progress.Progress` when one is open. `backend`: the engine the loop samples its pairs and evaluation
    answers with (default: PyTorch in this process).

    `stage_args`, per stage (`train-rm`, `eval-rm`, `rejection-sample`, `ppo`): either field values on top of its
    recipe, e.g. `{"ppo": {"num_iterations": 50}}`, or a tuple of its typed configs (instances of the stage's
    dataclasses, the missing ones at their defaults), e.g. `{"ppo": (Llama2PPOConfig(num_iterations=50),)}`: the
    whole configuration of that stage (given with the stage's recipe, it is refused). Either way the fields the loop
    wires from each version's folders (`llama2_hf.iterate.WIRED`) are refused, and the loop's seed and tokenizer
    fill those the settings leave unset (in typed configs: at their declared defaults). `train-rm:helpfulness` /
    `train-rm:safety` add settings of one reward model on top of `train-rm`'s (field values), or replace them
    (typed configs)."""
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
            "annotator": annotator_name(annotator), "stage_args": loop.settings, "ppo_versions": ppo_versions}
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

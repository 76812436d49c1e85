"""Rejection-sampling fine-tuning (paper §3.2.3): best-of-K sampling scored by the reward, then SFT on the best.

The pieces of one iteration (the `rejection-sample` stage, `llama2_hf.stages.rejection_sampling`, wires them):
1. `prompt_batches` cuts the prompts into fixed batches of `prompt_batch_size`; each batch is seeded from (seed,
   iteration, its first prompt's id) by `sampling.derive_seed`, so the samples of a prompt do not depend on how many
   processes share the work, nor on whether a run was interrupted and resumed;
2. `RejectionSampler.sample_batches` samples K responses per prompt from the current policy with a
   `sampling.Sampler` (PyTorch: one prefill per prompt shared by its K samples; or a vLLM engine), scores them with
   the reward together
   with the prompt's best response of earlier iterations rescored by the same reward (the pool, below), and hands
   one record per prompt (all K responses, scores, components, the pool entry and the winner) to a writer;
3. `select` builds the SFT rows (`messages` ending with the chosen answer), `report` the counts and the Figure 7
   curves (max vs median reward among N <= K samples);
4. `finetune_trainer` fine-tunes a model on the selection with `Llama2SFTTrainer`.

The pool (paper's RLHF-V3 fix): up to V3, answers were selected from the previous iteration's samples only, which
made the model forget some skills; afterwards the top samples of all prior iterations were kept. Here `pool="all"`
(default) lets each prompt's previous best compete with the new samples, scored by the current reward so that
scores from different reward models are never compared, and keeps the previous best of prompts not resampled this
iteration in the training selection; `pool="current"` is the pre-V3 behaviour.

Choices where the paper is silent (all configurable): K = 8 by default (the paper plots N up to 100 and uses 20 in
one analysis); temperature 1.0 and top-p 1.0 (the paper finds the best temperature moves with each RLHF version, in
[1.2, 1.3] for its RLHF models: sweep it with `temperature_sweep`, Figure 8); samples cut at `max_new_tokens` (no
EOS) and empty answers are scored but not selected for training (`select_unfinished` allows the former); ranking
uses the reward's pre-whitening score (`RewardOutput.raw`). The fine-tuning starts from the policy that sampled
unless `finetune_model_name_or_path` names another model (the paper's temperature note, §3.2.3, mentions "always
starting from the base model on each new RLHF version").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .data import SAFETY_TAG, PromptRow
from .rewards import score_with
from .sampling import Sampler, SamplingConfig, derive_seed
from .trainers.sft import Llama2SFTConfig, Llama2SFTTrainer

logger = logging.getLogger(__name__)

POOL_MODES = ("all", "current")


@dataclass
class RejectionSamplingConfig(Llama2SFTConfig):
    """Sampling and selection settings on top of `Llama2SFTConfig`, whose fields configure the fine-tuning on the
    selected samples (paper §3.2.3: SFT on the best samples; the SFT recipe of §3.1 as defaults). `seed` seeds both
    the sampling and the fine-tuning."""

    num_samples: int = field(default=8, metadata={
        "help": "K, responses sampled per prompt (paper silent on one number: Figure 7 plots N up to 100)."})
    select_unfinished: bool = field(default=False, metadata={
        "help": "Also select samples cut at max_new_tokens (SFT then closes them with EOS)."})
    pool: str = field(default="all", metadata={
        "help": "'all': the best answers of earlier iterations (pool_dirs) compete and stay in the selection "
                "(paper's RLHF-V3 fix); 'current': this iteration's samples only (before V3).",
        "choices": list(POOL_MODES)})
    finetune: bool = field(default=True, metadata={
        "help": "Fine-tune on the selection and save the model in output_dir. false: sample and select only (the "
                "paper's distillation: smaller models train on the 70B model's selection with `llama2-hf sft`)."})
    finetune_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Model the fine-tuning starts from: unset = the policy that sampled (model_name_or_path); or another "
                "folder / Hub id, e.g. the base or SFT model ('always starting from the base model on each new RLHF "
                "version', paper §3.2.3)."})
    temperature_sweep: list[float] | None = field(default=None, metadata={
        "help": "Instead of an iteration: sample K per prompt at each of these temperatures and write Figure 8 "
                "(expected max reward among N samples per temperature); nothing is selected or trained."})

    def __post_init__(self):
        if self.pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {self.pool!r}")
        for temperature in self.temperature_sweep or []:
            SamplingConfig(temperature=temperature)  # refuses T < 0
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        super().__post_init__()

    def signature(self, iteration: int, sampling: SamplingConfig, backend: str = "torch") -> dict:
        """What determines a record's samples: stored in every record, so that records drawn with other settings
        (or by another backend: the two draw different random streams) are never mixed into one output."""
        signature = {"iteration": iteration, "num_samples": sampling.num_samples, "temperature": sampling.temperature,
                     "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens,
                     "prompt_batch_size": sampling.prompt_batch_size, "seed": self.seed}
        if backend != "torch":
            signature["backend"] = backend
        return signature


# ---------------------------------------------------------------------------------------------------------------------
# Figure 7 / 8 statistics: expected max and median of N samples drawn from K without replacement
# ---------------------------------------------------------------------------------------------------------------------

def expected_order_statistic(scores: Sequence[float], n: int, m: int) -> float:
    """E[m-th smallest of a uniformly random n-subset of `scores`] (1 <= m <= n <= len(scores)), exactly.

    With the K scores sorted ascending, the j-th is the m-th smallest of the subset with probability
    C(j-1, m-1) C(K-j, n-m) / C(K, n). m = n gives the expected best-of-n, which is what rejection sampling keeps.
    """
    values = sorted(scores)
    k = len(values)
    if not 1 <= m <= n <= k:
        raise ValueError(f"need 1 <= m <= n <= K, got m={m}, n={n}, K={k}")
    total = math.comb(k, n)
    return sum(v * math.comb(j - 1, m - 1) * math.comb(k - j, n - m) for j, v in enumerate(values, 1)) / total


def expected_median(scores: Sequence[float], n: int) -> float:
    """E[median of a random n-subset]; for even n the median is the mean of the two middle values."""
    if n % 2:
        return expected_order_statistic(scores, n, (n + 1) // 2)
    return 0.5 * (expected_order_statistic(scores, n, n // 2) + expected_order_statistic(scores, n, n // 2 + 1))


def max_median_curves(score_lists: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Figure 7: mean over prompts of the expected max and median reward among N samples, N = 1..K."""
    k = min(len(s) for s in score_lists)
    ns = list(range(1, k + 1))
    best = [sum(expected_order_statistic(s, n, n) for s in score_lists) / len(score_lists) for n in ns]
    median = [sum(expected_median(s, n) for s in score_lists) / len(score_lists) for n in ns]
    return {"n": ns, "max": best, "median": median}


def plot_max_median(curves: Mapping[str, list[float]], path: str | os.PathLike, title: str = "") -> None:
    """Figure 7 as a PNG: max and median reward among N samples against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curves["n"], curves["max"], marker="o", label="max of N")
    ax.plot(curves["n"], curves["median"], marker="o", label="median of N")
    ax.fill_between(curves["n"], curves["median"], curves["max"], alpha=0.15, label="rejection-sampling gain")
    ax.set_xlabel("N samples")
    ax.set_ylabel("reward")
    ax.set_title(title or "Max vs median reward among N samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_temperature_sweep(curves: Mapping[float, Mapping[str, list[float]]], path: str | os.PathLike) -> None:
    """Figure 8 as a PNG: expected max reward among N samples, one line per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for temperature in sorted(curves):
        ax.plot(curves[temperature]["n"], curves[temperature]["max"], marker=".", label=f"T={temperature:g}")
    ax.set_xlabel("N samples")
    ax.set_ylabel("max reward among N")
    ax.set_title("Temperature sweep")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling, selection, fine-tuning
# ---------------------------------------------------------------------------------------------------------------------

def _json_list(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def prompt_batches(prompts: Sequence[PromptRow], batch_size: int) -> list[list[tuple[int, PromptRow]]]:
    """`(index, prompt)` batches of the whole prompt list, in order. Processes share batches, not prompts
    (`RankParts.my_share(batches)`): a batch's composition, hence its seed and its samples, is the same for any
    number of processes."""
    indexed = list(enumerate(prompts))
    return [indexed[s: s + batch_size] for s in range(0, len(indexed), batch_size)]


def latest_records(records: Sequence[Mapping]) -> dict[str, Mapping]:
    """Each prompt id's record of the latest iteration (the pool of earlier iterations' candidates)."""
    latest: dict[str, Mapping] = {}
    for record in records:
        pid = record["prompt_id"]
        if pid not in latest or record["iteration"] > latest[pid]["iteration"]:
            latest[pid] = record
    return latest


class RejectionSampler:
    """Best-of-K sampling and scoring of prompt batches.

    Args:
        sampler: a `sampling.Sampler` over the policy (either backend); its config sets temperature, top-p, length
            and the prompt batch; K is `config.num_samples`.
        reward: a reward of the contract `reward(prompts, responses, **columns)`; it receives `is_safety_prompt`.
        config: the selection settings (`RejectionSamplingConfig`).
    """

    def __init__(self, sampler: Sampler, reward: Callable, config: RejectionSamplingConfig):
        self.sampler = sampler
        self.reward = reward
        self.config = config

    def sampling(self, temperature: float | None = None) -> SamplingConfig:
        """The sampler's config with K samples per prompt (and a sweep's temperature)."""
        changes = {"num_samples": self.config.num_samples}
        if temperature is not None:
            changes["temperature"] = temperature
        return self.sampler.with_config(**changes)

    def sample_batches(self, batches: Sequence[Sequence[tuple[int, PromptRow]]], iteration: int,
                       earlier: Mapping[str, Mapping] | None = None, done: Collection[int] = (),
                       write: Callable[[list[dict]], None] | None = None,
                       temperature: float | None = None) -> list[dict]:
        """Sample and score every prompt of `batches` whose index is not in `done`; each batch's records go to
        `write` as soon as they are scored, and all of them are returned.

        `earlier`: prompt id -> its latest record of an earlier iteration (the pool). `temperature` overrides the
        config's (a temperature sweep, seeded apart from the iterations). A batch of which only some prompts are
        done (a write cut by a kill) is sampled again whole, with the same seed and so the same samples, and only
        its missing prompts are written.
        """
        sampling = self.sampling(temperature)
        tag = iteration if temperature is None else f"T{temperature}"
        signature = self.config.signature(iteration, sampling, self.sampler.backend)
        out: list[dict] = []
        for batch in batches:
            if all(i in done for i, _ in batch):
                continue
            records = [r for r in self._sample_batch(batch, iteration, sampling, signature, tag, earlier or {})
                       if r["index"] not in done]
            if write is not None:
                write(records)
            out += records
        return out

    def _sample_batch(self, batch: Sequence[tuple[int, PromptRow]], iteration: int, sampling: SamplingConfig,
                      signature: dict, tag, earlier: Mapping[str, Mapping]) -> list[dict]:
        rows = [row for _, row in batch]
        out = self.sampler.sample_ids([self.sampler.encode(row.messages) for row in rows], config=sampling,
                                      seed=derive_seed(self.config.seed, tag, rows[0].id))
        samples = [[(self.sampler.decode(ids), done)
                    for ids, done in zip(sample_ids, finished)]
                   for sample_ids, finished in zip(out.response_ids, out.finished)]
        pool = [self._pool_entry(earlier.get(row.id)) for row in rows]
        flat_prompts, flat_responses, flat_flags = [], [], []
        for row, row_samples, entry in zip(rows, samples, pool):
            texts = [text for text, _ in row_samples] + ([entry["response"]] if entry else [])
            flat_prompts += [row.messages] * len(texts)
            flat_responses += texts
            flat_flags += [row.is_safety_prompt] * len(texts)
        # One reward call per batch: the RMs batch every sample (and pool entry) of the batch's prompts.
        scored = score_with(self.reward, flat_prompts, flat_responses, **{SAFETY_TAG: flat_flags})
        records, at = [], 0
        for (index, row), row_samples, entry in zip(batch, samples, pool):
            n = len(row_samples) + (1 if entry else 0)
            part = slice(at, at + n)
            at += n
            records.append(self._record(index, iteration, row, row_samples, entry, scored.raw[part],
                                        scored.rewards[part], {k: v[part] for k, v in scored.components.items()},
                                        signature))
        return records

    def _pool_entry(self, previous: Mapping | None) -> dict | None:
        if self.config.pool != "all" or previous is None or previous["best"] is None:
            return None
        return {"response": previous["best"]["response"], "iteration": previous["best"]["iteration"]}

    def _record(self, index: int, iteration: int, row: PromptRow, samples: list[tuple[str, bool]],
                pool: dict | None, raw: torch.Tensor, rewards: torch.Tensor, components: dict[str, torch.Tensor],
                signature: dict) -> dict:
        k = len(samples)
        record = {
            "index": index, "iteration": iteration, "prompt_id": row.id, "messages": row.messages,
            SAFETY_TAG: row.is_safety_prompt, "sampling": signature,
            "responses": [text for text, _ in samples], "finished": [done for _, done in samples],
            "scores": _json_list(raw[:k]), "rewards": _json_list(rewards[:k]),
            "components": {name: _json_list(values[:k]) for name, values in components.items()},
            "pool": None, "best_sample": None, "best": None,
        }
        # Candidates eligible for training: finished (unless select_unfinished), non-empty new samples; `best_sample`
        # is the best of them, `best` also lets the pool's previous best compete (ties go to the new samples).
        eligible = [(raw[i].item(), -i, {"response": samples[i][0], "source": "sample", "index": i,
                                          "iteration": iteration})
                    for i in range(k) if (samples[i][1] or self.config.select_unfinished) and samples[i][0]
                    and not math.isnan(raw[i].item())]
        if eligible:
            score, _, best = max(eligible, key=lambda e: (e[0], e[1]))
            record["best_sample"] = record["best"] = {**best, "score": score}
        if pool is not None:
            record["pool"] = {**pool, "score": raw[k].item(), "reward": rewards[k].item()}
            if record["best"] is None or record["pool"]["score"] > record["best"]["score"]:
                record["best"] = {"response": pool["response"], "source": "pool", "index": None,
                                  "iteration": pool["iteration"], "score": record["pool"]["score"]}
        return record


def select(records: Sequence[Mapping], earlier: Mapping[str, Mapping] | None = None,
           pool: str = "all") -> list[dict]:
    """SFT rows (`messages` ending with the chosen answer) from this iteration's records: with pool "all" each
    record's `best` (its pool entry may win), followed by the earlier best of the prompts of `earlier` that were not
    resampled now; with "current" the best new sample only. Prompts with no eligible answer are skipped (`report`
    counts them)."""
    current = {r["prompt_id"] for r in records}
    chosen = [(r, r["best"] if pool == "all" else r["best_sample"]) for r in records]
    if pool == "all":
        chosen += [(r, r["best"]) for pid, r in (earlier or {}).items() if pid not in current]
    rows = []
    for record, best in chosen:
        if best is None:
            continue
        rows.append({"messages": record["messages"] + [{"role": "assistant", "content": best["response"]}],
                     "prompt_id": record["prompt_id"], "score": best["score"],
                     "source_iteration": best["iteration"], "scored_in_iteration": record["iteration"]})
    return rows


def report(records: Sequence[Mapping], selection: Sequence[Mapping]) -> dict:
    """Counts, mean scores and the Figure 7 curves of one iteration's records. A mean over nothing (no scored
    sample, no selected row) is None, not 0."""
    complete = [[s for s in r["scores"] if s is not None] for r in records]
    complete = [s for s in complete if s]
    best = [r["best"]["score"] for r in records if r["best"]]
    n_scores = sum(len(s) for s in complete)
    return {
        "prompts": len(records),
        "samples": sum(len(r["responses"]) for r in records),
        "unfinished_samples": sum(not f for r in records for f in r["finished"]),
        "prompts_without_selection": sum(r["best"] is None for r in records),
        "pool_wins": sum(1 for r in records if r["best"] is not None and r["best"]["source"] == "pool"),
        "selected_rows": len(selection),
        "mean_score": sum(sum(s) for s in complete) / n_scores if n_scores else None,
        "mean_best_score": sum(best) / len(best) if best else None,
        "figure7": max_median_curves(complete) if complete else {"n": [], "max": [], "median": []},
    }


def finetune_trainer(model, tokenizer, selection: Sequence[Mapping], config: RejectionSamplingConfig,
                     peft_config=None) -> Llama2SFTTrainer:
    """A `Llama2SFTTrainer` over the selected rows (answer-only loss), configured by the config's training fields."""
    from datasets import Dataset

    if not selection:
        raise ValueError("nothing was selected to fine-tune on: every sample was cut at max_new_tokens, empty or "
                         "unscored (see select_unfinished)")
    dataset = Dataset.from_list([{"messages": row["messages"]} for row in selection])
    return Llama2SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)


__all__ = [
    "POOL_MODES", "RejectionSamplingConfig", "RejectionSampler", "prompt_batches", "latest_records", "select",
    "report", "finetune_trainer", "expected_order_statistic", "expected_median", "max_median_curves",
    "plot_max_median", "plot_temperature_sweep",
]

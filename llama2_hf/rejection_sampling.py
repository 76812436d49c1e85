"""Rejection-sampling fine-tuning (paper §3.2.3): best-of-K sampling scored by the reward, then SFT on the best.

One iteration (`RejectionSampler.run_iteration`):
1. sample K responses per prompt from the current policy (`generation.generate`: one prefill per prompt shared by
   its K samples), temperature and top-p as configured;
2. score them with the reward (`SafetyGatedReward` or any callable of the reward contract) together with the
   prompt's best response of earlier iterations, rescored by the same reward (the pool, see below);
3. append one JSONL line per prompt to `candidates.jsonl` (all K responses, scores, components, the pool entry and
   the winner); the file is append-only and a rerun skips the prompts already written for that iteration, so a
   killed run resumes without regenerating, losing or duplicating prompts;
4. select, for every prompt seen so far, the best response of its latest record, write `selected_iter{i}.jsonl`
   (SFT rows: `messages` ending with the chosen answer) and fine-tune on it with `Llama2SFTTrainer`;
5. report max-vs-median reward as a function of N <= K (paper Figure 7) as JSON and PNG.

The pool (paper's RLHF-V3 fix): up to V3, answers were selected from the previous iteration's samples only, which
made the model forget some skills; afterwards the top samples of all prior iterations were kept. Here
`pool="all"` (default) lets each prompt's previous best compete with the new samples, scored by the current reward
so that scores from different reward models are never compared, and keeps the best of prompts not resampled this
iteration in the training selection; `pool="current"` is the pre-V3 behaviour.

Choices where the paper is silent (all configurable): K = 8 by default (the paper plots N up to 100 and uses 20 in
one analysis); temperature 1.0 and top-p 1.0 (the paper finds the best temperature moves with each RLHF version, in
[1.2, 1.3] for its RLHF models: run `--temperature-sweep` to pick it, Figure 8); samples cut at `max_new_tokens`
(no EOS) and empty answers are scored but not selected for training (`select_unfinished` allows the former); ranking uses the reward's pre-whitening score (`RewardOutput.raw`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .generation import SamplingConfig, as_messages, generate
from .rewards import score_with
from .tokenization_llama2 import encode_dialog, validate_messages

logger = logging.getLogger(__name__)

POOL_MODES = ("all", "current")
SAFETY_FIELDS = ("is_safety", "is_safety_prompt")


@dataclass
class RejectionSamplingConfig:
    """Sampling and selection settings (see the module docstring for the choices the paper leaves open)."""

    num_samples: int = 8
    """K, responses sampled per prompt (paper: not one number; Figure 7 plots N up to 100)."""
    temperature: float = 1.0
    """Sampling temperature (paper Fig. 8: the best one moves with each RLHF version; sweep it)."""
    top_p: float = 1.0
    """Nucleus threshold (1.0: plain sampling at the given temperature)."""
    max_new_tokens: int = 256
    """Response length limit; samples that hit it (no EOS) are kept in the log but never selected."""
    prompt_batch_size: int = 8
    """Prompts per generation batch; also the unit written to the log at once."""
    select_unfinished: bool = False
    """Also select samples cut at max_new_tokens (SFT then closes them with EOS); off by default."""
    pool: str = "all"
    """"all": the best sample of earlier iterations competes (RLHF-V3 fix); "current": this iteration only."""
    seed: int = 0
    """Sampling seed; each batch is seeded from (seed, iteration, its first prompt), so a resumed run draws the
    same samples as an uninterrupted one."""

    def __post_init__(self) -> None:
        if self.pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {self.pool!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    def sampling(self, temperature: float | None = None) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature if temperature is None else temperature,
                              top_p=self.top_p, num_samples=self.num_samples,
                              prompt_batch_size=self.prompt_batch_size)


@dataclass
class PromptRow:
    prompt_id: str
    messages: list[dict]
    is_safety: bool


def read_prompts(rows: Iterable[Mapping]) -> list[PromptRow]:
    """Validate prompt rows: `prompt` (text or messages) or `messages` ending with a user turn, an optional boolean
    `is_safety` (or `is_safety_prompt`) and an optional `id`. Without an id, a hash of the messages identifies the
    prompt (for resuming and for the pool). Duplicate ids raise ValueError naming both rows."""
    out: list[PromptRow] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        value = row.get("prompt", row.get("messages"))
        if value is None:
            raise ValueError(f"prompt row {i}: expected a 'prompt' (text or messages) or 'messages' field, got keys "
                             f"{sorted(row)}")
        try:
            messages = as_messages(value)
            validate_messages(messages)
        except ValueError as err:
            raise ValueError(f"prompt row {i}: {err}") from None
        if messages[-1]["role"] != "user":
            raise ValueError(f"prompt row {i}: the prompt must end with a user message, ends with "
                             f"{messages[-1]['role']!r}")
        flag = next((row[f] for f in SAFETY_FIELDS if row.get(f) is not None), False)
        if not isinstance(flag, bool) and flag not in (0, 1):
            raise ValueError(f"prompt row {i}: is_safety must be a bool, got {flag!r}")
        if row.get("id") is not None:
            prompt_id = str(row["id"])
        else:
            prompt_id = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        if prompt_id in seen:
            raise ValueError(f"prompt rows {seen[prompt_id]} and {i} have the same id {prompt_id!r} (identical "
                             "prompts without an 'id' field hash to the same id)")
        seen[prompt_id] = i
        out.append(PromptRow(prompt_id, messages, bool(flag)))
    return out


class CandidateLog:
    """An append-only JSONL file of records keyed by (`key_field`, prompt_id); crash-safe and resumable.

    Each `append` writes whole lines, flushes and fsyncs. On opening, a last line cut by a crash (no newline, or not
    valid JSON) is removed, and every complete record is indexed, so callers can skip finished prompts.
    """

    def __init__(self, path: str | os.PathLike, key_field: str = "iteration"):
        self.path = Path(path)
        self.key_field = key_field
        self.records: dict[tuple, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        lines = data[:good].splitlines()
        for n, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n != len(lines) - 1:
                    raise ValueError(f"{self.path}: line {n + 1} is not valid JSON (only a torn last line is "
                                     "repaired)") from None
                good -= len(line) + 1
                break
            self.records[self.key(record)] = record
        if good < len(data):
            logger.warning("%s: removed %d bytes of an incomplete last record (interrupted write)", self.path,
                           len(data) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def key(self, record: Mapping) -> tuple:
        return (record[self.key_field], record["prompt_id"])

    def __contains__(self, key: tuple) -> bool:
        return key in self.records

    def append(self, records: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for record in records:
            self.records[self.key(record)] = record

    def latest_before(self, prompt_id: str, iteration: int) -> dict | None:
        """The record of `prompt_id` with the largest iteration below `iteration`."""
        found = [r for (it, pid), r in self.records.items() if pid == prompt_id and it < iteration]
        return max(found, key=lambda r: r[self.key_field]) if found else None


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
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------

def _json_list(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _batch_seed(seed: int, tag, prompt_id: str) -> int:
    digest = hashlib.sha1(f"{seed}/{tag}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RejectionSampler:
    """Best-of-K rejection sampling with a resumable candidate log and a pool across iterations.

    Args:
        model: the policy (a causal LM; sampled in eval mode, fine-tuned in place by `finetune`).
        tokenizer: its tokenizer (chat format via `encode_dialog`).
        reward: a reward of the contract `reward(prompts, responses, **columns)`; it receives `is_safety`.
        output_dir: where `candidates.jsonl`, `selected_iter{i}.jsonl`, reports and figures go.
        config: `RejectionSamplingConfig()` by default.
    """

    def __init__(self, model, tokenizer, reward: Callable, output_dir: str | os.PathLike,
                 config: RejectionSamplingConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.reward = reward
        self.config = config or RejectionSamplingConfig()
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log = CandidateLog(self.output_dir / "candidates.jsonl")

    # -- sampling ------------------------------------------------------------------------------------------------

    def _sample_batch(self, batch: list[PromptRow], sampling: SamplingConfig, tag) -> list[list[tuple[str, bool]]]:
        """K (text, finished) pairs per prompt."""
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(_batch_seed(self.config.seed, tag, batch[0].prompt_id))
        self.model.eval()
        out = generate(self.model, [encode_dialog(self.tokenizer, row.messages) for row in batch], sampling,
                       eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                       generator=generator)
        return [[(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), done)
                 for ids, done in zip(samples, finished)]
                for samples, finished in zip(out.response_ids, out.finished)]

    def _score(self, prompts: list[list[dict]], responses: list[str], flags: list[bool]):
        return score_with(self.reward, prompts, responses, is_safety=flags)

    def sample_iteration(self, prompts: Sequence[PromptRow], iteration: int, progress: bool = True) -> list[dict]:
        """Sample, score and log the prompts of `iteration` that are not logged yet; returns all its records."""
        cfg = self.config
        pending = [p for p in prompts if (iteration, p.prompt_id) not in self.log]
        if len(pending) < len(prompts):
            logger.info("iteration %d: resuming, %d of %d prompts already logged", iteration,
                        len(prompts) - len(pending), len(prompts))
        sampling = cfg.sampling()
        batches = [pending[s: s + cfg.prompt_batch_size] for s in range(0, len(pending), cfg.prompt_batch_size)]
        for batch in tqdm(batches, desc=f"rejection sampling, iteration {iteration}", disable=not progress):
            samples = self._sample_batch(batch, sampling, iteration)
            pool = [self._pool_entry(row.prompt_id, iteration) for row in batch]
            flat_prompts, flat_responses, flat_flags = [], [], []
            for row, row_samples, entry in zip(batch, samples, pool):
                texts = [text for text, _ in row_samples] + ([entry["response"]] if entry else [])
                flat_prompts += [row.messages] * len(texts)
                flat_responses += texts
                flat_flags += [row.is_safety] * len(texts)
            scored = self._score(flat_prompts, flat_responses, flat_flags)
            records, at = [], 0
            for row, row_samples, entry in zip(batch, samples, pool):
                n = len(row_samples) + (1 if entry else 0)
                part = slice(at, at + n)
                at += n
                records.append(self._record(iteration, row, row_samples, entry, scored.raw[part],
                                            scored.rewards[part], {k: v[part] for k, v in scored.components.items()},
                                            sampling.temperature))
            self.log.append(records)
        return [self.log.records[(iteration, p.prompt_id)] for p in prompts]

    def _pool_entry(self, prompt_id: str, iteration: int) -> dict | None:
        if self.config.pool != "all":
            return None
        previous = self.log.latest_before(prompt_id, iteration)
        if previous is None or previous["best"] is None:
            return None
        best = previous["best"]
        return {"response": best["response"], "iteration": best["iteration"]}

    def _record(self, iteration: int, row: PromptRow, samples: list[tuple[str, bool]], pool: dict | None,
                raw: torch.Tensor, rewards: torch.Tensor, components: dict[str, torch.Tensor],
                temperature: float) -> dict:
        k = len(samples)
        record = {
            "iteration": iteration, "prompt_id": row.prompt_id, "messages": row.messages,
            "is_safety": row.is_safety, "temperature": temperature,
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

    # -- selection, report, fine-tuning --------------------------------------------------------------------------

    def select(self, iteration: int) -> list[dict]:
        """SFT rows for `iteration`: with pool "all", every prompt's best in its latest record up to `iteration`;
        with "current", the best of this iteration's prompts only. Prompts with no finished sample are skipped."""
        latest: dict[str, dict] = {}
        for (it, pid), record in self.log.records.items():
            if it > iteration or (self.config.pool == "current" and it != iteration):
                continue
            if pid not in latest or it > latest[pid]["iteration"]:
                latest[pid] = record
        rows = []
        for pid, record in latest.items():
            best = record["best"] if self.config.pool == "all" else record["best_sample"]
            if best is None:
                continue
            rows.append({"messages": record["messages"] + [{"role": "assistant", "content": best["response"]}],
                         "prompt_id": pid, "score": best["score"], "source_iteration": best["iteration"],
                         "scored_in_iteration": record["iteration"]})
        return rows

    def report(self, records: Sequence[dict], selection: Sequence[dict], iteration: int) -> dict:
        """Figure 7 statistics and counts for one iteration's records; writes the JSON and the PNG."""
        complete = [[s for s in r["scores"] if s is not None] for r in records]
        complete = [s for s in complete if s]
        curves = max_median_curves(complete) if complete else {"n": [], "max": [], "median": []}
        n_samples = sum(len(r["responses"]) for r in records)
        summary = {
            "iteration": iteration,
            "prompts": len(records),
            "samples": n_samples,
            "unfinished_samples": sum(not f for r in records for f in r["finished"]),
            "prompts_without_selection": sum(r["best"] is None for r in records),
            "pool_wins": sum(1 for r in records if r["best"] is not None and r["best"]["source"] == "pool"),
            "selected_rows": len(selection),
            "mean_score": sum(sum(s) for s in complete) / max(1, sum(len(s) for s in complete)),
            "mean_best_score": sum(r["best"]["score"] for r in records if r["best"]) / max(
                1, sum(r["best"] is not None for r in records)),
            "figure7": curves,
        }
        (self.output_dir / f"report_iter{iteration}.json").write_text(json.dumps(summary, indent=2))
        if curves["n"]:
            plot_max_median(curves, self.output_dir / f"figure7_iter{iteration}.png",
                            title=f"Max vs median reward among N samples (iteration {iteration})")
        return summary

    def write_selection(self, selection: Sequence[dict], iteration: int) -> Path:
        path = self.output_dir / f"selected_iter{iteration}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in selection:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def finetune(self, selection: Sequence[dict], sft_config):
        """Fine-tune the policy in place on the selected rows with `Llama2SFTTrainer`; returns the trainer."""
        from datasets import Dataset

        from .trainers.sft import Llama2SFTTrainer

        if not selection:
            raise ValueError("nothing was selected: every sample was cut at max_new_tokens or unscored")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token
        dataset = Dataset.from_list([{"messages": row["messages"]} for row in selection])
        trainer = Llama2SFTTrainer(model=self.model, args=sft_config, train_dataset=dataset,
                                   processing_class=self.tokenizer)
        trainer.train()
        self.model.eval()
        return trainer

    def run_iteration(self, prompts: Iterable[Mapping] | Sequence[PromptRow], iteration: int, sft_config=None,
                      progress: bool = True) -> dict:
        """Sample and score (resuming), select across the pool, report, and fine-tune when `sft_config` is given."""
        rows = list(prompts)
        if rows and not isinstance(rows[0], PromptRow):
            rows = read_prompts(rows)
        records = self.sample_iteration(rows, iteration, progress=progress)
        selection = self.select(iteration)
        self.write_selection(selection, iteration)
        summary = self.report(records, selection, iteration)
        if sft_config is not None:
            trainer = self.finetune(selection, sft_config)
            summary["sft_train_loss"] = trainer.state.log_history[-1].get("train_loss")
        logger.info("iteration %d: %d prompts, mean score %.4f, mean best %.4f, %d rows selected", iteration,
                    summary["prompts"], summary["mean_score"], summary["mean_best_score"], len(selection))
        return summary

    def temperature_sweep(self, prompts: Iterable[Mapping] | Sequence[PromptRow], temperatures: Sequence[float],
                          progress: bool = True) -> dict[float, dict[str, list[float]]]:
        """Figure 8: sample K per prompt at each temperature (logged and resumable in `temperature_sweep.jsonl`),
        and plot the expected max reward among N samples per temperature."""
        rows = list(prompts)
        if rows and not isinstance(rows[0], PromptRow):
            rows = read_prompts(rows)
        log = CandidateLog(self.output_dir / "temperature_sweep.jsonl", key_field="temperature")
        curves = {}
        for temperature in temperatures:
            sampling = self.config.sampling(temperature)
            pending = [p for p in rows if (temperature, p.prompt_id) not in log]
            batches = [pending[s: s + sampling.prompt_batch_size]
                       for s in range(0, len(pending), sampling.prompt_batch_size)]
            for batch in tqdm(batches, desc=f"temperature {temperature:g}", disable=not progress):
                samples = self._sample_batch(batch, sampling, f"T{temperature}")
                texts = [text for row_samples in samples for text, _ in row_samples]
                flat_prompts = [row.messages for row in batch for _ in range(sampling.num_samples)]
                flags = [row.is_safety for row in batch for _ in range(sampling.num_samples)]
                raw = self._score(flat_prompts, texts, flags).raw.view(len(batch), -1)  # (prompts, K)
                log.append([{"temperature": temperature, "prompt_id": row.prompt_id,
                             "responses": [t for t, _ in row_samples], "scores": _json_list(raw[j])}
                            for j, (row, row_samples) in enumerate(zip(batch, samples))])
            scores = [[s for s in log.records[(temperature, p.prompt_id)]["scores"] if s is not None] for p in rows]
            curves[temperature] = max_median_curves([s for s in scores if s])
        (self.output_dir / "temperature_sweep.json").write_text(
            json.dumps({str(t): c for t, c in curves.items()}, indent=2))
        plot_temperature_sweep(curves, self.output_dir / "figure8_temperature_sweep.png")
        return curves


# ---------------------------------------------------------------------------------------------------------------------
# CLI: llama2-hf rejection-sample
# ---------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = RejectionSamplingConfig()
    p = argparse.ArgumentParser(prog="llama2-hf rejection-sample", description=(
        "Best-of-K rejection sampling scored by the safety-gated reward (paper §3.2.3), with a resumable "
        "append-only candidate log, a pool of the best samples of earlier iterations, optional SFT on the "
        "selection, and the paper's Figure 7 / Figure 8 plots."))
    p.add_argument("--model", required=True, help="policy directory (causal LM) to sample from")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--prompts", required=True,
                   help="prompt file (.jsonl/.json/.parquet) or Hub dataset: rows with 'prompt' (text or messages) or "
                        "'messages' ending with a user turn, optional bool 'is_safety' and 'id'")
    p.add_argument("--output-dir", required=True, help="candidates.jsonl, selections, reports and plots go here")
    p.add_argument("--helpfulness-rm", required=True, help="helpfulness reward model directory")
    p.add_argument("--safety-rm", default=None,
                   help="safety reward model directory; without it the helpfulness RM alone is the reward")
    p.add_argument("--threshold", type=float, default=0.15, help="safety gate on sigmoid(R_s) (paper: 0.15)")
    p.add_argument("--iteration", type=int, default=1, help="RLHF iteration number (the pool uses earlier ones)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="K, samples per prompt")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="response length limit")
    p.add_argument("--prompt-batch-size", type=int, default=d.prompt_batch_size, help="prompts per generation batch")
    p.add_argument("--pool", choices=POOL_MODES, default=d.pool,
                   help="'all': earlier iterations' best samples compete (RLHF-V3 fix); 'current': this one only")
    p.add_argument("--select-unfinished", action="store_true",
                   help="also select samples cut at --max-new-tokens (default: only those that ended with EOS)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--temperature-sweep", type=float, nargs="+", default=None, metavar="T",
                   help="instead of an iteration, sample at these temperatures and plot Figure 8")
    p.add_argument("--finetune", action="store_true", help="fine-tune on the selection with Llama2SFTTrainer and "
                   "save the model to OUTPUT_DIR/model_iter{i}")
    p.add_argument("--sft-learning-rate", type=float, default=2e-5, help="SFT learning rate (paper SFT: 2e-5)")
    p.add_argument("--sft-epochs", type=float, default=2.0, help="SFT epochs over the selection")
    p.add_argument("--sft-max-length", type=int, default=4096, help="SFT row length in tokens")
    p.add_argument("--sft-batch-size", type=int, default=64, help="SFT rows per optimizer step")
    p.add_argument("--sft-per-device-batch-size", type=int, default=8, help="SFT rows per device per micro-step")
    p.add_argument("--device", default=None, help="policy device (default: cuda if available, else cpu)")
    p.add_argument("--rm-device", default=None, help="reward models' device (default: the policy's)")
    p.add_argument("--rm-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="reward models' dtype")
    p.add_argument("--rm-batch-size", type=int, default=8, help="pairs per reward-model forward pass")
    return p


def load_reward(helpfulness_rm: str, safety_rm: str | None, tokenizer, threshold: float, whiten: str,
                device: str, dtype: str, batch_size: int):
    """The pipeline's reward from reward-model directories: `SafetyGatedReward` with both, else one scorer."""
    from transformers import AutoModelForSequenceClassification

    from . import modeling_llama2  # noqa: F401  (registers model_type llama2)
    from .rewards import RewardModelScorer, SafetyGatedReward

    def scorer(path: str) -> RewardModelScorer:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, dtype))
        return RewardModelScorer(model.to(device), tokenizer, batch_size=batch_size)

    helpful = scorer(helpfulness_rm)
    if safety_rm is None:
        return helpful
    return SafetyGatedReward(helpful, scorer(safety_rm), threshold=threshold, whiten=whiten)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_any

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    # Whitening never changes a best-of-K choice and ranking uses raw scores, so the reward is not whitened here.
    reward = load_reward(args.helpfulness_rm, args.safety_rm, tokenizer, args.threshold, "none",
                         args.rm_device or device, args.rm_dtype, args.rm_batch_size)
    prompts = list(load_any(args.prompts))
    if args.limit:
        prompts = prompts[: args.limit]
    config = RejectionSamplingConfig(num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens, prompt_batch_size=args.prompt_batch_size,
                                     pool=args.pool, seed=args.seed, select_unfinished=args.select_unfinished)
    sampler = RejectionSampler(model, tokenizer, reward, args.output_dir, config)
    out = Path(args.output_dir)
    if args.temperature_sweep:
        curves = sampler.temperature_sweep(prompts, args.temperature_sweep)
        metrics = {str(t): {"max_of_K": c["max"][-1], "median_of_K": c["median"][-1]} for t, c in curves.items()}
    else:
        sft_config = None
        if args.finetune:
            from .trainers.sft import Llama2SFTConfig

            cpu = device == "cpu"
            sft_config = Llama2SFTConfig(
                output_dir=str(out / f"sft_iter{args.iteration}"), learning_rate=args.sft_learning_rate,
                num_train_epochs=args.sft_epochs, max_length=args.sft_max_length,
                global_batch_size=args.sft_batch_size, per_device_train_batch_size=args.sft_per_device_batch_size,
                save_strategy="no", report_to=[], seed=args.seed,
                **(dict(use_cpu=True, bf16=False, gradient_checkpointing=False) if cpu else {}))
        metrics = sampler.run_iteration(prompts, args.iteration, sft_config=sft_config)
        if args.finetune:
            model.save_pretrained(out / f"model_iter{args.iteration}")
            tokenizer.save_pretrained(out / f"model_iter{args.iteration}")
    run = {"stage": "rejection-sample", "config": {**vars(args), "sampling": asdict(config)}, "metrics": metrics}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    print(json.dumps({k: v for k, v in metrics.items() if k != "figure7"}, default=str))
    return 0


__all__ = [
    "RejectionSamplingConfig", "RejectionSampler", "CandidateLog", "PromptRow", "read_prompts",
    "expected_order_statistic", "expected_median", "max_median_curves", "plot_max_median", "plot_temperature_sweep",
    "load_reward", "main",
]

"""Rewards for RLHF: a batched reward-model scorer and the paper's safety-gated combination of two reward models.

The reward contract shared by rejection sampling, PPO, context distillation and TRL's GRPOTrainer / RLOOTrainer:

    reward(prompts, responses, **columns) -> list[float]

- `prompts`: chat prompts, each a string (one user message) or a message list ending with a user turn (TRL's
  conversational prompts are message lists);
- `responses`: answer strings, or TRL conversational completions (`[{"role": "assistant", "content": ...}]`);
- `columns`: extra dataset columns as lists aligned with the prompts (e.g. `is_safety_prompt`, the safety tag);
  TRL's extra keyword arguments (`trainer_state`, `log_metric`, ...) are accepted and used for logging only.

Rewards that also expose `score(prompts, responses, **columns) -> RewardOutput` give the stages the components for
logging and the pre-whitening score; `score_with` calls either form.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .data import SAFETY_TAG
from .generation import Prompt, as_messages
from .losses import logit, whiten

logger = logging.getLogger(__name__)

WHITEN_MODES = ("batch", "running", "none")


@dataclass
class RewardOutput:
    """Scores of a batch of (prompt, response) pairs, all (N,) float32 on CPU.

    `rewards` is what an optimiser maximises (whitened when the reward whitens); `raw` is the same score before
    whitening, comparable across batches (rejection sampling ranks by it); `components` are for logging (NaN where a
    component was not computed for a row).
    """

    rewards: torch.Tensor
    raw: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def response_text(response) -> str:
    """The answer text of a response: a string, or the content of the last message of a TRL conversational one."""
    if isinstance(response, str):
        return response
    if isinstance(response, Sequence) and response and isinstance(response[-1], dict) and "content" in response[-1]:
        return response[-1]["content"]
    raise ValueError(f"a response must be a string or a list of messages, got {response!r}")


def score_with(reward: Callable, prompts: Sequence[Prompt], responses: Sequence, **columns) -> RewardOutput:
    """Call any reward of the contract: its `score` method when it has one, else the plain callable."""
    if hasattr(reward, "score"):
        return reward.score(prompts, responses, **columns)
    values = torch.as_tensor([float("nan") if v is None else float(v) for v in reward(prompts, responses, **columns)],
                             dtype=torch.float32)
    if values.shape != (len(prompts),):
        raise ValueError(f"the reward returned {tuple(values.shape)} scores for {len(prompts)} prompts")
    return RewardOutput(rewards=values, raw=values.clone())


_TRL_ONLY_KWARGS = ("trainer_state", "log_extra", "log_metric", "completion_ids", "environments")


class RewardModelScorer:
    """Batched, no-grad scores of a sequence-classification reward model (num_labels=1) on chat pairs.

    The model input is `messages + [assistant response]` in the reward model's own chat format
    (`llama2_hf.chat_format.chat_format_for(tokenizer)`: Meta's `encode_dialog` ids, every turn closed by EOS, for a
    Llama 2 tokenizer; the chat template otherwise), re-encoded from the text, so the policy may use another
    tokenizer. Rows are right padded with the id the model's head skips (`llama2_hf.loading.reward_pad_id`) and scored
    at the last real token (`Llama2ForRewardModel`, or any `AutoModelForSequenceClassification`). The model keeps its own device and dtype: inputs go to
    the model's device, scores come back as float32 on CPU.

    Args:
        model: the reward model (put in eval mode here).
        tokenizer: the reward model's own tokenizer (saved with it; for Llama 2 the policy's is the same).
        batch_size: pairs per forward pass (pairs are sorted by length to limit padding).
        max_length: longest input in tokens (default: the model's context); longer inputs raise ValueError unless
            `truncate_left`, which keeps the last `max_length` tokens (the answer's end) and logs how many were cut.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 truncate_left: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.truncate_left = truncate_left
        from .chat_format import chat_format_for
        from .loading import reward_pad_id

        self.chat_format = chat_format_for(tokenizer)
        self.pad_token_id = reward_pad_id(model, tokenizer)

    def encode(self, prompts: Sequence[Prompt], responses: Sequence) -> list[list[int]]:
        """Reward-model input ids of each pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        encoded, cut = [], 0
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            ids = self.chat_format.encode(as_messages(prompt) + [
                {"role": "assistant", "content": response_text(response)}]).input_ids
            if self.max_length is not None and len(ids) > self.max_length:
                if not self.truncate_left:
                    raise ValueError(f"pair {i} is {len(ids)} tokens, longer than the reward model's max_length "
                                     f"{self.max_length} (set truncate_left=True to keep its last tokens)")
                ids, cut = ids[-self.max_length:], cut + 1
            encoded.append(ids)
        if cut:
            logger.warning("truncated %d of %d reward-model inputs to their last %d tokens", cut, len(encoded),
                           self.max_length)
        return encoded

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[Prompt], responses: Sequence) -> torch.Tensor:
        """The model's scalar output (a logit) for each pair, (N,) float32 on CPU."""
        encoded = self.encode(prompts, responses)
        device = next(self.model.parameters()).device
        scores = torch.empty(len(encoded), dtype=torch.float32)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            length = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                attention_mask[row, : len(encoded[i])] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                use_cache=False).logits  # (b, 1)
            scores[torch.tensor(batch)] = logits[:, 0].float().cpu()
        return scores

    def score(self, prompts: Sequence[Prompt], responses: Sequence, **columns) -> RewardOutput:
        raw = self.raw_scores(prompts, responses)
        return RewardOutput(rewards=raw, raw=raw.clone())

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence, **kwargs) -> list[float]:
        return self.raw_scores(prompts, completions).tolist()


class RunningMoments:
    """Running mean and population variance of every value seen (Chan et al.'s parallel update)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.double().mean().item()
        batch_m2 = ((values.double() - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def _flags(values, n: int, name: str) -> torch.Tensor:
    if values is None:
        return torch.zeros(n, dtype=torch.bool)
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} prompts")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or v in (0, 1):
            out.append(bool(v))
        else:
            raise ValueError(f"{name}[{i}] must be a bool (or 0/1), got {v!r}")
    return torch.tensor(out, dtype=torch.bool)


def _looks_like_safety_tag(name: str, tag: str) -> bool:
    """Whether a column name reads as a safety tag (`is_safety`, `unsafe`, `is_adversarial`, a misspelt `tag`)."""
    return bool(re.search(r"safe|safety|advers|harm", name.lower())) or bool(
        difflib.get_close_matches(name.lower(), [tag], n=1, cutoff=0.75))


SAFETY_THRESHOLD = 0.15
"""The safety gate on sigmoid(R_s) of the piecewise reward: 0.15, precision 0.89 / recall 0.55 on Meta Safety (paper
§3.2.3). The one definition: `SafetyGatedReward` and the stages' `RewardArguments` read it."""


class SafetyGatedReward:
    """The paper's reward (§3.2.3, Eq. 3-4): the safety RM gates the helpfulness RM, then LOGIT and WHITEN.

    `R_c = R_s` if the prompt is tagged unsafe (`is_safety_prompt`) or `sigmoid(R_s) < threshold`, else `R_h`; the reward is
    `WHITEN(LOGIT(R_c))`. The reward models output logits (the pre-sigmoid scalar of `Llama2ForRewardModel`), so
    LOGIT(sigmoid(r)) = r is taken exactly, without the saturation of computing the sigmoid first
    (`rm_outputs="probabilities"` is for scorers that return sigmoid scores).

    The helpfulness RM is only run on the rows that use it (RMs start from chat checkpoints, §3.2.2, so they can be as
    large as the policy); its component is NaN on the others.

    Whitening (the paper does not say which statistics): "batch" (default) standardises with the mean and population
    variance of the scored batch, which for PPO is the rollout batch (512 in the paper), enough for stable
    statistics; "running" uses every score seen so far (for small batches; keep its `state_dict` with checkpoints);
    "none" returns LOGIT(R_c). Whitening is monotone within a call, so it never changes a best-of-K choice.

    Args:
        helpfulness, safety: scorers `(prompts, responses) -> sequence of logits` (a `RewardModelScorer` or any
            callable); they may sit on different devices or dtypes.
        threshold: `SAFETY_THRESHOLD` (0.15, paper §3.2.3).
        whiten: "batch", "running" or "none".
        safety_column: the boolean column that tags safety prompts. A call without it tags no prompt and warns once;
            another column whose name looks like a safety tag (`is_safety`, a misspelling) is a ValueError, since
            it would gate nothing.
    """

    def __init__(self, helpfulness: Callable, safety: Callable, threshold: float = SAFETY_THRESHOLD,
                 whiten: str = "batch", safety_column: str = SAFETY_TAG, rm_outputs: str = "logits"):
        if whiten not in WHITEN_MODES:
            raise ValueError(f"whiten must be one of {WHITEN_MODES}, got {whiten!r}")
        if rm_outputs not in ("logits", "probabilities"):
            raise ValueError(f"rm_outputs must be 'logits' or 'probabilities', got {rm_outputs!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
        self.helpfulness, self.safety = helpfulness, safety
        self.threshold = threshold
        self.whiten = whiten
        self.safety_column = safety_column
        self.rm_outputs = rm_outputs
        self.moments = RunningMoments()
        self._warned_untagged = False
        self.__name__ = "safety_gated_reward"  # the name TRL logs the reward under

    def _scores(self, scorer: Callable, prompts, responses) -> torch.Tensor:
        values = torch.as_tensor(list(scorer(prompts, responses)), dtype=torch.float32).cpu()
        if values.shape != (len(prompts),):
            raise ValueError(f"a reward model returned {tuple(values.shape)} scores for {len(prompts)} pairs")
        return values

    def safety_probability(self, safety: torch.Tensor) -> torch.Tensor:
        """sigmoid(R_s) of the safety RM's scores (as they are when the scorer returns probabilities)."""
        return safety if self.rm_outputs == "probabilities" else torch.sigmoid(safety)

    def unsafe(self, safety: torch.Tensor) -> torch.Tensor:
        """The gate (paper Eq. 3): which responses the safety RM's scores flag unsafe, sigmoid(R_s) < threshold. The
        one definition the reward and the loop's reward-model annotator (its safety labels) share."""
        return self.safety_probability(torch.as_tensor(safety, dtype=torch.float32)) < self.threshold

    def score(self, prompts: Sequence[Prompt], responses: Sequence, **columns) -> RewardOutput:
        """Rewards and components (helpfulness, safety, safety_prob, used_safety, gated) of a batch."""
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"got {n} prompts but {len(responses)} responses")
        responses = [response_text(r) for r in responses]
        tagged = _flags(self._safety_tags(columns), n, self.safety_column)
        safety = self._scores(self.safety, prompts, responses)
        safety_prob = self.safety_probability(safety)
        use_safety = tagged | self.unsafe(safety)
        helpfulness = torch.full((n,), float("nan"))
        rows = (~use_safety).nonzero().flatten().tolist()
        if rows:
            helpfulness[rows] = self._scores(self.helpfulness, [prompts[i] for i in rows],
                                             [responses[i] for i in rows])
        gated = torch.where(use_safety, safety, helpfulness)
        if self.rm_outputs == "probabilities":
            gated = logit(gated)
        rewards = self._whiten(gated)
        components = {"helpfulness": helpfulness, "safety": safety, "safety_prob": safety_prob,
                      "used_safety": use_safety.float(), "gated": gated}
        return RewardOutput(rewards=rewards, raw=gated.clone(), components=components)

    def _safety_tags(self, columns: dict):
        """The safety tags among the call's columns (None: no prompt is tagged, warned once). A column that looks like
        a misnamed safety tag is refused: ignoring it would silently gate nothing on the prompt tags."""
        for name in columns:
            if name != self.safety_column and _looks_like_safety_tag(name, self.safety_column):
                raise ValueError(f"unknown column {name!r}: the safety tag of a prompt is {self.safety_column!r} "
                                 "(a bool per prompt)")
        if self.safety_column not in columns and not self._warned_untagged:
            self._warned_untagged = True
            logger.warning("%s called without %r: no prompt is tagged as a safety prompt, so only the safety RM's "
                           "score (sigmoid < %s) chooses R_s", type(self).__name__, self.safety_column, self.threshold)
        return columns.get(self.safety_column)

    def _whiten(self, gated: torch.Tensor) -> torch.Tensor:
        if self.whiten == "none":
            return gated.clone()
        if self.whiten == "batch":
            if gated.numel() < 2:
                logger.warning("batch whitening of a single score gives 0: use whiten='running' for batch size 1")
            return whiten(gated)
        self.moments.update(gated)
        return (gated - self.moments.mean) / math.sqrt(self.moments.var + 1e-8)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence, **kwargs) -> list[float]:
        """TRL reward-function form; logs the components' means through TRL's `log_metric` when given."""
        log_metric = kwargs.get("log_metric")
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_ONLY_KWARGS}
        out = self.score(prompts, completions, **columns)
        if log_metric is not None:
            for name, values in out.components.items():
                if not torch.isnan(values).all():
                    log_metric(f"{self.__name__}/{name}", float(values.nanmean()))
        return out.rewards.tolist()

    def state_dict(self) -> dict:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state["moments"])


__all__ = ["RewardOutput", "RewardModelScorer", "RunningMoments", "SafetyGatedReward", "WHITEN_MODES",
           "response_text", "score_with"]

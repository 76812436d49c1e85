"""Losses and estimators of the Llama 2-Chat pipeline, as pure functions (tensors in, tensors out).

Trainers call these; tests check them against hand-computed values. Nothing here touches a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------------
# Reward modelling (paper §3.2.2, Eq. 2, Table 27)
# ---------------------------------------------------------------------------------------------------------------------

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
"""Preference-strength labels, strongest first. `unsure` is read as `negligibly_better` (the paper pools them)."""

MARGIN_PRESETS: dict[str, dict[str, float]] = {
    "none": {r: 0.0 for r in RATINGS},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def margin_ranking_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                        margins: torch.Tensor | float | None = None) -> torch.Tensor:
    """Binary ranking loss with margin, `mean(-log sigmoid(r_c - r_r - m))` (paper Eq. 2; Eq. 1 when m = 0).

    Equal rewards and m = 0 give ln 2 = 0.693147; equal rewards and m = 1 give 1.313262.
    """
    diff = chosen_rewards - rejected_rewards
    if margins is not None:
        diff = diff - margins
    return -F.logsigmoid(diff).mean()


# ---------------------------------------------------------------------------------------------------------------------
# RLHF (paper §3.2.3)
#
# Conventions: per-token tensors are (B, T) over the response tokens only, right-padded, with `mask` 1 on real
# response tokens (a contiguous prefix of each row) and 0 on padding. Means over tokens are taken over every real
# token of the batch (token-level, not per-sequence-then-batch). Where the paper is silent the choices are documented
# on the function and exposed as arguments.
# ---------------------------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (all positions when `mask` is None); 0 for an empty mask."""
    if mask is None:
        return values.mean()
    # `where`, not a product: a NaN or inf at a padded position (e.g. a fully masked attention row) must not leak in.
    return torch.where(mask.bool(), values, 0.0).sum() / mask.sum().clamp(min=1).to(values.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Population variance (divide by n, not n - 1) over the masked positions: one value gives 0, not NaN."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """`(x - mean) / sqrt(var + eps)` with the statistics of the masked entries (the paper's WHITEN).

    Uses population variance; `shift_mean=False` rescales without centring (adds the mean back). Masked-out entries
    are returned as 0. Example: [1, 2, 3, 4] -> [-1.341641, -0.447214, 0.447214, 1.341641].
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(out.dtype)


def logit(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`log(p / (1 - p))`, the inverse of the sigmoid (the paper's LOGIT), with p clamped to [eps, 1 - eps]."""
    probs = probs.clamp(eps, 1.0 - eps)
    return torch.log(probs) - torch.log1p(-probs)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position: (B, T, V), (B, T) -> (B, T), computed in float32."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, (..., V) -> (...), in nats: `logsumexp(z) - sum(p * z)`."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_0) from the log-probabilities of the sampled tokens.

    With `d = log pi_theta(a) - log pi_0(a)` for a token a sampled from pi_theta (Schulman's estimators):
    - "k1": `d` (unbiased, can be negative per token; summed over the response it is the usual sequence KL);
    - "k2": `d^2 / 2` (biased, non-negative);
    - "k3": `exp(-d) - 1 + d` (unbiased, non-negative);
    - "abs": `|d|`.
    The paper does not say which it used; "k1" is the default (as in Stiennon et al. 2020 and TRL's old PPO).
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-padded (B, T) mask; 0 for an empty row."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token PPO rewards: `-beta * kl_t` at every response token, plus the sequence score at its last token.

    This is the paper's `R(g|p) = R~_c(g|p) - beta * KL` spread over tokens (the KL as a per-token penalty, the
    whitened safety-gated score at the final token). `scores` is (B,), `kl` and `mask` are (B, T).
    """
    mask = mask.to(kl.dtype)
    rewards = -beta * kl * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_positions(mask)] += scores.to(rewards.dtype) * (mask.sum(-1) > 0).to(rewards.dtype)
    return rewards


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    `delta_t = r_t + gamma * V_{t+1} - V_t` with `V = 0` after the last real token (the episode ends there);
    `A_t = delta_t + gamma * lam * A_{t+1}`; returns `A_t + V_t`. Outputs are 0 on padding. With
    gamma = lam = 1, `A_t` is the reward-to-go minus `V_t`. Defaults gamma=1, lam=0.95 (Stiennon et al. 2020's
    setting, which TRL's PPO also used); the paper does not give them.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # Padding after the end carries nothing back: the masked step resets the recursion to 0.
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, `mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))` with `r = exp(logp - logp_old)`.

    Returns the loss and detached statistics: `clipfrac` (share of tokens where the clipped term is active),
    `approx_kl` (`mean((r - 1) - log r)`, the k3 estimate of KL(old || new)) and `ratio` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range_value: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """`0.5 * mean(max((V - R)^2, (V_clip - R)^2))` with `V_clip = V_old + clip(V - V_old, -c, c)`.

    `clip_range_value=None` gives the plain squared error. Returns the loss and the share of tokens where the
    clipped error was the larger one.
    """
    error = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(error, mask), torch.zeros((), device=values.device)
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    return loss, masked_mean((clipped_error > error).float(), mask).detach()


RATING_ALIASES = {"unsure": "negligibly_better"}
"""Other spellings accepted for a rating; the paper pools `unsure` with `negligibly_better` (Table 8)."""


def canonical_rating(rating: str | None) -> str | None:
    """`rating` as one of `RATINGS` (`unsure` -> `negligibly_better`); None stays None (an unrated pair)."""
    if rating is None:
        return None
    rating = RATING_ALIASES.get(rating, rating)
    if rating not in RATINGS:
        raise ValueError(f"unknown rating {rating!r}; expected one of {RATINGS + tuple(RATING_ALIASES)} or None")
    return rating


def resolve_margins(margins: str | dict[str, float]) -> dict[str, float]:
    """A Table 27 preset name (`none`, `small`, `large`) or a custom {rating: margin} map, checked and completed
    with `unsure` (always equal to `negligibly_better`)."""
    if isinstance(margins, str):
        if margins not in MARGIN_PRESETS:
            raise ValueError(f"unknown margin preset {margins!r}; expected one of {sorted(MARGIN_PRESETS)} or a map")
        table = dict(MARGIN_PRESETS[margins])
    else:
        table = {canonical_rating(k): float(v) for k, v in dict(margins).items()}
        missing = [r for r in RATINGS if r not in table]
        if missing:
            raise ValueError(f"custom margin map lacks ratings {missing}; it needs all of {RATINGS}")
    if not all(torch.isfinite(torch.tensor(v)) for v in table.values()):
        raise ValueError(f"margins must be finite numbers, got {table}")
    return table


def margins_for(ratings, margins: str | dict[str, float] = "small") -> torch.Tensor:
    """m(r) of paper Eq. 2 for each rating: a float tensor of shape (N,).

    `ratings` holds rating strings (any spelling `canonical_rating` accepts) or None for unrated pairs, which get
    margin 0 (plain Eq. 1), like `negligibly_better` in every Table 27 preset.
    """
    table = resolve_margins(margins)
    values = [0.0 if r is None else table[canonical_rating(r)] for r in ratings]
    return torch.tensor(values, dtype=torch.float32)


def safety_auxiliary_loss(rewards: torch.Tensor, safe_labels: torch.Tensor) -> torch.Tensor:
    """Optional safety auxiliary term for the Safety RM (paper §A.3.4, Table 29: neither its form nor weight given).

    Our choice: binary cross-entropy that reads `sigmoid(reward)` as P(response is safe), i.e. `-log sigmoid(r)` on
    responses labelled safe and `-log sigmoid(-r)` on responses labelled unsafe, averaged over labelled responses.
    It pushes unsafe responses below score 0.5 (reward 0), the threshold at which the paper reports the
    unsafe-response recall that this loss improved (73.0 -> 90.4).

    rewards: (N,) scalar rewards. safe_labels: (N,) with 1 = safe, 0 = unsafe, -1 = unknown (ignored).
    With no labelled response the result is a zero that stays connected to the graph. Reward 0 gives ln 2.
    """
    known = safe_labels >= 0
    signs = torch.where(safe_labels > 0, 1.0, -1.0).to(rewards.dtype)
    per_response = -F.logsigmoid(signs * rewards) * known.to(rewards.dtype)
    return per_response.sum() / known.sum().clamp(min=1)

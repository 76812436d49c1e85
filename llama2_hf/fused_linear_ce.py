"""Cross-entropy, log-probabilities and entropy of a linear LM head without the (tokens x vocab) logits.

`hidden @ weight.T` is computed a chunk of tokens at a time; each chunk's logits live only inside the loop, so the
peak is one (chunk x vocab) block instead of several (tokens x vocab) tensors (logits, log-softmax, their gradient).
The softmax is accumulated in float32 whatever the input dtype. Same idea as Liger's fused linear cross-entropy and
Apple's Cut Cross-Entropy, in plain PyTorch so that it runs on CPU and GPU alike.

Two backward strategies, chosen by what the caller's gradient can be:
- `linear_cross_entropy(..., reduction="mean" | "sum")`: the upstream gradient is one scalar, so the gradients of
  hidden and weight are computed inside the forward loop while each chunk's softmax is at hand (3 matmuls per chunk,
  as many as the unfused head) and only scaled in backward. Costs one float32 (vocab x hidden) buffer held from
  forward to backward. Skipped when no input needs a gradient (evaluation).
- `linear_log_probs` and `reduction="none"`: the upstream gradient is per token (PPO's clipped ratio, an entropy
  bonus), unknown in forward, so backward recomputes each chunk's logits (4 matmuls per chunk: one more than
  unfused) and keeps nothing of vocabulary size between forward and backward.

Tokens whose label is `ignore_index` are dropped before the projection, so masked prompt tokens cost nothing.

This file is copied next to the weights with `modeling_llama2.py` (which imports it): it imports only torch.
"""

from __future__ import annotations

import torch

# Rows per chunk are sized so that one float32 (chunk x vocab) block is about this many bytes (vocab 32,000 ->
# 1024 rows): large enough for efficient matmuls, small next to the (tokens x vocab) tensors it replaces.
_CHUNK_BYTES = 2**27


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: a power of two with a float32 chunk of logits near 128 MiB, in [16, 8192]."""
    rows = max(1, _CHUNK_BYTES // (4 * vocab_size))
    return min(8192, max(16, 1 << (rows.bit_length() - 1)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (fp32 master weights, bf16 compute), else the inputs' common one."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """float32 scaled logits z (n, V), logsumexp (n), target log-prob (n), and the entropy (n) if asked.

    `logits` is a fresh matmul output: it is scaled in place when already float32, so no second (n, V) block."""
    z = logits.float()
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    target_logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = None
    if with_entropy:
        # -sum p log p on log p = z - lse: `lse - sum p z` would cancel catastrophically when the logits are large
        logp = z - lse[:, None]
        entropy = -torch.einsum("nv,nv->n", logp.exp(), logp)
    return z, lse, target_logp, entropy


def _backprop_chunk(g: torch.Tensor, h_c: torch.Tensor, w: torch.Tensor, part: slice, grad_h: torch.Tensor | None,
                    grad_w: torch.Tensor | None) -> None:
    """Given d loss / d logits of one chunk (float32, (n, V)): write its hidden rows' gradient, add its weight's."""
    g = g.to(w.dtype)
    if grad_h is not None:
        grad_h[part] = g @ w
    if grad_w is not None:
        if g.dtype == torch.float32:
            grad_w.addmm_(g.T, h_c)
        else:  # accumulate the chunks' low-precision products in float32
            grad_w += (g.T @ h_c).float()


class _LinearCrossEntropySummed(torch.autograd.Function):
    """Sum over tokens of -log softmax(hidden @ weight.T / temperature)[target]; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h, w = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk_size):
            h_c, t_c = h[start:start + chunk_size], targets[start:start + chunk_size]
            z, lse, target_logp, _ = _chunk_stats(h_c @ w.T, t_c, temperature, with_entropy=False)
            total -= target_logp.sum()
            if not (need_h or need_w):
                continue
            # d(-log p_t)/dz = softmax(z) - onehot(t); d z / d logits = 1 / temperature. Built in place in z.
            g = z.sub_(lse[:, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), t_c] -= 1.0
            if temperature != 1.0:
                g.div_(temperature)
            _backprop_chunk(g, h_c, w, slice(start, start + chunk_size), grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        # The upstream gradient of a scalar is a scalar: scale the gradients made in forward, in place.
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_total.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    """Per-token log softmax(hidden @ weight.T / temperature)[target] and entropy; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, dtype, with_entropy):
        h, w = hidden.to(dtype), weight.to(dtype)
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
        for start in range(0, n, chunk_size):
            part = slice(start, start + chunk_size)
            _, lse[part], logp[part], ent = _chunk_stats(h[part] @ w.T, targets[part], temperature, with_entropy)
            if with_entropy:
                entropy[part] = ent
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.config = (temperature, chunk_size, dtype)
        if with_entropy:
            return logp, entropy
        no_entropy = torch.empty(0, device=hidden.device)
        ctx.mark_non_differentiable(no_entropy)
        return logp, no_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, dtype = ctx.config
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h, w = hidden.to(dtype), weight.to(dtype)
        with_entropy = entropy is not None and grad_entropy is not None and grad_entropy.numel() > 0
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        for start in range(0, h.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h_c, t_c = h[part], targets[part]
            z = (h_c @ w.T).float()
            if temperature != 1.0:
                z.div_(temperature)
            logp = z.sub_(lse[part, None])  # (n, V), in place
            p = logp.exp()
            gl = grad_logp[part].float()
            if with_entropy:
                # d entropy / dz_k = -p_k (log p_k + entropy);  d log p_t / dz_k = onehot_k(t) - p_k
                ge = grad_entropy[part].float()
                g = logp.add_(entropy[part, None]).mul_(ge[:, None]).add_(gl[:, None]).mul_(p).neg_()
            else:
                g = p.mul_(-gl[:, None])
            g[torch.arange(g.shape[0], device=g.device), t_c] += gl
            if temperature != 1.0:
                g.div_(temperature)
            _backprop_chunk(g, h_c, w, part, grad_h, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None,
           temperature: float) -> int:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({hidden.shape[0]},); got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size is None:
        return default_chunk_size(weight.shape[0])
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def _check_ids(targets: torch.Tensor, vocab_size: int, what: str) -> None:
    # An out-of-range id would index past the vocabulary (a silent wrong value on CPU, an assert on GPU).
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(f"{what} must be in [0, {vocab_size}) (or ignore_index); got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T / temperature, labels, ignore_index=..., reduction=...)` in chunks.

    hidden (N, H), weight (V, H), labels (N,) int. "mean" divides by the number of non-ignored labels (NaN when there
    are none, as `F.cross_entropy`); "sum" sums them; "none" returns (N,) float32 with 0 at ignored positions.
    Differentiable w.r.t. hidden and weight. Under autocast the matmuls run in autocast's dtype; gradients come back
    in the inputs' dtypes.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    chunk_size = _check(hidden, weight, labels, chunk_size, temperature)
    valid = labels != ignore_index
    if reduction == "none":
        logp = linear_log_probs(hidden, weight, labels.masked_fill(~valid, 0), temperature=temperature,
                                chunk_size=chunk_size, mask=valid)
        return -logp
    rows = valid.nonzero().squeeze(1)  # ignored tokens are never projected
    targets = labels[rows]
    _check_ids(targets, weight.shape[0], "labels")
    dtype = _compute_dtype(hidden, weight)
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad: detach, or the forward would build gradients nobody asks for
        hidden, weight = hidden.detach(), weight.detach()
    with torch.autocast(hidden.device.type, enabled=False):
        total = _LinearCrossEntropySummed.apply(hidden[rows], weight, targets, float(temperature), chunk_size, dtype)
    return total / rows.numel() if reduction == "mean" else total


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     with_entropy: bool = False, chunk_size: int | None = None, mask: torch.Tensor | None = None):
    """Per-token `log_softmax(hidden @ weight.T / temperature)[targets]` (N,) float32, and with `with_entropy` also
    the entropy of that softmax (N,) float32: returns `logp` or `(logp, entropy)`.

    hidden (N, H) or (B, T, H) with targets of the same leading shape (outputs take that shape too). `mask` (same
    shape, bool) selects the tokens to score; the others get 0 in both outputs, carry no gradient and are never
    projected. Differentiable w.r.t. hidden and weight for any downstream use of logp and entropy (backward
    recomputes each chunk's logits).
    """
    lead = targets.shape
    if hidden.dim() == 3:
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        mask = None if mask is None else mask.reshape(-1)
    chunk_size = _check(hidden, weight, targets, chunk_size, temperature)
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask must have the shape of targets {tuple(lead)}; got {tuple(mask.shape)}")
        rows = mask.nonzero().squeeze(1)
        hidden_in, targets_in = hidden[rows], targets[rows]
    else:
        hidden_in, targets_in = hidden, targets
    _check_ids(targets_in, weight.shape[0], "targets")
    dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = _LinearLogProbs.apply(hidden_in, weight, targets_in, float(temperature), chunk_size, dtype,
                                              with_entropy)
    if mask is not None:
        # Scatter back to every position; index_put keeps the result differentiable even when nothing is selected.
        full = logp.new_zeros(targets.shape[0])
        logp = full.index_put((rows,), logp)
        if with_entropy:
            entropy = full.index_put((rows,), entropy)
    logp = logp.view(lead)
    return (logp, entropy.view(lead)) if with_entropy else logp


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` on the head `hidden_states @ weight.T` without building the logits.

    hidden_states (B, T, H); `labels` (B, T) are shifted here (position t is scored against label t+1, the last
    position against nothing), or pass already shifted `shift_labels`. With `num_items_in_batch` the loss is the
    sum over tokens divided by it (correct under gradient accumulation), else the mean over non-ignored tokens.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("pass labels or shift_labels")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, H)
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, shift_labels, ignore_index, "mean", chunk_size)
    loss = linear_cross_entropy(hidden, weight, shift_labels, ignore_index, "sum", chunk_size)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


__all__ = ["causal_lm_loss", "default_chunk_size", "linear_cross_entropy", "linear_log_probs"]

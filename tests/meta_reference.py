"""Meta's original Llama 2 format, for tests: the forward pass of `llama/model.py` and the checkpoint writer.

- `meta_forward` re-implements `Transformer.forward(tokens, start_pos=0)` of meta-llama/llama `llama/model.py` with
  its parameter names and its complex-number RoPE (`torch.polar` / `torch.view_as_complex` on interleaved pairs).
  Single process: each weight is the full (merged) tensor.
- `split_model_parallel` cuts a full state dict into N model-parallel pieces exactly as fairscale's layers hold
  them (ColumnParallelLinear on dim 0, RowParallelLinear and ParallelEmbedding on dim 1, norms replicated), and
  `write_meta_checkpoint` writes `consolidated.NN.pth` + `params.json` like Meta's release.

Nothing here imports llama2_hf: it is the independent side of the conversion tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# Split dimension of each per-layer weight under Meta's model parallelism (None: replicated).
LAYER_SPLIT = {
    "attention.wq.weight": 0,  # ColumnParallelLinear
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,  # RowParallelLinear
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
TOP_SPLIT = {"tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0}  # ParallelEmbedding: dim 1


def ffn_hidden_size(params: dict) -> int:
    """`FeedForward.__init__`: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def split_rule(name: str) -> int | None:
    if name in TOP_SPLIT:
        return TOP_SPLIT[name]
    return LAYER_SPLIT[name.split(".", 2)[2]]  # "layers.{i}.<rest>"


def random_meta_state_dict(params: dict, vocab_size: int, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full (unsplit) state dict with Meta's names and shapes, in `Transformer.state_dict()` order.

    Norm weights are drawn around 1 (not left at 1) so that a swapped or missing norm changes the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd, ffn = dim // n_heads, ffn_hidden_size(params)

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def norm():
        return (1.0 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)

    sd = {"tok_embeddings.weight": (torch.randn(vocab_size, dim, generator=gen)).to(dtype)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(n_heads * hd, dim)
        sd[p + "attention.wk.weight"] = w(n_kv * hd, dim)
        sd[p + "attention.wv.weight"] = w(n_kv * hd, dim)
        sd[p + "attention.wo.weight"] = w(dim, n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = w(ffn, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, ffn)
        sd[p + "feed_forward.w3.weight"] = w(ffn, dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = w(vocab_size, dim)
    return sd


def split_model_parallel(state_dict: dict[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """What each of `n_shards` model-parallel ranks holds: rank r gets the r-th contiguous chunk along the split
    dimension (its heads / FFN units / embedding columns / vocab rows); norms go to every rank."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in state_dict.items():
        dim = split_rule(name)
        if dim is None:
            for shard in shards:
                shard[name] = tensor.clone()
            continue
        if tensor.shape[dim] % n_shards:
            raise ValueError(f"{name}: size {tensor.shape[dim]} on dim {dim} is not divisible by {n_shards}")
        for shard, piece in zip(shards, tensor.chunk(n_shards, dim=dim)):
            shard[name] = piece.clone()  # own storage: torch.save would otherwise write the whole tensor
    return shards


def write_meta_checkpoint(directory: str | Path, params: dict, state_dict: dict[str, torch.Tensor], n_shards: int,
                          rope_freqs: bool = False) -> list[Path]:
    """Write `params.json` and `consolidated.00.pth` ... as Meta's release does; returns the shard paths.

    `rope_freqs=True` adds the `rope.freqs` buffer that some of Meta's releases carry (the converter must ignore it).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "params.json", "w", encoding="utf-8") as f:
        json.dump(params, f)
    paths = []
    hd = params["dim"] // params["n_heads"]
    for rank, shard in enumerate(split_model_parallel(state_dict, n_shards)):
        if rope_freqs:
            shard["rope.freqs"] = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
        path = directory / f"consolidated.{rank:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Forward pass of llama/model.py (start_pos = 0, no KV cache)
# ---------------------------------------------------------------------------------------------------------------------

def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """(end, head_dim/2) complex unit numbers e^{i t f_k}, f_k = theta^(-2k/d)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate interleaved pairs (x[2k], x[2k+1]) as complex numbers. xq, xk: (B, T, heads, d); freqs: (T, d/2)."""
    q_c = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, nh, d/2)
    k_c = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    rot = freqs_cis[None, :, None, :]  # (1, T, 1, d/2)
    q_out = torch.view_as_real(q_c * rot).flatten(3)  # (B, T, nh, d)
    k_out = torch.view_as_real(k_c * rot).flatten(3)
    return q_out.type_as(xq), k_out.type_as(xk)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, n_kv, d) -> (B, T, n_kv * n_rep, d)."""
    if n_rep == 1:
        return x
    b, t, n_kv, d = x.shape
    return x[:, :, :, None, :].expand(b, t, n_kv, n_rep, d).reshape(b, t, n_kv * n_rep, d)


@torch.no_grad()
def meta_forward(state_dict: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor,
                 max_seq_len: int = 4096) -> torch.Tensor:
    """Logits (B, T, V) in float32 of Meta's `Transformer.forward(tokens, start_pos=0)`."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd, eps = dim // n_heads, params.get("norm_eps", 1e-5)
    bsz, seqlen = tokens.shape
    freqs_cis = precompute_freqs_cis(hd, max_seq_len * 2, params.get("rope_theta", 10000.0))[:seqlen]
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)

    h = F.embedding(tokens, state_dict["tok_embeddings.weight"])  # (B, T, D)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, state_dict[p + "attention_norm.weight"], eps)
        xq = F.linear(x, state_dict[p + "attention.wq.weight"]).view(bsz, seqlen, n_heads, hd)
        xk = F.linear(x, state_dict[p + "attention.wk.weight"]).view(bsz, seqlen, n_kv, hd)
        xv = F.linear(x, state_dict[p + "attention.wv.weight"]).view(bsz, seqlen, n_kv, hd)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys = repeat_kv(xk, n_heads // n_kv).transpose(1, 2)  # (B, nh, T, d)
        values = repeat_kv(xv, n_heads // n_kv).transpose(1, 2)
        xq = xq.transpose(1, 2)  # (B, nh, T, d)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(hd) + mask  # (B, nh, T, T)
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)  # (B, T, nh*d)
        h = h + F.linear(out, state_dict[p + "attention.wo.weight"])
        x = rms_norm(h, state_dict[p + "ffn_norm.weight"], eps)
        gate = F.silu(F.linear(x, state_dict[p + "feed_forward.w1.weight"]))
        up = F.linear(x, state_dict[p + "feed_forward.w3.weight"])
        h = h + F.linear(gate * up, state_dict[p + "feed_forward.w2.weight"])
    h = rms_norm(h, state_dict["norm.weight"], eps)
    return F.linear(h, state_dict["output.weight"]).float()

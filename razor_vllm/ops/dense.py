"""Dense float64 oracle of the whole attention rule, for tests only.

Deliberately written differently from the kernels: no paging, no running sums, one query at a
time, with the kept positions listed explicitly and the compensation taken as a plain mean of the
dropped keys/values. If the paged kernels and this agree, both the rule and the bookkeeping
(block tables, the stored sums, chunking) are right.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

Compensation = Literal["weighted", "unweighted", "none"]


def _expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[..., n_kv, D] -> [..., Hq, D]: query head j reads KV head j // g."""
    return x.repeat_interleave(num_q_heads // x.shape[-2], dim=-2)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, extra=None) -> torch.Tensor:
    """One query [Hq, D] over keys/values [n, Hq, D]; ``extra`` = (logit [Hq], value [Hq, D])."""
    logits = scale * torch.einsum("hd,nhd->hn", q, keys)
    if extra is not None:
        logits = torch.cat([extra[0][:, None], logits], dim=1)
        values = torch.cat([extra[1][None], values], dim=0)
    return torch.einsum("hn,nhd->hd", logits.softmax(-1), values)


def dense_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: Sequence[int],
    sink: int,
    window: int,
    scale: float,
    compensation: Compensation = "weighted",
) -> torch.Tensor:
    """RazorAttention for local heads. q [Tq, Hq, D]; k, v [L, n_kv, D] for positions 0..L-1.

    ``compensation`` = "weighted" is the rule we implement (logit + ln(n_d)); "unweighted" (the
    reference deploy code) and "none" (StreamingLLM) exist so tests can show the difference matters.
    """
    q, k, v = q.double(), k.double(), v.double()
    num_q_heads = q.shape[1]
    out = torch.empty_like(q)
    for i, t in enumerate(int(p) for p in query_positions):
        kept = list(range(min(sink, t + 1))) + list(range(max(sink, t - window + 1), t + 1))
        keys, values = _expand_kv(k[kept], num_q_heads), _expand_kv(v[kept], num_q_heads)
        n_dropped = t - window + 1 - sink
        extra = None
        if n_dropped > 0 and compensation != "none":
            dropped = slice(sink, t - window + 1)  # positions [S, t-W]
            k_hat = _expand_kv(k[dropped].mean(0), num_q_heads)
            v_hat = _expand_kv(v[dropped].mean(0), num_q_heads)
            weight = math.log(n_dropped) if compensation == "weighted" else 0.0
            extra = (scale * (q[i] * k_hat).sum(-1) + weight, v_hat)
        out[i] = _attend(q[i], keys, values, scale, extra)
    return out


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_positions: Sequence[int], scale: float
) -> torch.Tensor:
    """Ordinary causal attention (retrieval heads): the query at t sees positions 0..t."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for i, t in enumerate(int(p) for p in query_positions):
        out[i] = _attend(q[i], _expand_kv(k[: t + 1], q.shape[1]), _expand_kv(v[: t + 1], q.shape[1]), scale)
    return out


def dense_razor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: Sequence[int],
    retrieval_heads: Sequence[bool],
    sink: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """A whole layer: causal attention for KV heads marked retrieval, the local rule for the rest.

    ``retrieval_heads`` has one flag per KV head of k/v; query heads follow their KV head (GQA).
    """
    num_kv_heads = k.shape[1]
    if len(retrieval_heads) != num_kv_heads:
        raise ValueError(f"retrieval_heads has {len(retrieval_heads)} flags for {num_kv_heads} KV heads")
    g = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for h, is_retrieval in enumerate(retrieval_heads):
        qh, kh, vh = q[:, h * g : (h + 1) * g], k[:, h : h + 1], v[:, h : h + 1]
        if is_retrieval:
            out[:, h * g : (h + 1) * g] = dense_causal_attention(qh, kh, vh, query_positions, scale)
        else:
            out[:, h * g : (h + 1) * g] = dense_local_attention(qh, kh, vh, query_positions, sink, window, scale)
    return out

"""Dense float64 oracle of the whole attention rule, for tests only.

Deliberately written differently from the kernels: no paging, no running sums, no block tails, one
query at a time. The kept positions are listed explicitly, the dropped ones are "every earlier
position that is not kept", and the compensation is their plain mean. The block tails the kernels
store are recomputed here from scratch for each block. If the paged kernels and this agree, both the
rule and the bookkeeping (block tables, tails, chunking, prefill modes) are right.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

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


def kept_positions(t: int, sink: int, window: int, prompt_len: Optional[int] = None) -> list[int]:
    """The positions a local head's query at t attends to directly.

    ``prompt_len`` given (exact prefill): a prompt query (t < prompt_len) keeps every position 0..t.
    Otherwise the sinks and the window.
    """
    if prompt_len is not None and t < prompt_len:
        return list(range(t + 1))
    kept = {p for p in range(t + 1) if p < sink or p > t - window}
    return sorted(kept)


def dense_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: Sequence[int],
    sink: int,
    window: int,
    scale: float,
    compensation: Compensation = "weighted",
    prompt_len: Optional[int] = None,
) -> torch.Tensor:
    """RazorAttention for local heads. q [Tq, Hq, D]; k, v [L, n_kv, D] for positions 0..L-1.

    ``prompt_len`` None: the compressed prefill (every query follows sinks + window + compensation);
    an int: exact prefill (queries before it are plain causal attention). ``compensation`` =
    "weighted" is the rule we implement (logit + ln(n_d)); "unweighted" (the reference deploy code)
    and "none" (StreamingLLM) exist so tests can show the difference matters.
    """
    q, k, v = q.double(), k.double(), v.double()
    num_q_heads = q.shape[1]
    out = torch.empty_like(q)
    for i, t in enumerate(int(p) for p in query_positions):
        kept = kept_positions(t, sink, window, prompt_len)
        dropped = sorted(set(range(t + 1)) - set(kept))
        keys, values = _expand_kv(k[kept], num_q_heads), _expand_kv(v[kept], num_q_heads)
        extra = None
        if dropped and compensation != "none":
            k_hat = _expand_kv(k[dropped].mean(0), num_q_heads)
            v_hat = _expand_kv(v[dropped].mean(0), num_q_heads)
            weight = math.log(len(dropped)) if compensation == "weighted" else 0.0
            extra = (scale * (q[i] * k_hat).sum(-1) + weight, v_hat)
        out[i] = _attend(q[i], keys, values, scale, extra)
    return out


def dense_block_tail(k: torch.Tensor, v: torch.Tensor, block: int, block_size: int, sink: int) -> torch.Tensor:
    """What the tail of local block ``block`` must hold: [n_kv, 2, D] float64 sums of the keys (0) and
    values (1) over positions [sink, block * block_size), zeros when that range is empty."""
    positions = [p for p in range(block * block_size) if p >= sink]
    tail = torch.zeros(k.shape[1], 2, k.shape[2], dtype=torch.float64)
    for p in positions:  # one position at a time, from scratch: no running sum shared with other blocks
        tail[:, 0] += k[p].double()
        tail[:, 1] += v[p].double()
    return tail


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
    prompt_len: Optional[int] = None,
) -> torch.Tensor:
    """A whole layer: causal attention for KV heads marked retrieval, the local rule for the rest.

    ``retrieval_heads`` has one flag per KV head of k/v; query heads follow their KV head (GQA).
    ``prompt_len``: as in ``dense_local_attention`` (None = compressed prefill).
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
            out[:, h * g : (h + 1) * g] = dense_local_attention(
                qh, kh, vh, query_positions, sink, window, scale, prompt_len=prompt_len
            )
    return out

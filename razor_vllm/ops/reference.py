"""Plain PyTorch kernels for both KV pools: the readable definition of what the C++ path computes.

One loop over requests; within a request everything is batched tensor algebra. Computation runs
in float32 (float64 when the query is float64), the compensation sums are kept in ``comp``'s dtype.
The layout conventions are documented in ``razor_vllm.ops``.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch


class RequestSpan(NamedTuple):
    """The queries of one request in this step: rows [q_start, q_end), positions [p0, p1]."""

    req: int
    q_start: int
    q_end: int
    p0: int
    p1: int


def request_spans(seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> Iterator[RequestSpan]:
    """Requests that have queries this step (vLLM may pad the batch with empty ones)."""
    seq_lens = seq_lens.tolist()
    starts = query_start_loc.tolist()
    for req, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[req], starts[req + 1]
        if q_end > q_start:
            yield RequestSpan(req, q_start, q_end, seq_len - (q_end - q_start), seq_len - 1)


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def gather(
    cache: torch.Tensor,
    block_row: torch.Tensor,
    positions: torch.Tensor,
    head_offset: int,
    num_kv_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows of ``positions`` of one request from a paged cache [blocks, H_pool, block_size, D].

    Returns [num_kv_heads, len(positions), D]. Only the listed positions' blocks are touched, so
    freed (garbage) block-table entries are never dereferenced.
    """
    block_size = cache.shape[2]
    blocks = block_row[positions // block_size].long()
    layer = cache[:, head_offset : head_offset + num_kv_heads]
    return layer[blocks, :, positions % block_size].transpose(0, 1).to(dtype)


def _per_kv_head(query_rows: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[q_len, Hq, D] -> [n_kv, g, q_len, D]: query head j reads KV head j // g."""
    q_len, num_q_heads, head_size = query_rows.shape
    g = num_q_heads // num_kv_heads
    return query_rows.to(dtype).view(q_len, num_kv_heads, g, head_size).permute(1, 2, 0, 3)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[n_kv, g, q_len, D] -> [q_len, Hq, D]."""
    n_kv, g, q_len, head_size = out.shape
    return out.permute(2, 0, 1, 3).reshape(q_len, n_kv * g, head_size)


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [n_kv, g, q_len, D] x keys [n_kv, P, D] -> [n_kv, g, q_len, P], one bmm (no broadcast copies)."""
    n_kv, g, q_len, _ = q.shape
    return (q.flatten(1, 2) @ keys.transpose(1, 2)).view(n_kv, g, q_len, -1)


def _mix(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs [n_kv, g, q_len, P] x values [n_kv, P, D] -> [n_kv, g, q_len, D]."""
    n_kv, g, q_len, _ = probs.shape
    return (probs.flatten(1, 2) @ values).view(n_kv, g, q_len, -1)


def _check_heads(query: torch.Tensor, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or query.shape[1] % num_kv_heads:
        raise ValueError(f"num_q_heads={query.shape[1]} is not a multiple of num_kv_heads={num_kv_heads}")


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    head_offset: int,
    num_kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of retrieval heads over the full paged cache."""
    _check_heads(query, num_kv_heads)
    dtype = compute_dtype(query)
    out = torch.zeros_like(query)
    for span in request_spans(seq_lens, query_start_loc):
        positions = torch.arange(span.p1 + 1)
        row = block_table[span.req]
        keys = gather(key_cache, row, positions, head_offset, num_kv_heads, dtype)
        values = gather(value_cache, row, positions, head_offset, num_kv_heads, dtype)
        q = _per_kv_head(query[span.q_start : span.q_end], num_kv_heads, dtype)
        t = torch.arange(span.p0, span.p1 + 1)[:, None]
        logits = (scale * _scores(q, keys)).masked_fill(positions[None, :] > t, -math.inf)
        out[span.q_start : span.q_end] = _merge_heads(_mix(logits.softmax(-1), values)).to(out.dtype)
    return out


def local_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    comp: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    head_offset: int,
    num_kv_heads: int,
    sink: int,
    window: int,
    scale: float,
    compensation: bool = True,
) -> torch.Tensor:
    """RazorAttention for local heads: sinks + window + one count-weighted compensation key.

    Query at position t: sinks [0, min(S, t+1)), window [max(S, t-W+1), t] and, when
    n_d = t-W+1-S > 0, the mean key/value of [S, t-W] with logit scale*q.k_hat + ln(n_d).
    The sums over [S, t-W] are the stored slot (positions before p0+1-W) plus the cached rows
    [max(S, p0+1-W), t-W], which is why a chunk's later queries see more compensation.
    """
    _check_heads(query, num_kv_heads)
    dtype = compute_dtype(query)
    out = torch.zeros_like(query)
    for span in request_spans(seq_lens, query_start_loc):
        p0, p1 = span.p0, span.p1
        recent_start = max(sink, p0 + 1 - window)  # first position not in the stored sums
        sinks = torch.arange(min(sink, p1 + 1))
        positions = torch.cat([sinks, torch.arange(recent_start, max(recent_start, p1 + 1))])
        row = block_table[span.req]
        keys = gather(key_cache, row, positions, head_offset, num_kv_heads, dtype)
        values = gather(value_cache, row, positions, head_offset, num_kv_heads, dtype)
        q = _per_kv_head(query[span.q_start : span.q_end], num_kv_heads, dtype)

        t = torch.arange(p0, p1 + 1)[:, None]
        k = positions[None, :]
        in_sink = (k < sink) & (k <= t)
        in_window = (k >= sink) & (k > t - window) & (k <= t)
        folded = ((k >= recent_start) & (k <= t - window)).to(dtype)  # recent rows inside [S, t-W]

        if compensation and p0 + 1 - window > sink:
            stored = comp[int(row[0]), head_offset : head_offset + num_kv_heads].to(dtype)
        else:  # nothing folded yet: the slot may be uninitialised
            stored = torch.zeros(num_kv_heads, 2, q.shape[-1], dtype=dtype)
        key_sum = stored[:, 0, None, :] + folded @ keys  # [n_kv, q_len, D]
        value_sum = stored[:, 1, None, :] + folded @ values
        n_dropped = (t[:, 0] - window + 1 - sink).to(dtype)
        count = n_dropped.clamp(min=1)[:, None]
        comp_logit = scale * (q * (key_sum / count)[:, None]).sum(-1) + count[:, 0].log()
        comp_logit = comp_logit.masked_fill((n_dropped <= 0) | (not compensation), -math.inf)

        logits = (scale * _scores(q, keys)).masked_fill(~(in_sink | in_window), -math.inf)
        probs = torch.cat([comp_logit[..., None], logits], dim=-1).softmax(-1)
        attended = probs[..., :1] * (value_sum / count)[:, None] + _mix(probs[..., 1:].contiguous(), values)
        out[span.q_start : span.q_end] = _merge_heads(attended).to(out.dtype)
    return out


def fold_compensation(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    comp: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    head_offset: int,
    num_kv_heads: int,
    sink: int,
    window: int,
) -> None:
    """After attention: fold the positions that leave the window into the running sums, in place.

    For a request whose step covered [p0, p1], adds [max(S, p0+1-W), max(S, p1+2-W)) so that
    ``comp`` holds the sums of [S, p1+2-W) for the next step (first query p1+1). A slot whose
    sums are still empty is overwritten rather than added to (it is uninitialised on a new request).
    """
    for span in request_spans(seq_lens, query_start_loc):
        row = block_table[span.req]
        slot = comp[int(row[0]), head_offset : head_offset + num_kv_heads]
        if span.p0 + 1 - window <= sink:
            slot.zero_()
        lo, hi = max(sink, span.p0 + 1 - window), max(sink, span.p1 + 2 - window)
        if hi > lo:
            positions = torch.arange(lo, hi)
            slot[:, 0] += gather(key_cache, row, positions, head_offset, num_kv_heads, comp.dtype).sum(1)
            slot[:, 1] += gather(value_cache, row, positions, head_offset, num_kv_heads, comp.dtype).sum(1)

"""Plain PyTorch kernels for both KV pools: the readable definition of what C++ and Triton compute.

One loop over requests; within a request everything is batched tensor algebra. Device-agnostic:
every tensor is made on the caches' device, and each call reads the step's lengths to the host once
(so it is not CUDA-graph safe, but it runs on a GPU: ``RAZOR_VLLM_KERNELS=reference``). Computation
runs in float32 (float64 when the query is float64); the block tails are kept in ``tails``' dtype.
The layout and the rule are documented in ``razor_vllm.ops`` and the kernel contract.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional

import torch

from razor_vllm.ops.api import LocalRule, PagedBatch, PoolHeads


class RequestSpan(NamedTuple):
    """The queries of one request in this step: rows [q_start, q_end), positions [p0, p1]."""

    req: int
    q_start: int
    q_end: int
    p0: int
    p1: int
    prompt_len: Optional[int]  # None: no prompt lengths given
    window: Optional[int]  # None: the rule's window


def request_spans(batch: PagedBatch) -> Iterator[RequestSpan]:
    """Requests that have queries this step (vLLM may pad the batch with empty ones).

    One host read for the whole step: the lengths (and prompt lengths / windows when given) are
    concatenated on their device and copied once.
    """
    parts = [batch.seq_lens, batch.query_start_loc]
    for extra in (batch.prompt_lens, batch.windows):
        if extra is not None:
            parts.append(extra)
    host = torch.cat([p.reshape(-1).to(torch.int64) for p in parts]).tolist()
    num_reqs = batch.seq_lens.shape[0]
    seq_lens, starts = host[:num_reqs], host[num_reqs : 2 * num_reqs + 1]
    rest = host[2 * num_reqs + 1 :]
    prompt_lens = windows = None
    if batch.prompt_lens is not None:
        prompt_lens, rest = rest[:num_reqs], rest[num_reqs:]
    if batch.windows is not None:
        windows = rest[:num_reqs]
    for req, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[req], starts[req + 1]
        if q_end > q_start:
            prompt_len = None if prompt_lens is None else prompt_lens[req]
            window = None if windows is None else windows[req]
            yield RequestSpan(req, q_start, q_end, seq_len - (q_end - q_start), seq_len - 1, prompt_len, window)


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def gather(
    cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor, heads: PoolHeads, dtype: torch.dtype
) -> torch.Tensor:
    """Rows of ``positions`` of one request from a paged cache [blocks, H_pool, block_size, D].

    Returns [heads.count, len(positions), D]. Only the listed positions' blocks are touched, so
    freed (garbage) block-table entries are never dereferenced.
    """
    block_size = cache.shape[2]
    blocks = block_row[positions // block_size].long()
    layer = cache[:, heads.offset : heads.offset + heads.count]
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


def _check_heads(query: torch.Tensor, heads: PoolHeads) -> None:
    if heads.count <= 0 or query.shape[1] % heads.count:
        raise ValueError(f"num_q_heads={query.shape[1]} is not a multiple of num_kv_heads={heads.count}")


def _causal(query_rows, key_cache, value_cache, row, p0, p1, heads, scale, dtype) -> torch.Tensor:
    """Queries at positions [p0, p1] of one request over all positions [0, t]: [q_len, Hq, D]."""
    device = key_cache.device
    positions = torch.arange(p1 + 1, device=device)
    keys = gather(key_cache, row, positions, heads, dtype)
    values = gather(value_cache, row, positions, heads, dtype)
    q = _per_kv_head(query_rows, heads.count, dtype)
    t = torch.arange(p0, p1 + 1, device=device)[:, None]
    logits = (scale * _scores(q, keys)).masked_fill(positions[None, :] > t, -math.inf)
    return _merge_heads(_mix(logits.softmax(-1), values))


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: PagedBatch,
    heads: PoolHeads,
    scale: float,
) -> torch.Tensor:
    """Causal attention of retrieval heads over the full paged cache."""
    _check_heads(query, heads)
    dtype = compute_dtype(query)
    out = torch.zeros_like(query)
    for span in request_spans(batch):
        row = batch.block_table[span.req]
        rows = query[span.q_start : span.q_end]
        out[span.q_start : span.q_end] = _causal(
            rows, key_cache, value_cache, row, span.p0, span.p1, heads, scale, dtype
        ).to(out.dtype)
    return out


def _compressed(query_rows, key_cache, value_cache, tails, row, p0, p1, heads, rule, window, scale, dtype):
    """Queries at [p0, p1] of one request under sinks + window + compensation: [q_len, Hq, D].

    A query at t with n_d = t-W+1-S > 0 dropped positions takes the sums over [S, t-W] as the tail
    of block c = (t-W+1) // B (sums over [S, c*B)) plus the cached rows [max(S, c*B), t-W].
    """
    device, block_size, sink = key_cache.device, key_cache.shape[2], rule.sink
    first_window = max(p0 - window + 1, 0)
    lo = max(sink, first_window // block_size * block_size)  # earliest non-sink position any query reads
    sinks = torch.arange(min(sink, p1 + 1), device=device)
    positions = torch.cat([sinks, torch.arange(lo, max(lo, p1 + 1), device=device)])
    keys = gather(key_cache, row, positions, heads, dtype)
    values = gather(value_cache, row, positions, heads, dtype)
    q = _per_kv_head(query_rows, heads.count, dtype)

    t = torch.arange(p0, p1 + 1, device=device)[:, None]
    k = positions[None, :]
    in_sink = (k < sink) & (k <= t)
    in_window = (k >= sink) & (k > t - window) & (k <= t)
    logits = (scale * _scores(q, keys)).masked_fill(~(in_sink | in_window), -math.inf)
    if not rule.compensation:
        return _merge_heads(_mix(logits.softmax(-1), values))

    n_dropped = t[:, 0] - window + 1 - sink  # [q_len]
    has_comp = n_dropped > 0
    c = (t[:, 0] - window + 1).clamp(min=0) // block_size  # block of the oldest window position
    # Tails of block c per query; those of queries without dropped positions, and tails over an empty
    # range (c*B <= S: zeros by the contract), are not used (masked, so any garbage there is harmless).
    stored = tails[row[c].long(), heads.offset : heads.offset + heads.count].to(dtype)  # [q_len, n_kv, 2, D]
    use_tail = has_comp & (c * block_size > sink)
    stored = torch.where(use_tail[:, None, None, None], stored, torch.zeros((), dtype=dtype, device=device))
    folded = ((k >= sink) & (k >= c[:, None] * block_size) & (k <= t - window)).to(dtype)  # [q_len, P]
    key_sum = stored[:, :, 0].transpose(0, 1) + folded @ keys  # [n_kv, q_len, D]
    value_sum = stored[:, :, 1].transpose(0, 1) + folded @ values
    count = n_dropped.clamp(min=1).to(dtype)[:, None]
    comp_logit = scale * (q * (key_sum / count)[:, None]).sum(-1) + count[:, 0].log()
    comp_logit = comp_logit.masked_fill(~has_comp, -math.inf)
    probs = torch.cat([comp_logit[..., None], logits], dim=-1).softmax(-1)
    attended = probs[..., :1] * (value_sum / count)[:, None] + _mix(probs[..., 1:].contiguous(), values)
    return _merge_heads(attended)


def local_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    tails: torch.Tensor,
    batch: PagedBatch,
    heads: PoolHeads,
    rule: LocalRule,
    scale: float,
) -> torch.Tensor:
    """RazorAttention for local heads.

    Exact prefill: queries before the request's prompt length attend causally to [0, t]. Every
    other query: sinks [0, min(S, t+1)), window [max(S, t-W+1), t] and, when n_d = t-W+1-S > 0 and
    compensation is on, the mean key/value of [S, t-W] with logit scale*q.k_hat + ln(n_d).
    """
    _check_heads(query, heads)
    rule.check(batch)
    dtype = compute_dtype(query)
    out = torch.zeros_like(query)
    for span in request_spans(batch):
        row = batch.block_table[span.req]
        window = rule.window if span.window is None else span.window
        split = span.p0  # first compressed position
        if rule.exact_prefill:
            split = min(max(span.p0, span.prompt_len), span.p1 + 1)
        if split > span.p0:  # prompt queries [p0, split)
            rows = query[span.q_start : span.q_start + split - span.p0]
            out[span.q_start : span.q_start + split - span.p0] = _causal(
                rows, key_cache, value_cache, row, span.p0, split - 1, heads, scale, dtype
            ).to(out.dtype)
        if split <= span.p1:  # compressed queries [split, p1]
            rows = query[span.q_start + split - span.p0 : span.q_end]
            out[span.q_start + split - span.p0 : span.q_end] = _compressed(
                rows, key_cache, value_cache, tails, row, split, span.p1, heads, rule, window, scale, dtype
            ).to(out.dtype)
    return out


def write_block_tails(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    tails: torch.Tensor,
    batch: PagedBatch,
    heads: PoolHeads,
    rule: LocalRule,
) -> None:
    """Write the tail of every block started this step: tail(b) = sums of K/V over [S, b*B).

    For a request whose queries cover [p0, p1], blocks b with p0 <= b*B <= p1, in increasing b:
    tail(b) = tail(b-1) + sums over [max(S, (b-1)*B), b*B); zeros when b*B <= S. Earlier blocks'
    tails are never touched, so a block's tail depends only on its token prefix (prefix caching).
    """
    block_size, sink = key_cache.shape[2], rule.sink
    device, dtype = key_cache.device, tails.dtype
    layer_tails = tails[:, heads.offset : heads.offset + heads.count]
    for span in request_spans(batch):
        first = -(-span.p0 // block_size)  # ceil: first block whose start is in [p0, p1]
        last = span.p1 // block_size
        if first > last:
            continue
        row = batch.block_table[span.req]
        # Sums per started block b of [max(S, (b-1)*B), b*B), then a running sum from tail(first-1).
        sums = torch.zeros(last - first + 1, heads.count, 2, key_cache.shape[3], dtype=dtype, device=device)
        lo, hi = max(sink, (first - 1) * block_size), last * block_size
        if hi > lo:
            positions = torch.arange(lo, hi, device=device)
            segment = positions // block_size + 1 - first  # the first started block each position belongs to
            kv = torch.stack(
                [gather(key_cache, row, positions, heads, dtype), gather(value_cache, row, positions, heads, dtype)],
                dim=2,
            )  # [n, P, 2, D]
            sums.index_add_(0, segment, kv.transpose(0, 1))
        if (first - 1) * block_size > sink:  # tail(first-1) is not the empty sum
            sums[0] += layer_tails[row[first - 1].long()]
        layer_tails[row[first : last + 1].long()] = sums.cumsum(0)

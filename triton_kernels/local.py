"""Local heads: exact prompt queries, or attention over the sinks, the recent window and one
compensation key/value built from the block tails.

One program per (query tile of one request, KV head). A tile holds BLOCK_Q consecutive queries of
one request times the g query heads of the KV head (GQA: every key row loaded serves all of them),
as BLOCK_M = BLOCK_Q * g (padded) rows. A row at t is a *prompt row* under exact prefill when t is
before its request's prompt length (it sees every position [0, t]); every other row is
*compressed*: sinks, window [t - W + 1, t] (W per request when ``windows`` is given) and, when
n_d = t - W + 1 - S > 0, the compensation key of [S, t - W]. For a tile with positions [ta, tb]
and c_a = block of the oldest window position of its first compressed row ta', the sums of a
compressed row t are tail(c_a) + the rows [R0, t - W + 1) with R0 = max(S, c_a * B) (a tail holds
[S, c*B); see tails.py). The kernel walks, with an fp32 online softmax (base 2):

1. sinks [0, min(S, tb + 1)), each row seeing those <= t;
2. [lo, max(S, ta - W + 1)) with lo = S when the tile has prompt rows (they see these keys; the
   engine keeps every block while a request prefills) and R0 otherwise: keys outside every
   compressed row's window. Their column sums from R0 on go to every compressed row's sums (fewer
   than B keys of block c_a unless prompt rows need more);
3. the window [max(S, ta - W + 1), tb], each row seeing [t - W + 1, t] (prompt rows: all <= t). In a
   multi-query tile its first keys are also dropped for the later rows (3a): their scores and values
   go into those rows' compensation sums as well. Then each row's compensation key is complete
   (logit scale * q.k_sum / n_d + ln(n_d), value v_sum / n_d) and joins the softmax like one more
   key, so its per-row sums need no registers during the rest of the window (3b).

A tile without prompt rows reads only positions [0, S), block c_a's tail and positions >= R0, so
freed window blocks may hold any id and any data. Dots accumulate in fp32 and take fp32 inputs at
full precision (``input_precision="ieee"``; Triton's default would be TF32); bf16/fp16 inputs go to
the tensor cores as they are, the probabilities rounded to the cache dtype for the value product as
in FlashAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from razor_vllm.ops.api import LocalRule, PagedBatch, PoolHeads

from ._common import (
    FP8_DTYPES,
    Launch,
    add_tail,
    attention_io,
    find_request,
    head_pad,
    load_kv_tile,
    local_pool_args,
    per_request,
)

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(m_i, l_i, acc, s, visible, v):
    """Online softmax over one key tile: s are base-2 logits [BLOCK_M, TILE_N], v [TILE_N, HEAD_PAD]."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_reqs", "head_offset", "sink", "window"])
def _local_attention_kernel(
    out_ptr,
    q_ptr,
    cache,  # the paged K/V (_common.cache_arg)
    tails,  # the page tails (_common.local_pool_args)
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    prompt_lens_ptr,  # read only when EXACT
    windows_ptr,  # read only when PER_REQUEST_WINDOW
    scale_log2,  # softmax scale * log2(e)
    num_reqs,
    head_offset,
    sink,
    window,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    COMPENSATION: tl.constexpr,  # False: the ablation without the compensation key (tails are not read)
    EXACT: tl.constexpr,  # exact prefill: queries before the prompt length are plain causal attention
    PER_REQUEST_WINDOW: tl.constexpr,
    FP8: tl.constexpr,  # fp8 cache: tiles dequantized (fp32), then cast to the query's dtype for the dots
):
    kv = tl.program_id(1)
    req, q_tile = find_request(query_start_loc_ptr, num_reqs, tl.program_id(0), BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_begin
    first = q_tile * BLOCK_Q  # first query of the tile, counted inside the request
    if first >= q_len:
        return
    p0 = tl.load(seq_lens_ptr + req) - q_len  # position of the request's first query this step
    ta = p0 + first
    tb = p0 + tl.minimum(first + BLOCK_Q, q_len) - 1
    if PER_REQUEST_WINDOW:
        window = tl.load(windows_ptr + req)
    prompt_end = ta  # rows before it are prompt rows
    if EXACT:
        prompt_end = tl.maximum(ta, tl.minimum(tl.load(prompt_lens_ptr + req), tb + 1))

    rows = tl.arange(0, BLOCK_M)
    qi = first + rows // G
    row_ok = (rows < BLOCK_Q * G) & (qi < q_len)
    t = p0 + qi
    is_prompt = t < prompt_end
    head = kv * G + rows % G
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    tok = (q_begin + qi).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    pool_head = (head_offset + kv).to(tl.int64)
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    n = tl.arange(0, TILE_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)

    # 1. sinks
    sink_end = tl.minimum(sink, tb + 1)
    for n0 in range(0, sink_end, TILE_N):
        pos = n0 + n
        pos_ok = pos < sink_end
        k, v = load_kv_tile(cache, bt_row, pool_head, pos, pos_ok, d, d_ok, BLOCK_SIZE, FP8)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
        visible = pos_ok[None, :] & (pos[None, :] <= t[:, None])
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, visible, v.to(q.dtype))

    # The tile's compressed rows with a compensation key start at ta_c; their sums are
    # tail(c_a) + rows [r0, t - W + 1).
    ta_c = tl.maximum(prompt_end, sink + window)
    has_comp = ta_c <= tb
    if not COMPENSATION:
        has_comp = ta_c < 0  # False (ta_c >= S + W >= 1): the ablation reads no tail
    c_a = tl.maximum(ta_c - window + 1, 0) // BLOCK_SIZE
    window_start = tl.maximum(sink, ta - window + 1)
    r0 = window_start  # nothing to sum without compensated rows
    if has_comp:
        r0 = tl.maximum(sink, c_a * BLOCK_SIZE)
    key_sum = tl.zeros([HEAD_PAD], tl.float32)
    value_sum = tl.zeros([HEAD_PAD], tl.float32)
    if has_comp & (c_a * BLOCK_SIZE > sink):  # tail(c_a) is not the empty sum
        key_sum, value_sum = add_tail(key_sum, value_sum, tails, bt_row, c_a, pool_head, d, d_ok)

    # 2. keys before every compressed row's window: prompt rows attend to them, compensated rows sum them
    lo = tl.minimum(r0, window_start)
    if prompt_end > ta:
        lo = sink
    for n0 in range(lo, window_start, TILE_N):
        pos = n0 + n
        pos_ok = pos < window_start
        k, v = load_kv_tile(cache, bt_row, pool_head, pos, pos_ok, d, d_ok, BLOCK_SIZE, FP8)
        if prompt_end > ta:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
            visible = pos_ok[None, :] & (pos[None, :] <= t[:, None]) & is_prompt[:, None]
            m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, visible, v.to(q.dtype))
        summed = (pos_ok & (pos >= r0))[:, None]
        key_sum += tl.sum(tl.where(summed, k.to(tl.float32), 0.0), 0)
        value_sum += tl.sum(tl.where(summed, v.to(tl.float32), 0.0), 0)

    split = window_start  # window keys before `split` are also dropped by some rows of the tile
    n_dropped = t - window + 1 - sink
    compensated = row_ok & ~is_prompt & (n_dropped > 0)
    if has_comp:
        row_key_dot = tl.sum(q.to(tl.float32) * key_sum[None, :], 1)
        row_value_sum = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32) + value_sum[None, :]

        # 3a. window keys that later rows of the tile have dropped: attended and summed per row
        if BLOCK_Q > 1:
            dropped_end = tb - window + 1  # no row drops a key at or after this position
            split = tl.minimum(
                window_start + tl.cdiv(tl.maximum(dropped_end - window_start, 0), TILE_N) * TILE_N, tb + 1
            )
            for n0 in range(window_start, split, TILE_N):
                pos = n0 + n
                pos_ok = pos < split
                k, v = load_kv_tile(cache, bt_row, pool_head, pos, pos_ok, d, d_ok, BLOCK_SIZE, FP8)
                qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
                seen = (pos[None, :] > t[:, None] - window) | is_prompt[:, None]
                visible = pos_ok[None, :] & seen & (pos[None, :] <= t[:, None])
                m_i, l_i, acc = _softmax_step(m_i, l_i, acc, qk * scale_log2, visible, v.to(q.dtype))
                dropped = (pos_ok & (pos >= r0))[None, :] & (pos[None, :] <= t[:, None] - window)
                dropped = dropped & compensated[:, None]
                row_key_dot += tl.sum(tl.where(dropped, qk, 0.0), 1)
                row_value_sum += tl.dot(dropped.to(v.dtype), v, input_precision="ieee")

        # The compensation key, complete now: into the softmax like one more key.
        count = tl.maximum(n_dropped, 1).to(tl.float32)
        comp_logit = tl.where(compensated, row_key_dot * scale_log2 / count + tl.log2(count), float("-inf"))
        m_new = tl.maximum(m_i, comp_logit)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(comp_logit - m_use)
        l_i = l_i * alpha + beta
        acc = acc * alpha[:, None] + (beta / count)[:, None] * row_value_sum
        m_i = m_new

    # 3b. the rest of the window
    for n0 in range(split, tb + 1, TILE_N):
        pos = n0 + n
        pos_ok = pos <= tb
        k, v = load_kv_tile(cache, bt_row, pool_head, pos, pos_ok, d, d_ok, BLOCK_SIZE, FP8)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
        seen = (pos[None, :] > t[:, None] - window) | is_prompt[:, None]
        visible = pos_ok[None, :] & seen & (pos[None, :] <= t[:, None])
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, visible, v.to(q.dtype))

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def tile_shape(num_tokens: int, num_reqs: int, g: int, head_pad: int, dtype: torch.dtype) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_Q, TILE_N, num_warps) from shapes only (no host sync, CUDA-graph safe).

    Decode-like batches (about one query per request) get 16-row tiles, as vLLM's unified kernel;
    prefill-like ones 64 rows, so each key tile loaded serves more queries. Chosen from ptxas's register
    report for sm_90: no spills for bf16/fp16 at head sizes 64, 128 and 256 (256-wide heads keep the
    small tiles); fp32, whose exact dots run on FMA units, takes the large tile only up to 64.
    """
    prefill_like = num_tokens >= 4 * max(num_reqs, 1) and head_pad <= (64 if dtype == torch.float32 else 128)
    if prefill_like:
        block_m, tile_n, num_warps = 64, 32, 8
    else:
        block_m, tile_n, num_warps = 16, 32 if head_pad == 128 else 16, 4 if head_pad <= 64 else 8
    block_m = max(block_m, triton.next_power_of_2(g))
    return block_m, block_m // g, tile_n, num_warps


def plan(
    query,
    key_cache,
    value_cache,
    tails,
    batch: PagedBatch,
    heads: PoolHeads,
    rule: LocalRule,
    scale: float,
    *,
    k_scale=None,
    v_scale=None,
    out=None,
) -> Launch:
    """The launch of ``local_attention``: local-head attention under ``rule`` (exact prompt queries, or
    sinks + window + compensation); the launch returns ``out``, [T, Hq, D] in query's dtype.
    ``rule.compensation=False`` (an ablation) leaves out the compensation key: ``tails`` is not read.
    Rows that belong to no request are zero, or left as they are when ``out`` is given. An fp8 cache
    (float8 views) needs vLLM's ``k_scale``/``v_scale`` (1-element fp32 device tensors)."""
    rule.check(batch)
    args = local_pool_args(key_cache, value_cache, tails, batch, heads, rule.sink, k_scale, v_scale)
    query, out, g = attention_io(query, key_cache, heads, out)
    num_reqs = batch.num_reqs
    prompt_lens = per_request(batch.prompt_lens, "prompt_lens", num_reqs, key_cache.device)
    windows = per_request(batch.windows, "windows", num_reqs, key_cache.device)
    block_m, block_q, tile_n, num_warps = tile_shape(query.shape[0], num_reqs, g, head_pad(query.shape[2]), query.dtype)
    metadata = args["seq_lens_ptr"]  # stands in for an absent optional tensor (never read)
    return Launch(
        kernel=_local_attention_kernel,
        grid=(query.shape[0] // block_q + num_reqs if num_reqs else 0, heads.count),
        args=dict(
            args,
            out_ptr=out,
            q_ptr=query,
            scale_log2=float(scale) * LOG2E,
            num_reqs=num_reqs,
            window=rule.window,
            prompt_lens_ptr=metadata if prompt_lens is None else prompt_lens,
            windows_ptr=metadata if windows is None else windows,
            stride_q_tok=query.stride(0),
            stride_q_head=query.stride(1),
            stride_o_tok=out.stride(0),
            stride_o_head=out.stride(1),
        ),
        constexprs=dict(
            BLOCK_SIZE=key_cache.shape[2],
            G=g,
            HEAD_SIZE=query.shape[2],
            HEAD_PAD=head_pad(query.shape[2]),
            BLOCK_Q=block_q,
            BLOCK_M=block_m,
            TILE_N=tile_n,
            COMPENSATION=bool(rule.compensation),
            EXACT=bool(rule.exact_prefill),
            PER_REQUEST_WINDOW=windows is not None,
            FP8=key_cache.dtype in FP8_DTYPES,
        ),
        options=dict(num_warps=num_warps),
        out=out,
    )


def local_attention(*args, **kwargs) -> torch.Tensor:
    """``plan(...)`` launched (the same arguments): local-head attention, [T, Hq, D] in query's dtype."""
    return plan(*args, **kwargs)()

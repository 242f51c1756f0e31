"""Local heads: attention over the sinks, the recent window and one compensation key/value.

One program per (query tile of one request, KV head). A tile holds BLOCK_Q consecutive queries of
one request times the g query heads of the KV head (GQA: every key row loaded serves all of them),
as BLOCK_M = BLOCK_Q * g (padded) rows. For a tile with positions [ta, tb] it walks these key ranges
with an fp32 online softmax (base 2):

1. sinks [0, min(S, tb + 1)), each row seeing those <= t;
2. [R0, max(R0, ta - W + 1)) with R0 = max(S, p0 + 1 - W): keys every row of the tile has dropped
   but the stored sums do not yet hold (chunked prefill: the chunk's own first queries). Only
   their column sums are needed, added to the stored sums of [S, p0 + 1 - W);
3. the window [max(S, ta - W + 1), tb], each row seeing [t - W + 1, t]. In a multi-query tile its
   first keys are also dropped for the later rows (3a): their scores and values go into those
   rows' compensation sums as well. Then each row's compensation key is complete (logit
   scale * q.k_sum / n_d + ln(n_d), value v_sum / n_d, n_d = t - W + 1 - S) and joins the softmax
   like one more key, so its per-row sums need no registers during the rest of the window (3b).

Only positions [0, S) and >= p0 - W + 1 are read, so freed window blocks may hold any
id and any data. Dots accumulate in fp32 and take fp32 inputs at full precision (``input_precision=
"ieee"``; Triton's default would be TF32); bf16/fp16 inputs go to the tensor cores as they are, the
probabilities rounded to the cache dtype for the value product as in FlashAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, check_output, check_query, find_request, head_pad, load_kv_tile, local_pool_args

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
    k_ptr,
    v_ptr,
    comp_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,  # softmax scale * log2(e)
    num_reqs,
    head_offset,
    sink,
    window,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k_block,
    stride_k_head,
    stride_k_slot,
    stride_v_block,
    stride_v_head,
    stride_v_slot,
    stride_c_block,
    stride_c_head,
    stride_c_kv,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    COMPENSATION: tl.constexpr,  # False: the ablation without the compensation key (comp is not read)
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

    rows = tl.arange(0, BLOCK_M)
    qi = first + rows // G
    row_ok = (rows < BLOCK_Q * G) & (qi < q_len)
    t = p0 + qi
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
    k_head = k_ptr + pool_head * stride_k_head
    v_head = v_ptr + pool_head * stride_v_head
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
        k, v = load_kv_tile(
            k_head, v_head, bt_row, pos, pos_ok, d, d_ok, stride_k_block, stride_k_slot, stride_v_block,
            stride_v_slot, BLOCK_SIZE,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        visible = pos_ok[None, :] & (pos[None, :] <= t[:, None])
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, visible, v)

    window_start = tl.maximum(sink, ta - window + 1)
    split = window_start  # window keys before `split` are also dropped by some rows of the tile
    if COMPENSATION:
        # 2. dropped by every row of the tile, not in the stored sums: column sums only
        key_sum = tl.zeros([HEAD_PAD], tl.float32)
        value_sum = tl.zeros([HEAD_PAD], tl.float32)
        for n0 in range(tl.maximum(sink, p0 + 1 - window), window_start, TILE_N):
            pos = n0 + n
            pos_ok = pos < window_start
            k, v = load_kv_tile(
                k_head, v_head, bt_row, pos, pos_ok, d, d_ok, stride_k_block, stride_k_slot, stride_v_block,
                stride_v_slot, BLOCK_SIZE,
            )  # fmt: skip
            key_sum += tl.sum(k.to(tl.float32), 0)
            value_sum += tl.sum(v.to(tl.float32), 0)
        if p0 + 1 - window > sink:  # the stored sums of [S, p0 + 1 - W)
            slot = comp_ptr + tl.load(bt_row).to(tl.int64) * stride_c_block + pool_head * stride_c_head
            key_sum += tl.load(slot + d, mask=d_ok, other=0.0)
            value_sum += tl.load(slot + stride_c_kv + d, mask=d_ok, other=0.0)
        row_key_dot = tl.sum(q.to(tl.float32) * key_sum[None, :], 1)
        row_value_sum = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32) + value_sum[None, :]

        # 3a. window keys that later rows of the tile have dropped: attended and summed per row
        if BLOCK_Q > 1:
            dropped_end = tb - window + 1  # no row drops a key at or after this position
            split = tl.minimum(window_start + tl.cdiv(tl.maximum(dropped_end - window_start, 0), TILE_N) * TILE_N,
                               tb + 1)  # fmt: skip
            for n0 in range(window_start, split, TILE_N):
                pos = n0 + n
                pos_ok = pos < split
                k, v = load_kv_tile(
                    k_head, v_head, bt_row, pos, pos_ok, d, d_ok, stride_k_block, stride_k_slot, stride_v_block,
                    stride_v_slot, BLOCK_SIZE,
                )  # fmt: skip
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                visible = pos_ok[None, :] & (pos[None, :] > t[:, None] - window) & (pos[None, :] <= t[:, None])
                m_i, l_i, acc = _softmax_step(m_i, l_i, acc, qk * scale_log2, visible, v)
                dropped = pos_ok[None, :] & (pos[None, :] <= t[:, None] - window)
                row_key_dot += tl.sum(tl.where(dropped, qk, 0.0), 1)
                row_value_sum += tl.dot(dropped.to(v.dtype), v, input_precision="ieee")

        # The compensation key, complete now: into the softmax like one more key.
        n_dropped = t - window + 1 - sink
        count = tl.maximum(n_dropped, 1).to(tl.float32)
        comp_logit = tl.where(
            row_ok & (n_dropped > 0), row_key_dot * scale_log2 / count + tl.log2(count), float("-inf")
        )
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
        k, v = load_kv_tile(
            k_head, v_head, bt_row, pos, pos_ok, d, d_ok, stride_k_block, stride_k_slot, stride_v_block,
            stride_v_slot, BLOCK_SIZE,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        visible = pos_ok[None, :] & (pos[None, :] > t[:, None] - window) & (pos[None, :] <= t[:, None])
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, visible, v)

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
    out: torch.Tensor,
    compensation: bool = True,
) -> Launch:
    args = local_pool_args(
        key_cache, value_cache, comp, block_table, seq_lens, query_start_loc, head_offset, num_kv_heads, sink, window
    )
    g = check_query(query, key_cache, num_kv_heads)
    check_output(out, query)
    if query.stride(2) != 1:
        query = query.contiguous()
    num_reqs = seq_lens.shape[0]
    block_m, block_q, tile_n, num_warps = tile_shape(
        query.shape[0], num_reqs, g, head_pad(query.shape[2]), query.dtype
    )
    return Launch(
        kernel=_local_attention_kernel,
        grid=(query.shape[0] // block_q + num_reqs if num_reqs else 0, num_kv_heads),
        args=dict(
            args, out_ptr=out, q_ptr=query, scale_log2=float(scale) * LOG2E, num_reqs=num_reqs,
            stride_q_tok=query.stride(0), stride_q_head=query.stride(1),
            stride_o_tok=out.stride(0), stride_o_head=out.stride(1),
        ),  # fmt: skip
        constexprs=dict(
            BLOCK_SIZE=key_cache.shape[2], G=g, HEAD_SIZE=query.shape[2], HEAD_PAD=head_pad(query.shape[2]),
            BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n,
            COMPENSATION=bool(compensation),
        ),  # fmt: skip
        options=dict(num_warps=num_warps),
    )


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local-head attention (sinks + window + compensation); returns [T, Hq, D] in query's dtype.

    ``compensation=False`` (an ablation) leaves out the compensation key: ``comp`` is not read.
    Rows that belong to no request are zero, or left as they are when ``out`` is given.
    """
    if out is None:
        out = torch.zeros_like(query, memory_format=torch.contiguous_format)
    plan(
        query, key_cache, value_cache, comp, block_table, seq_lens, query_start_loc, head_offset, num_kv_heads,
        sink, window, scale, out, compensation,
    )()  # fmt: skip
    return out

"""Fold the positions that leave the window into each request's fp32 compensation sums.

After attention of a step covering [p0, p1], the sums of request r (slot comp[block_table[r, 0],
head]) gain [max(S, p0 + 1 - W), max(S, p1 + 2 - W)) so that they hold [S, p1 + 2 - W) for the next
step. A slot whose range was still empty (p0 + 1 - W <= S) is overwritten, as it is uninitialised on
a new request. One program per (request, KV head); requests without queries (batch padding) skip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, head_pad, load_kv_tile, local_pool_args

TILE_N = 32


@triton.jit(do_not_specialize=["head_offset", "sink", "window"])
def _fold_kernel(
    k_ptr,
    v_ptr,
    comp_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    head_offset,
    sink,
    window,
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
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
):
    req = tl.program_id(0)
    kv = tl.program_id(1)
    q_len = tl.load(query_start_loc_ptr + req + 1) - tl.load(query_start_loc_ptr + req)
    if q_len <= 0:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    p0 = seq_len - q_len
    lo = tl.maximum(sink, p0 + 1 - window)
    hi = tl.maximum(sink, seq_len + 1 - window)  # p1 + 2 - W

    pool_head = (head_offset + kv).to(tl.int64)
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    n = tl.arange(0, TILE_N)
    key_sum = tl.zeros([HEAD_PAD], tl.float32)
    value_sum = tl.zeros([HEAD_PAD], tl.float32)
    for n0 in range(lo, hi, TILE_N):
        pos = n0 + n
        pos_ok = pos < hi
        k, v = load_kv_tile(
            k_ptr + pool_head * stride_k_head, v_ptr + pool_head * stride_v_head, bt_row, pos, pos_ok, d, d_ok,
            stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, BLOCK_SIZE,
        )  # fmt: skip
        key_sum += tl.sum(k.to(tl.float32), 0)
        value_sum += tl.sum(v.to(tl.float32), 0)

    slot = comp_ptr + tl.load(bt_row).to(tl.int64) * stride_c_block + pool_head * stride_c_head
    if p0 + 1 - window > sink:  # the slot already holds [S, p0 + 1 - W)
        key_sum += tl.load(slot + d, mask=d_ok, other=0.0)
        value_sum += tl.load(slot + stride_c_kv + d, mask=d_ok, other=0.0)
    tl.store(slot + d, key_sum, mask=d_ok)
    tl.store(slot + stride_c_kv + d, value_sum, mask=d_ok)


def plan(
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
) -> Launch:
    args = local_pool_args(
        key_cache, value_cache, comp, block_table, seq_lens, query_start_loc, head_offset, num_kv_heads, sink, window
    )
    return Launch(
        kernel=_fold_kernel,
        grid=(seq_lens.shape[0], num_kv_heads),
        args=args,
        constexprs=dict(
            BLOCK_SIZE=key_cache.shape[2], HEAD_SIZE=key_cache.shape[3], HEAD_PAD=head_pad(key_cache.shape[3]),
            TILE_N=TILE_N,
        ),  # fmt: skip
        options=dict(num_warps=2),
    )


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
    """After attention: add [max(S, p0+1-W), max(S, p1+2-W)) to ``comp`` in place (zeroing empty slots)."""
    plan(
        key_cache, value_cache, comp, block_table, seq_lens, query_start_loc, head_offset, num_kv_heads, sink, window
    )()

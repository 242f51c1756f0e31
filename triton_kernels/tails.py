"""Write the block tails of the local pool: for every block b a request starts this step, the fp32
sums of K and V over [S, b*B), into the page tail of that block.

The tail is written once, when the block's first position b*B is among the step's queries, as
tail(b) = tail(b-1) + sums over [max(S, (b-1)*B), b*B) (zeros when b*B <= S), and never changed
afterwards: it depends only on the token prefix, so a block is as cacheable as its tokens. Attention
then reads tail(c) of the block c holding a query's oldest window position.

One program per (request, KV head) walks the request's started blocks in order with a running sum
(a long prefill chunk is serial inside one program, O(chunk) rows). Requests without queries (batch
padding) return at once. The grid is (num_reqs, num_kv_heads): shapes only, CUDA-graph safe.
"""

from __future__ import annotations

import triton
import triton.language as tl

from razor_vllm.ops.api import LocalRule, PagedBatch, PoolHeads

from ._common import FP8_DTYPES, Launch, add_tail, head_pad, load_kv_tile, local_pool_args, store_tail

TILE_N = 32


@triton.jit(do_not_specialize=["head_offset", "sink"])
def _write_block_tails_kernel(
    cache,  # the paged K/V (_common.cache_arg)
    tails,  # the page tails (_common.local_pool_args)
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    head_offset,
    sink,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    FP8: tl.constexpr,  # fp8 cache: the sums are of the dequantized values (stored * scale)
):
    req = tl.program_id(0)
    kv = tl.program_id(1)
    q_len = tl.load(query_start_loc_ptr + req + 1) - tl.load(query_start_loc_ptr + req)
    if q_len <= 0:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    p0 = seq_len - q_len
    first = (p0 + BLOCK_SIZE - 1) // BLOCK_SIZE  # blocks [first, last] start inside [p0, p1]
    last = (seq_len - 1) // BLOCK_SIZE

    pool_head = (head_offset + kv).to(tl.int64)
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    n = tl.arange(0, TILE_N)

    key_sum = tl.zeros([HEAD_PAD], tl.float32)
    value_sum = tl.zeros([HEAD_PAD], tl.float32)
    if (first <= last) & ((first - 1) * BLOCK_SIZE > sink):  # tail(first - 1) is not the empty sum
        key_sum, value_sum = add_tail(key_sum, value_sum, tails, bt_row, first - 1, pool_head, d, d_ok)
    for b in range(first, last + 1):
        hi = b * BLOCK_SIZE
        for n0 in range(tl.maximum(sink, hi - BLOCK_SIZE), hi, TILE_N):  # empty when b*B <= S
            pos = n0 + n
            pos_ok = pos < hi
            k, v = load_kv_tile(cache, bt_row, pool_head, pos, pos_ok, d, d_ok, BLOCK_SIZE, FP8)
            key_sum += tl.sum(k.to(tl.float32), 0)
            value_sum += tl.sum(v.to(tl.float32), 0)
        store_tail(tails, bt_row, b, pool_head, d, d_ok, key_sum, value_sum)


def plan(
    key_cache, value_cache, tails, batch: PagedBatch, heads: PoolHeads, rule: LocalRule, *, k_scale=None, v_scale=None
) -> Launch:
    """The launch of ``write_block_tails``: before attention, the tail of every local block started this
    step (``razor_vllm.ops``); only ``rule.sink`` matters. An fp8 cache needs vLLM's ``k_scale``/``v_scale``."""
    return Launch(
        kernel=_write_block_tails_kernel,
        grid=(batch.num_reqs, heads.count),
        args=local_pool_args(key_cache, value_cache, tails, batch, heads, rule.sink, k_scale, v_scale),
        constexprs=dict(
            BLOCK_SIZE=key_cache.shape[2],
            HEAD_SIZE=key_cache.shape[3],
            HEAD_PAD=head_pad(key_cache.shape[3]),
            TILE_N=TILE_N,
            FP8=key_cache.dtype in FP8_DTYPES,
        ),
        options=dict(num_warps=2),
    )


def write_block_tails(*args, **kwargs) -> None:
    """``plan(...)`` launched (the same arguments)."""
    plan(*args, **kwargs)()

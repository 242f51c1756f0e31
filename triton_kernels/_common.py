"""What every kernel wrapper shares: input checks, the launch plan, and small device helpers.

The wrappers take the kernel contract's objects (``razor_vllm.ops.api``: ``LocalRule``, ``PoolHeads``,
``PagedBatch``) as they are; the launch arguments are made from them here and in each ``plan``.

Checks look only at shapes, dtypes, strides and devices (never at tensor contents), so they cost
no host synchronisation and are safe inside CUDA-graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from razor_vllm.ops.api import PagedBatch, PoolHeads

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # vLLM's fp8/fp8_e4m3 and fp8_e5m2 KV caches
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, *FP8_DTYPES)


@dataclass
class Launch:
    """One kernel launch, computed without touching the device (``plan`` in each module): calling it
    launches and returns ``out`` (the output tensor of an attention kernel, None for a kernel that only
    writes caches). Each public op is its plan, launched; tests compile exactly the same argument
    types ahead of time for a GPU this machine need not have, and benchmarks time the launch alone."""

    kernel: Any  # a triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments, by name (the launch passes them as keywords)
    constexprs: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)  # num_warps, num_stages
    out: Optional[torch.Tensor] = None

    def __call__(self) -> Optional[torch.Tensor]:
        if all(self.grid):
            self.kernel[self.grid](**self.args, **self.constexprs, **self.options)
        return self.out


def head_pad(head_size: int) -> int:
    """Power-of-two width for a head (tl.arange and tl.dot need it; 16 is the smallest dot size)."""
    return max(16, triton.next_power_of_2(head_size))


def check_pool(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    heads: PoolHeads,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
) -> None:
    """A pool's K/V views, the layer's heads in it and, for a float8 cache, vLLM's scales."""
    if key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError(f"caches must be [num_blocks, H_pool, block_size, D], got {tuple(key_cache.shape)}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in CACHE_DTYPES:
        raise ValueError(
            "caches must both be float32, bfloat16, float16 or float8 (e4m3fn/e5m2), "
            f"got {key_cache.dtype}/{value_cache.dtype}"
        )
    if key_cache.device != value_cache.device:
        raise ValueError(f"key_cache is on {key_cache.device}, value_cache on {value_cache.device}")
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("cache rows (the last dimension) must be contiguous")
    if heads.count <= 0 or heads.offset < 0 or heads.offset + heads.count > key_cache.shape[1]:
        raise ValueError(
            f"heads [{heads.offset}, {heads.offset + heads.count}) are outside the pool's {key_cache.shape[1]} heads"
        )
    check_scales(key_cache, k_scale, v_scale)


def check_scales(key_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]) -> None:
    """An fp8 cache needs vLLM's per-tensor scales (stored = value / scale): 1-element fp32 tensors
    on the cache's device, read by the kernel (no host sync); other caches take none."""
    if key_cache.dtype not in FP8_DTYPES:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale are for float8 caches; this cache is {key_cache.dtype}")
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"a {key_cache.dtype} cache needs {name} (the layer's _{name}, fp32, 1 element)")
        if scale.dtype != torch.float32 or scale.numel() < 1 or scale.device != key_cache.device:
            raise ValueError(
                f"{name} must be a float32 tensor on {key_cache.device}, got {scale.dtype} "
                f"{tuple(scale.shape)} on {scale.device}"
            )


def attention_io(
    query: torch.Tensor, key_cache: torch.Tensor, heads: PoolHeads, out: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(query with contiguous rows, the output buffer, g = query heads per KV head) of an attention
    kernel. A new ``out`` is zeros (rows of no request stay zero); a given one is checked and its rows
    of no request are left as they are."""
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_q_heads, head_size], got {tuple(query.shape)}")
    if query.device != key_cache.device:
        raise ValueError(f"query is on {query.device}, the cache on {key_cache.device}")
    if query.shape[2] != key_cache.shape[3]:
        raise ValueError(f"query head_size {query.shape[2]} != cache head_size {key_cache.shape[3]}")
    if query.dtype != key_cache.dtype and key_cache.dtype not in FP8_DTYPES:
        raise ValueError(f"query is {query.dtype}, the cache {key_cache.dtype}: the Triton kernels need them equal")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"query must be float32, bfloat16 or float16, got {query.dtype}")
    if query.shape[1] % heads.count:
        raise ValueError(f"num_q_heads={query.shape[1]} is not a multiple of num_kv_heads={heads.count}")
    if out is None:
        out = torch.zeros_like(query, memory_format=torch.contiguous_format)
    elif out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(
            f"out must match query ({tuple(query.shape)} {query.dtype} on {query.device}), "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    elif out.stride(2) != 1:
        raise ValueError("out rows (the last dimension) must be contiguous")
    if query.stride(2) != 1:
        query = query.contiguous()
    return query, out, query.shape[1] // heads.count


def check_tails(tails: torch.Tensor, key_cache: torch.Tensor) -> None:
    expected = (key_cache.shape[0], key_cache.shape[1], 2, key_cache.shape[3])
    if tails.dtype != torch.float32 or tuple(tails.shape) != expected or tails.stride(3) != 1:
        raise ValueError(
            f"tails must be float32 {list(expected)} with contiguous rows, got {tails.dtype} {list(tails.shape)}"
        )
    if tails.device != key_cache.device:
        raise ValueError(f"tails is on {tails.device}, the cache on {key_cache.device}")


def per_request(t, name: str, num_reqs: int, device: torch.device):
    """An optional per-request int tensor (prompt_lens, windows) as int32 on ``device``; None stays None."""
    if t is None:
        return None
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the cache on {device}")
    if t.dim() != 1 or t.shape[0] < num_reqs or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 [num_reqs={num_reqs}] tensor, got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int32)


def metadata(batch: PagedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's block table, seq_lens and query_start_loc as int32 on ``device`` (no copy when they
    already are, as vLLM's are)."""
    block_table, seq_lens, query_start_loc = batch.block_table, batch.seq_lens, batch.query_start_loc
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [num_reqs, max_blocks], got {tuple(block_table.shape)}")
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_reqs + 1,):
        raise ValueError(
            f"query_start_loc must have num_reqs + 1 = {num_reqs + 1} entries, got {tuple(query_start_loc.shape)}"
        )
    if block_table.shape[0] < num_reqs:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for {num_reqs} requests")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the cache on {device}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    return block_table.to(torch.int32), seq_lens.to(torch.int32), query_start_loc.to(torch.int32)


def local_pool_args(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    tails: torch.Tensor,
    batch: PagedBatch,
    heads: PoolHeads,
    sink: int,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
) -> dict[str, Any]:
    """Checks and launch arguments that both local-pool kernels (attention and block tails) take:
    the cache as ``cache_arg`` packs it (an fp8 cache needs vLLM's scales) and the page tails as
    one argument too, (pointer, stride of a block, of a head, of K/V), read by ``add_tail`` and
    written by ``store_tail``. (The rule's values were checked when the ``LocalRule`` was made.)"""
    check_pool(key_cache, value_cache, heads, k_scale, v_scale)
    check_tails(tails, key_cache)
    block_table, seq_lens, query_start_loc = metadata(batch, key_cache.device)
    return dict(
        cache=cache_arg(key_cache, value_cache, k_scale, v_scale),
        tails=(tails, tails.stride(0), tails.stride(1), tails.stride(2)),
        block_table_ptr=block_table,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        head_offset=heads.offset,
        sink=sink,
        stride_bt=block_table.stride(0),
    )


def cache_arg(
    key_cache: torch.Tensor, value_cache: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor]
) -> tuple:
    """A pool's paged K/V as one kernel argument, (K half, V half), each half (pointer, stride of a
    block, of a head, of a slot, fp8 scale pointer): Triton passes a tuple element by element, each
    specialised as a plain argument would be, so the kernels and their helpers (``cache_row``,
    ``load_kv_tile``) take the cache as one name. A cache that is not fp8 stands in for its scale
    (never read)."""
    fp8 = key_cache.dtype in FP8_DTYPES
    return tuple(
        (half, half.stride(0), half.stride(1), half.stride(2), scale if fp8 else half)
        for half, scale in ((key_cache, k_scale), (value_cache, v_scale))
    )


@triton.jit
def find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_Q: tl.constexpr):
    """(request, query tile inside it) of program ``pid``.

    Request r owns programs [qsl[r] // BLOCK_Q + r, qsl[r+1] // BLOCK_Q + r + 1): at least
    cdiv(q_len, BLOCK_Q) of them, so a grid of num_tokens // BLOCK_Q + num_reqs programs, known from
    shapes alone, covers every tile. Binary search for the last r whose first program is <= pid;
    surplus programs get a tile past their request's queries and return.
    """
    lo = num_reqs * 0
    hi = num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid
        lo = tl.where(fits, mid, lo)
        hi = tl.where(fits, hi, mid - 1)
    return lo, pid - (tl.load(query_start_loc_ptr + lo) // BLOCK_Q + lo)


@triton.jit
def cache_row(half, block, slot, head):
    """Address of row (block, head, slot) of one cache half (``cache_arg``'s K or V); the indices may
    be tensors of any shapes that broadcast (int64, so that large pools do not overflow). The head
    term comes first: in the tile loads it is the program's constant part, kept out of the loops."""
    ptr, stride_block, stride_head, stride_slot, _scale_ptr = half
    return ptr + head * stride_head + (block * stride_block + slot * stride_slot)


@triton.jit
def _load_rows(half, block, slot, head, d, mask, FP8: tl.constexpr):
    x = tl.load(cache_row(half, block, slot, head)[:, None] + d[None, :], mask=mask, other=0.0)
    if FP8:
        x = x.to(tl.float32) * tl.load(half[4])  # stored * scale: vLLM's per-tensor scale
    return x


@triton.jit
def load_kv_tile(cache, bt_row, head, pos, pos_ok, d, d_ok, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr):
    """Keys and values [TILE_N, HEAD_PAD] of positions ``pos`` of one request (``bt_row``: its
    block-table row) and pool head; masked-off positions are neither looked up in the block table nor
    read (they may be freed blocks). An fp8 cache (``FP8``) comes back dequantized in fp32."""
    block = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    slot = (pos % BLOCK_SIZE).to(tl.int64)
    mask = pos_ok[:, None] & d_ok[None, :]
    k_half, v_half = cache
    return _load_rows(k_half, block, slot, head, d, mask, FP8), _load_rows(v_half, block, slot, head, d, mask, FP8)


@triton.jit
def _tail_row(tails, bt_row, b, head):
    ptr, stride_block, stride_head, stride_kv = tails
    return ptr + tl.load(bt_row + b).to(tl.int64) * stride_block + head * stride_head, stride_kv


@triton.jit
def add_tail(key_sum, value_sum, tails, bt_row, b, head, d, d_ok):
    """The sums plus tail(b) (``tails``: (pointer, stride of a block, of a head, of K/V), the page
    tails of ``local_pool_args``) of block b of one request and pool head."""
    row, stride_kv = _tail_row(tails, bt_row, b, head)
    key_sum += tl.load(row + d, mask=d_ok, other=0.0)
    value_sum += tl.load(row + stride_kv + d, mask=d_ok, other=0.0)
    return key_sum, value_sum


@triton.jit
def store_tail(tails, bt_row, b, head, d, d_ok, key_sum, value_sum):
    """Write the sums as tail(b) of one request and pool head."""
    row, stride_kv = _tail_row(tails, bt_row, b, head)
    tl.store(row + d, key_sum, mask=d_ok)
    tl.store(row + stride_kv + d, value_sum, mask=d_ok)

"""Store this step's keys and values into a pool's paged cache, straight from vLLM's slot mapping.

Unlike ``razor_vllm.ops.cache.write_kv`` (the torch reference, which selects the valid rows on the
host), the kernel reads ``slot_mapping`` on the device and skips negative slots (vLLM's padding), so
the launch depends on shapes only and can be captured in a CUDA graph. One program per token, all of its heads at once.

fp8 caches (vLLM's ``--kv-cache-dtype fp8/fp8_e4m3/fp8_e5m2``): pass float8 views of the pool and the
layer's per-tensor ``k_scale``/``v_scale``; the kernel stores ``value / scale`` clamped to the format's
finite range and rounded to nearest, as vLLM's ``reshape_and_cache_flash`` does (saturating instead
of producing inf/NaN for outliers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from razor_vllm.ops.api import PoolHeads

from ._common import FP8_DTYPES, Launch, cache_arg, cache_row, check_pool, head_pad


@triton.jit(do_not_specialize=["head_offset"])
def _store_kv_kernel(
    cache,  # the paged K/V (_common.cache_arg)
    key_ptr,
    value_ptr,
    slot_mapping_ptr,
    head_offset,
    stride_key_tok,
    stride_key_head,
    stride_value_tok,
    stride_value_head,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_PAD)
    mask = (h < NUM_HEADS)[:, None] & (d < HEAD_SIZE)[None, :]
    pool_head = (head_offset + h).to(tl.int64)
    k = tl.load(key_ptr + tok * stride_key_tok + h[:, None] * stride_key_head + d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_value_tok + h[:, None] * stride_value_head + d[None, :], mask=mask)
    k_half, v_half = cache
    k_dst = cache_row(k_half, block, offset, pool_head[:, None]) + d[None, :]
    v_dst = cache_row(v_half, block, offset, pool_head[:, None]) + d[None, :]
    if FP8:
        k = tl.clamp(k.to(tl.float32) / tl.load(k_half[4]), -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_half[4]), -FP8_MAX, FP8_MAX)
    tl.store(k_dst, k.to(k_dst.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_dst.dtype.element_ty), mask=mask)


def plan(key_cache, value_cache, key, value, slot_mapping, heads: PoolHeads, *, k_scale=None, v_scale=None) -> Launch:
    """The launch of ``store_kv``: key/value [T, heads.count, D] to pool heads [heads.offset,
    heads.offset + heads.count) of slots ``slot_mapping`` (block * block_size + offset in this pool;
    negative = padding, skipped). fp8 caches need vLLM's scales."""
    if key.dim() != 3 or key.shape != value.shape or key.shape[1] != heads.count:
        raise ValueError(
            f"key and value must both be [num_tokens, heads.count={heads.count}, D], "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    check_pool(key_cache, value_cache, heads, k_scale, v_scale)
    fp8 = key_cache.dtype in FP8_DTYPES
    if key.shape[2] != key_cache.shape[3]:
        raise ValueError(f"key head_size {key.shape[2]} != cache head_size {key_cache.shape[3]}")
    if key.device != key_cache.device or value.device != key_cache.device or slot_mapping.device != key_cache.device:
        raise ValueError(f"key, value and slot_mapping must be on the cache's device {key_cache.device}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] < key.shape[0]:
        raise ValueError(f"slot_mapping needs one entry per token ({key.shape[0]}), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    num_heads, head_size = key.shape[1], key.shape[2]
    return Launch(
        kernel=_store_kv_kernel,
        grid=(key.shape[0],),
        args=dict(
            cache=cache_arg(key_cache, value_cache, k_scale, v_scale),
            key_ptr=key,
            value_ptr=value,
            slot_mapping_ptr=slot_mapping,
            head_offset=heads.offset,
            stride_key_tok=key.stride(0),
            stride_key_head=key.stride(1),
            stride_value_tok=value.stride(0),
            stride_value_head=value.stride(1),
        ),
        constexprs=dict(
            NUM_HEADS=num_heads,
            HEADS_PAD=triton.next_power_of_2(num_heads),
            BLOCK_SIZE=key_cache.shape[2],
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad(head_size),
            FP8=fp8,
            FP8_MAX=torch.finfo(key_cache.dtype).max if fp8 else 0.0,
        ),
        options=dict(num_warps=1 if num_heads * head_size <= 1024 else 4),
    )


def store_kv(*args, **kwargs) -> None:
    """``plan(...)`` launched (the same arguments)."""
    plan(*args, **kwargs)()

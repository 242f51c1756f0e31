"""Retrieval heads: plain causal paged attention, done by vLLM's own Triton ``unified_attention``.

No kernel of ours is needed: vLLM's kernel takes caches as [num_blocks, block_size, kv_heads, D]
through arbitrary strides, and a page of the retrieval pool, [num_blocks, H_pool, block_size, D],
is exactly that after ``permute(0, 2, 1, 3)``; a layer's heads [head_offset, head_offset + n) are a
slice of the head axis (a pointer offset). It looks up each key's block as
``block_table[pos // BLOCK_SIZE]`` with BLOCK_SIZE a compile-time constant, so the pool's block size
need not be a power of two (e.g. 187), handles GQA, varlen and chunked queries (cu_seqlens_q =
query_start_loc, seqused_k = seq_lens) and requests without queries (batch padding).

Two launches, chosen from shapes and the step's exact ``max_query_len`` (a host value every vLLM
builder has; the same for every replay of a captured decode graph):

- 2D (vLLM's prefill path): one program per (query tile, KV head), each walking the whole context.
  Used for prefill and for decode batches large enough to fill the GPU.
- split-key ("3D", vLLM's split-softmax decode path): each (request, KV head) is further split into
  ``SPLIT_SEGMENTS`` segments of the key axis, each writes a partial softmax (max, sum, output) to
  fp32 scratch, and a second kernel merges them. Used for pure-decode steps (max_query_len == 1)
  whose 2D grid would have at most about ``MIN_2D_PROGRAMS`` programs: RazorAttention leaves few
  retrieval heads per layer (often 1 or 2 KV heads), so a small decode batch at 32k-128k context would
  otherwise run a handful of programs, each reading the whole context, on a 132-SM GPU. vLLM's own
  TRITON_ATTN picks the same way (MIN_LAUNCH_GRID_SIZE_2D = 128). The scratch is allocated per call
  from shapes alone (the caching allocator, or a CUDA graph's pool during capture), so the launch
  stays graph-safe. Departure: rows of the output that belong to no request (vLLM's padding tokens)
  are written with unspecified values by the merge kernel in this path; vLLM never reads them.

fp8 KV cache (vLLM's per-tensor scales, ``--kv-cache-dtype fp8/fp8_e4m3/fp8_e5m2``): pass the caches
as float8 views and ``k_scale``/``v_scale`` (the layer's ``_k_scale``/``_v_scale``, 1-element fp32
device tensors); vLLM's kernel dequantizes each tile (FP8_PER_TENSOR mode) and computes as for the
query's dtype. fp32 inputs go through tl.dot's default precision (TF32 on NVIDIA), as in TRITON_ATTN.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Optional

import torch
import triton

from razor_vllm.ops.api import PagedBatch, PoolHeads

from ._common import FP8_DTYPES, attention_io, check_pool, metadata

SPLIT_SEGMENTS = 16  # vLLM's NUM_PAR_SOFTMAX_SEGMENTS
MIN_2D_PROGRAMS = 128  # vLLM's MIN_LAUNCH_GRID_SIZE_2D: below this many 2D programs, split the keys


@cache
def _unified_attention():
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise RuntimeError(
            "vLLM reports Triton as unavailable on this platform, so its unified_attention kernel (used for "
            "retrieval heads) cannot run; set RAZOR_VLLM_KERNELS=reference to use the PyTorch kernels"
        )
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    return unified_attention


@cache
def _fp8_per_tensor_mode():
    from vllm.v1.kv_cache_interface import KVQuantMode

    return KVQuantMode.FP8_PER_TENSOR


def pool_view(cache: torch.Tensor, heads: PoolHeads) -> torch.Tensor:
    """[num_blocks, H_pool, block_size, D] -> vLLM's [num_blocks, block_size, heads.count, D], no copy."""
    return cache.permute(0, 2, 1, 3)[:, :, heads.offset : heads.offset + heads.count]


def use_split_keys(num_tokens: int, num_reqs: int, num_kv_heads: int, max_query_len: int) -> bool:
    """The split-key path: pure-decode steps (``max_query_len == 1``, exact) whose 2D grid is small,
    by TRITON_ATTN's rule (num_seqs <= MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads; padding requests count)."""
    return max_query_len == 1 and num_tokens > 0 and num_reqs <= MIN_2D_PROGRAMS // num_kv_heads


def paged_attention(
    query,
    key_cache,
    value_cache,
    batch: PagedBatch,
    heads: PoolHeads,
    scale: float,
    *,
    k_scale=None,
    v_scale=None,
    out=None,
    split_keys: Optional[bool] = None,
) -> torch.Tensor:
    """Causal attention of retrieval heads over the paged cache; returns ``out``, [T, Hq, D] in query's
    dtype. ``batch.max_query_len`` (the step's longest query; 0 = unknown: no split) picks the path;
    ``split_keys`` forces one (tests). Rows that belong to no request are zero, or left as they are
    when ``out`` is given (2D path; see the module docstring for the split path). An fp8 cache needs
    vLLM's ``k_scale``/``v_scale``.
    """
    check_pool(key_cache, value_cache, heads, k_scale, v_scale)
    query, out, _ = attention_io(query, key_cache, heads, out)
    block_table, seq_lens, query_start_loc = metadata(batch, key_cache.device)
    fp8 = key_cache.dtype in FP8_DTYPES
    num_tokens, num_reqs = query.shape[0], seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    if split_keys is None:
        split_keys = use_split_keys(num_tokens, num_reqs, heads.count, batch.max_query_len)
    split: dict[str, Any] = {}
    if split_keys:
        segments = torch.empty(
            num_tokens,
            query.shape[1],
            SPLIT_SEGMENTS,
            triton.next_power_of_2(query.shape[2]),
            dtype=torch.float32,
            device=query.device,
        )
        split = dict(
            seq_threshold_3D=num_reqs,
            num_par_softmax_segments=SPLIT_SEGMENTS,
            softmax_segm_output=segments,
            softmax_segm_max=torch.empty(segments.shape[:3], dtype=torch.float32, device=query.device),
            softmax_segm_expsum=torch.empty(segments.shape[:3], dtype=torch.float32, device=query.device),
        )
    if fp8:
        split["kv_quant_mode"] = _fp8_per_tensor_mode()
    _unified_attention()(
        q=query,
        k=pool_view(key_cache, heads),
        v=pool_view(value_cache, heads),
        out=out,
        cu_seqlens_q=query_start_loc,
        # vLLM takes the 3D path only when max_seqlen_q <= 1; otherwise an upper bound (tile tuning only).
        max_seqlen_q=1 if split_keys else num_tokens,
        seqused_k=seq_lens,
        max_seqlen_k=block_table.shape[1] * key_cache.shape[2],  # upper bound; unused by the kernel
        softmax_scale=float(scale),
        causal=True,
        window_size=(-1, -1),
        block_table=block_table,
        softcap=0,
        q_descale=None,
        k_descale=k_scale if fp8 else None,
        v_descale=v_scale if fp8 else None,
        **split,
    )
    return out

"""Retrieval heads: plain causal paged attention, done by vLLM's own Triton ``unified_attention``.

No kernel of ours is needed: vLLM's kernel takes caches as [num_blocks, block_size, kv_heads, D]
through arbitrary strides, and a page of the retrieval pool, [num_blocks, H_pool, block_size, D],
is exactly that after ``permute(0, 2, 1, 3)``; a layer's heads [head_offset, head_offset + n) are a
slice of the head axis (a pointer offset). It looks up each key's block as
``block_table[pos // BLOCK_SIZE]`` with BLOCK_SIZE a compile-time constant, so the pool's block size
need not be a power of two (e.g. 187), handles GQA, varlen and chunked queries (cu_seqlens_q =
query_start_loc, seqused_k = seq_lens) and requests without queries (batch padding).

Launch: vLLM's 2D grid (num_tokens // BLOCK_Q + num_reqs, kv_heads) is fixed by shapes, so the call
is CUDA-graph safe. Its split-softmax 3D decode path needs the builder to own scratch buffers and
pass ``max_query_len``, which the ops signature does not carry; it is not used.
fp32 inputs go through tl.dot's default precision (TF32 on NVIDIA), as in vLLM's TRITON_ATTN.
"""

from __future__ import annotations

from functools import cache

import torch

from ._common import check_cache_pair, check_output, check_query, metadata


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


def pool_view(cache: torch.Tensor, head_offset: int, num_kv_heads: int) -> torch.Tensor:
    """[num_blocks, H_pool, block_size, D] -> vLLM's [num_blocks, block_size, num_kv_heads, D], no copy."""
    return cache.permute(0, 2, 1, 3)[:, :, head_offset : head_offset + num_kv_heads]


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of retrieval heads over the paged cache; returns [T, Hq, D] in query's dtype.

    Rows that belong to no request are zero, or left as they are when ``out`` is given.
    """
    check_cache_pair(key_cache, value_cache, head_offset, num_kv_heads)
    check_query(query, key_cache, num_kv_heads)
    block_table, seq_lens, query_start_loc = metadata(block_table, seq_lens, query_start_loc, key_cache.device)
    if out is None:
        out = torch.zeros_like(query, memory_format=torch.contiguous_format)
    check_output(out, query)
    if query.stride(2) != 1:
        query = query.contiguous()
    if query.shape[0] == 0 or seq_lens.shape[0] == 0:
        return out
    _unified_attention()(
        q=query,
        k=pool_view(key_cache, head_offset, num_kv_heads),
        v=pool_view(value_cache, head_offset, num_kv_heads),
        out=out,
        cu_seqlens_q=query_start_loc,
        max_seqlen_q=query.shape[0],  # an upper bound; only tile tuning reads it
        seqused_k=seq_lens,
        max_seqlen_k=block_table.shape[1] * key_cache.shape[2],  # upper bound; unused by the 2D path
        softmax_scale=float(scale),
        causal=True,
        window_size=(-1, -1),
        block_table=block_table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
    )
    return out

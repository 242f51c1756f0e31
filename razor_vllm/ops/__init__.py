"""Attention kernels for the two KV pools, and the choice between Triton (GPU), C++ (CPU) and the reference.

Layout (what the backend passes; every kernel honours the caches' strides):

- ``key_cache`` / ``value_cache``: [num_blocks, H_pool, block_size, D] views ``kv_cache[..., :D]`` and
  ``kv_cache[..., D:]`` of a pool cache. H_pool spans every layer's heads of that pool; a layer uses
  pool heads [head_offset, head_offset + num_kv_heads). Query head j reads KV head j // g (GQA).
- ``block_table`` [num_reqs, max_blocks] int32: position p of request r lives in physical block
  block_table[r, p // block_size], slot p % block_size. Local-pool blocks wholly behind the window
  (and past the sinks) may be freed: local kernels read only positions [0, S) and >= p0 - W + 1.
- ``seq_lens`` [num_reqs] int32 (tokens including this step's), ``query_start_loc`` [num_reqs + 1]
  int32: query i of request r is row query_start_loc[r] + i at position seq_lens[r] - q_len_r + i.
  This step's K/V are already in the cache.
- ``comp`` float32 [num_blocks, H_pool, 2, D] (any block stride): the compensation sums (0 = keys,
  1 = values) of request r in comp[block_table[r, 0], head_offset + h]. At the start of a step whose
  first query is p0 they cover positions [S, p0 + 1 - W); a slot whose range is empty is never read.

Local heads (RazorAttention): a query at t attends to the sinks [0, min(S, t+1)), the window
[max(S, t-W+1), t] and, when n_d = t-W+1-S > 0, one key/value = the mean of [S, t-W] with logit
scale * q.k_hat + ln(n_d). Retrieval heads: plain causal attention.

``RAZOR_VLLM_KERNELS=reference|cpp`` forces one implementation; by default CUDA tensors go to the
Triton kernels (``razor_vllm.triton_kernels``, imported on first use), the C++ ops
(``razor_vllm._C``, registered as ``torch.ops.razor_vllm.*``) run whenever they are built and the
tensors are CPU tensors in a layout they support, and the reference runs otherwise.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

from razor_vllm.ops import reference
from razor_vllm.ops.cache import SlotIndex, write_kv

KERNELS_ENV = "RAZOR_VLLM_KERNELS"
CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _load_cpp():
    try:
        from razor_vllm import _C  # noqa: F401  (loading it registers the ops)
    except ImportError:
        return None
    ops = torch.ops.razor_vllm
    return SimpleNamespace(
        local_attention=ops.local_attention,
        fold_compensation=ops.fold_compensation,
        paged_attention=ops.paged_attention,
    )


cpp = _load_cpp()  # None when the extension is not built


@functools.cache
def triton_kernels():
    """The GPU kernels, imported on first use so that CPU-only processes never import Triton."""
    try:
        from razor_vllm import triton_kernels as module
    except ImportError as exc:
        raise RuntimeError(f"CUDA tensors need razor_vllm.triton_kernels, which cannot be imported: {exc}") from exc
    return module


def kernels(name: str):
    """The implementation called ``name`` ("reference" or "cpp"), with all three kernels."""
    if name == "reference":
        return reference
    if name == "cpp":
        if cpp is None:
            raise RuntimeError(f"{KERNELS_ENV}=cpp but razor_vllm._C is not built (pip install -e . builds it)")
        return cpp
    raise ValueError(f"{KERNELS_ENV} must be 'reference' or 'cpp', got {name!r}")


def _choose(query_dtype: torch.dtype, *tensors: torch.Tensor):
    forced = os.environ.get(KERNELS_ENV)
    if forced:
        return kernels(forced)
    if any(t.is_cuda for t in tensors):
        return triton_kernels()
    key_cache = tensors[0]
    if (
        cpp is not None
        and query_dtype in CPP_DTYPES
        and key_cache.dtype in CPP_DTYPES
        and all(t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)
    ):
        return cpp
    return reference


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
    """Local-head attention (sinks + window + compensation); returns [T, Hq, D] in query's dtype.

    ``compensation=False`` (an ablation) leaves out the compensation key: ``comp`` is not read.
    """
    impl = _choose(query.dtype, key_cache, value_cache, comp)
    return impl.local_attention(
        query, key_cache, value_cache, comp, block_table, seq_lens, query_start_loc,
        head_offset, num_kv_heads, sink, window, scale, compensation=compensation,
    )  # fmt: skip


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
    impl = _choose(torch.float32, key_cache, value_cache, comp)
    impl.fold_compensation(
        key_cache, value_cache, comp, block_table, seq_lens, query_start_loc,
        head_offset, num_kv_heads, sink, window,
    )  # fmt: skip


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
    """Causal attention of retrieval heads over the paged cache; returns [T, Hq, D] in query's dtype."""
    impl = _choose(query.dtype, key_cache, value_cache)
    return impl.paged_attention(
        query, key_cache, value_cache, block_table, seq_lens, query_start_loc, head_offset, num_kv_heads, scale
    )


def store_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    head_offset: int,
) -> None:
    """Store key/value [T, n, D] at pool heads [head_offset, head_offset + n) of ``slot_mapping``
    (block * block_size + offset in this pool, negative = padding).

    On CUDA one Triton launch reads the mapping on the device (no host sync: CUDA-graph safe);
    elsewhere, or when a kernel set is forced, ``cache.write_kv``.
    """
    if key_cache.is_cuda and not os.environ.get(KERNELS_ENV):
        triton_kernels().store_kv(key_cache, value_cache, key, value, slot_mapping, head_offset)
    else:
        index = SlotIndex.from_slot_mapping(slot_mapping[: key.shape[0]], key_cache.shape[2])
        write_kv(key_cache, value_cache, key, value, index, head_offset)


__all__ = [
    "local_attention", "fold_compensation", "paged_attention", "store_kv", "kernels", "cpp", "triton_kernels",
    "KERNELS_ENV",
]  # fmt: skip

"""Attention kernels for the two KV pools, and the choice between Triton (GPU), C++ (CPU) and the reference.

The kernel contract (its types in ``razor_vllm.ops.api``):

- ``key_cache`` / ``value_cache``: [num_blocks, H_pool, block_size, D] views ``kv_cache[..., :D]`` and
  ``kv_cache[..., D:]`` of a pool cache, any strides. H_pool spans every layer's heads of that pool; a
  layer uses pool heads [heads.offset, heads.offset + heads.count). Query head j reads KV head j // g.
- ``PagedBatch``: block table (position p of request r lives in block block_table[r, p // B], slot
  p % B), seq_lens (including this step's tokens) and query_start_loc: query i of request r is row
  query_start_loc[r] + i at position seq_lens[r] - q_len_r + i. This step's K/V are already stored.
  Requests without queries (CUDA-graph padding) are skipped.
- ``tails``: fp32 [num_blocks, H_pool, 2, D] (any block stride), the page tail of every local block
  (``pools.compensation_view``). The tail of local block b holds the sums of K (0) and V (1) over
  [S, b*B), written once when the block is started (``write_block_tails``), never changed after:
  it depends only on the token prefix, so the block is as cacheable as its tokens.

Local heads (RazorAttention, ``LocalRule``): with exact prefill a query before its request's prompt
length attends causally to [0, t] (the paper). Every other query attends to the sinks
[0, min(S, t+1)), the window [max(S, t-W+1), t] and, when n_d = t-W+1-S > 0, one key/value = the
mean of [S, t-W] with logit scale * q.k_hat + ln(n_d). Those sums are tail(c) plus the cached rows
[max(S, c*B), t-W] of block c = (t-W+1) // B, which holds the oldest window position and so is always
in memory. Retrieval heads: plain causal attention.

Order per layer and step: ``store_kv`` -> ``write_block_tails`` -> attention. ``retrieval_step`` and
``local_step`` are that order for one layer's heads in one pool, reading the layer's own query and
writing its own output (one C++ call per layer and pool on the CPU).

``RAZOR_VLLM_KERNELS=reference|cpp`` forces one implementation; by default CUDA tensors go to the
Triton kernels (``razor_vllm.triton_kernels``, imported on first use), the C++ ops
(``razor_vllm._C``, registered as ``torch.ops.razor_vllm.*``) run whenever they are built and the
tensors are CPU tensors in a layout they support, and the reference runs otherwise. Every kernel
here has the contract's signature (typed in ``reference``, the readable definition), plus vLLM's fp8
scales, which only the Triton kernels read. The reference and the Triton kernels take the contract's
objects as they are; the C++ ops' schemas take tensors and numbers, so ``_CppKernels`` unpacks them.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Optional, Union

import torch

from razor_vllm.ops import reference
from razor_vllm.ops.api import LayerPoolHeads, LocalRule, PagedBatch, PoolHeads
from razor_vllm.ops.cache import write_kv

KERNELS_ENV = "RAZOR_VLLM_KERNELS"
CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_NAMES = ("local_attention", "write_block_tails", "paged_attention", "store_kv", "retrieval_step", "local_step")


def _load_cpp() -> Optional[SimpleNamespace]:
    try:
        from razor_vllm import _C  # noqa: F401  (loading it registers the ops)
    except ImportError:
        return None
    ops = torch.ops.razor_vllm
    if not all(hasattr(ops, name) for name in KERNEL_NAMES):  # an extension built before one of them
        return None
    return SimpleNamespace(**{name: getattr(ops, name) for name in KERNEL_NAMES})


cpp = _load_cpp()  # None when the extension is not built (or is stale)


@functools.cache
def triton_kernels():
    """The GPU kernels, imported on first use so that CPU-only processes never import Triton."""
    try:
        from razor_vllm import triton_kernels as module
    except ImportError as exc:
        raise RuntimeError(f"CUDA tensors need razor_vllm.triton_kernels, which cannot be imported: {exc}") from exc
    return module


def kernels(name: str):
    """The implementation called ``name`` ("reference" or "cpp"), with all three kernels taking the
    contract's signatures (``local_attention(query, key_cache, value_cache, tails, batch, heads, rule,
    scale)`` and so on)."""
    if name == "reference":
        return reference
    if name == "cpp":
        if cpp is None:
            raise RuntimeError(f"{KERNELS_ENV}=cpp but razor_vllm._C is not built (pip install -e . builds it)")
        return _CPP
    raise ValueError(f"{KERNELS_ENV} must be 'reference' or 'cpp', got {name!r}")


class _CppKernels:
    """The C++ ops (``torch.ops.razor_vllm.*``) behind the contract's signatures. Their schemas take
    tensors and numbers only, so this is the one place where the contract's objects become positional
    arguments (in the order of csrc/razor_attention.cpp's schemas)."""

    def __init__(self, ops) -> None:
        self.ops = ops

    def local_attention(self, query, key_cache, value_cache, tails, batch, heads, rule, scale):
        rule.check(batch)
        step = (batch.block_table, batch.seq_lens, batch.query_start_loc, batch.prompt_lens, batch.windows)
        local = (heads.offset, heads.count, rule.sink, rule.window, rule.compensation, rule.exact_prefill)
        return self.ops.local_attention(query, key_cache, value_cache, tails, *step, *local, scale)

    def write_block_tails(self, key_cache, value_cache, tails, batch, heads, rule):
        step = (batch.block_table, batch.seq_lens, batch.query_start_loc)
        self.ops.write_block_tails(key_cache, value_cache, tails, *step, heads.offset, heads.count, rule.sink)

    def paged_attention(self, query, key_cache, value_cache, batch, heads, scale):
        step = (batch.block_table, batch.seq_lens, batch.query_start_loc)
        return self.ops.paged_attention(query, key_cache, value_cache, *step, heads.offset, heads.count, scale)

    def retrieval_step(self, query, key, value, slot_mapping, out, key_cache, value_cache, batch, heads, scale):
        step = (batch.block_table, batch.seq_lens, batch.query_start_loc)
        pool = (heads.pool.offset, heads.pool.count, heads.kv_index)
        self.ops.retrieval_step(key_cache, value_cache, query, key, value, slot_mapping, out, *step, *pool, scale)

    def local_step(
        self, query, key, value, slot_mapping, out, key_cache, value_cache, tails, batch, heads, rule, scale
    ):
        rule.check(batch)
        step = (batch.block_table, batch.seq_lens, batch.query_start_loc, batch.prompt_lens, batch.windows)
        pool = (heads.pool.offset, heads.pool.count, heads.kv_index)
        local = (rule.sink, rule.window, rule.compensation, rule.exact_prefill)
        self.ops.local_step(
            key_cache, value_cache, tails, query, key, value, slot_mapping, out, *step, *pool, *local, scale
        )


_CPP = None if cpp is None else _CppKernels(cpp)


def _refuse_scales(kernel: str, k_scale, v_scale) -> None:
    """fp8 caches (vLLM's k/v scales) are read by the Triton kernels only."""
    if k_scale is not None or v_scale is not None:
        raise NotImplementedError(f"{kernel} with fp8 scales runs only on CUDA with the Triton kernels")


def _fp8(k_scale, v_scale) -> dict:
    """The scales as the Triton kernels take them (keywords); nothing when there are none."""
    return {} if k_scale is None and v_scale is None else {"k_scale": k_scale, "v_scale": v_scale}


def _choose(kernel: str, query_dtype: torch.dtype, tensors: tuple, k_scale=None, v_scale=None):
    """The implementation for ``tensors`` (the key cache first; the kernels check that the others are
    on its device). Called for every layer and step, so it looks at little: the environment (read per
    call, as tests set it), the key cache's device, and on the CPU the dtypes, devices and row strides
    the C++ ops support."""
    forced = os.environ.get(KERNELS_ENV)
    key_cache = tensors[0]
    if forced:
        impl = kernels(forced)
    elif key_cache.is_cuda:
        return triton_kernels()
    elif (
        cpp is not None
        and query_dtype in CPP_DTYPES
        and key_cache.dtype in CPP_DTYPES
        and all(t.is_cpu and t.stride(-1) == 1 for t in tensors)
    ):
        impl = _CPP
    else:
        impl = reference
    _refuse_scales(kernel, k_scale, v_scale)
    return impl


def local_attention(query, key_cache, value_cache, tails, batch, heads, rule, scale, k_scale=None, v_scale=None):
    """Local-head attention (exact prompt queries, or sinks + window + compensation); returns
    [T, Hq, D] in query's dtype. ``rule.compensation=False`` (an ablation): ``tails`` is not read.
    An fp8 cache (float8 views) needs the layer's ``_k_scale``/``_v_scale`` (Triton only)."""
    impl = _choose("local_attention", query.dtype, (key_cache, value_cache, tails), k_scale, v_scale)
    return impl.local_attention(
        query, key_cache, value_cache, tails, batch, heads, rule, scale, **_fp8(k_scale, v_scale)
    )


def write_block_tails(key_cache, value_cache, tails, batch, heads, rule, k_scale=None, v_scale=None) -> None:
    """After this step's K/V are stored and before attention: write the tail of every local block
    whose first position is among this step's queries (sums over [S, b*B); zeros when b*B <= S).
    An fp8 cache: the sums are of the dequantized values (scales as for ``local_attention``)."""
    impl = _choose("write_block_tails", torch.float32, (key_cache, value_cache, tails), k_scale, v_scale)
    impl.write_block_tails(key_cache, value_cache, tails, batch, heads, rule, **_fp8(k_scale, v_scale))


def paged_attention(query, key_cache, value_cache, batch, heads, scale, k_scale=None, v_scale=None):
    """Causal attention of retrieval heads over the paged cache; returns [T, Hq, D] in query's dtype.

    On CUDA, ``batch.max_query_len`` (exact, or 0 = unknown) lets a small pure-decode step take vLLM's
    split-key path. An fp8 cache (float8 views, ``kv_dtypes.fp8_view``) needs the layer's
    ``_k_scale``/``_v_scale`` (Triton only)."""
    impl = _choose("paged_attention", query.dtype, (key_cache, value_cache), k_scale, v_scale)
    return impl.paged_attention(query, key_cache, value_cache, batch, heads, scale, **_fp8(k_scale, v_scale))


def store_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    heads: PoolHeads,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    kv_select: Union[slice, torch.Tensor, None] = None,
) -> None:
    """Store key/value [T, heads.count, D] at pool heads [heads.offset, heads.offset + heads.count) of
    ``slot_mapping`` (block * block_size + offset in this pool, negative = padding).

    ``kv_select``: which of key/value's heads to store (a slice, or an int64 index tensor on their
    device; None = all), so that a layer's heads in a pool need no gathered copy on the CPU.
    On CUDA one Triton launch reads the mapping on the device (no host sync: CUDA-graph safe); on the
    CPU the C++ op (threads only for long chunks); ``cache.write_kv`` where neither applies or when
    ``RAZOR_VLLM_KERNELS=reference``. An fp8 cache (float8 views) needs the layer's
    ``_k_scale``/``_v_scale`` (stored = value / scale; Triton only).
    """
    if isinstance(kv_select, slice):
        key, value, kv_select = key[:, kv_select], value[:, kv_select], None
    impl = _choose("store_kv", key.dtype, (key_cache, value_cache, key, value), k_scale, v_scale)
    if impl is _CPP:  # reads the selected heads in place
        cpp.store_kv(key_cache, value_cache, key, value, slot_mapping, heads.offset, kv_select)
        return
    if kv_select is not None:
        key, value = key.index_select(1, kv_select), value.index_select(1, kv_select)
    if impl is reference:
        write_kv(key_cache, value_cache, key, value, slot_mapping, heads.offset)
    else:
        impl.store_kv(key_cache, value_cache, key, value, slot_mapping, heads, **_fp8(k_scale, v_scale))


def retrieval_step(
    query,
    key,
    value,
    slot_mapping,
    out,
    key_cache,
    value_cache,
    batch,
    heads: LayerPoolHeads,
    scale,
    k_scale=None,
    v_scale=None,
) -> None:
    """One layer's step in the retrieval pool: ``store_kv`` of the layer's KV heads ``heads`` (key and
    value hold all the layer's KV heads), then ``paged_attention`` of its query heads, written into
    those heads of ``out`` (the layer's output, query's shape). On the CPU one C++ call, reading the
    heads in place and writing the output rows in place (a decode step's per-layer work is mostly
    call overhead); elsewhere the kernels above, one after another."""
    impl = _choose("retrieval_step", query.dtype, (key_cache, value_cache, key, value, query, out), k_scale, v_scale)
    if impl is _CPP:
        impl.retrieval_step(query, key, value, slot_mapping, out, key_cache, value_cache, batch, heads, scale)
        return
    store_kv(key_cache, value_cache, key, value, slot_mapping, heads.pool, k_scale, v_scale, kv_select=heads.kv_select)
    heads_out = paged_attention(
        heads.select_q(query), key_cache, value_cache, batch, heads.pool, scale, k_scale, v_scale
    )
    heads.scatter_q(out, heads_out)


def local_step(
    query,
    key,
    value,
    slot_mapping,
    out,
    key_cache,
    value_cache,
    tails,
    batch,
    heads: LayerPoolHeads,
    rule,
    scale,
    k_scale=None,
    v_scale=None,
) -> None:
    """One layer's step in the local pool: ``store_kv``, ``write_block_tails``, then ``local_attention``
    written into the heads' rows of ``out``, as ``retrieval_step`` (one C++ call on the CPU)."""
    tensors = (key_cache, value_cache, tails, key, value, query, out)
    impl = _choose("local_step", query.dtype, tensors, k_scale, v_scale)
    if impl is _CPP:
        impl.local_step(query, key, value, slot_mapping, out, key_cache, value_cache, tails, batch, heads, rule, scale)
        return
    store_kv(key_cache, value_cache, key, value, slot_mapping, heads.pool, k_scale, v_scale, kv_select=heads.kv_select)
    write_block_tails(key_cache, value_cache, tails, batch, heads.pool, rule, k_scale, v_scale)
    heads_out = local_attention(
        heads.select_q(query), key_cache, value_cache, tails, batch, heads.pool, rule, scale, k_scale, v_scale
    )
    heads.scatter_q(out, heads_out)


__all__ = [
    "LayerPoolHeads",
    "LocalRule",
    "PoolHeads",
    "PagedBatch",
    "local_attention",
    "write_block_tails",
    "paged_attention",
    "store_kv",
    "retrieval_step",
    "local_step",
    "kernels",
    "cpp",
    "triton_kernels",
    "KERNELS_ENV",
]

"""fp8 KV cache bookkeeping (page arithmetic, the fp32 tails in a one-byte cache, per-platform
capability) and the reference kernels' device-independence.

The fp8 kernels themselves (store and retrieval against the float64 oracle) are interpreter checks
in tests/kernels/test_triton_kernels.py (``paged_float8_*``).
"""

from __future__ import annotations

import pytest
import torch

from razor_vllm import kv_dtypes
from razor_vllm.layout import plan_layout, tail_slots_for
from razor_vllm.pools import compensation_view


@pytest.mark.parametrize("dtype_size", [1, 2, 4])
def test_tails_hold_fp32_sums_in_any_entry_size(dtype_size):
    """A tail slot is 2*D entries; the tail must hold 2 x D fp32 sums: 8*D bytes."""
    slots = tail_slots_for(dtype_size)
    assert slots * 2 * dtype_size >= 8 and (slots - 1) * 2 * dtype_size < 8


def test_one_byte_pages_are_equal_and_tails_round_trip():
    """fp8 (uint8 storage): both pools' pages are equal in bytes, and compensation_view reads and
    writes fp32 sums in every block's tail without touching its K/V slots."""
    head_size, local_block = 64, 16
    layout = plan_layout([[0], [], [1, 2]], 4, local_block, dtype_size=1, default_block_size=128)
    assert layout.tail_slots == 4
    retrieval_page = layout.retrieval_pool_heads * layout.retrieval_block_size * 2 * head_size
    local_page = layout.local_pool_heads * (local_block + layout.tail_slots) * 2 * head_size
    assert retrieval_page == local_page
    blocks = 5
    raw = torch.randint(0, 255, (blocks, local_page), dtype=torch.uint8)
    slots_end = layout.local_pool_heads * local_block * 2 * head_size
    kv = raw[:, :slots_end].view(blocks, layout.local_pool_heads, local_block, 2 * head_size)
    before = kv.clone()
    tails = compensation_view(kv, layout, head_size)
    assert tails.dtype == torch.float32 and tails.shape == (blocks, layout.local_pool_heads, 2, head_size)
    sums = torch.randn(tails.shape)
    tails.copy_(sums)
    assert torch.equal(compensation_view(kv, layout, head_size), sums)
    assert torch.equal(kv, before), "writing the sums changed a K/V slot"
    key_view = kv_dtypes.fp8_view(kv, "fp8")[..., :head_size]
    assert key_view.dtype == torch.float8_e4m3fn and key_view.data_ptr() == kv.data_ptr()
    assert kv_dtypes.fp8_view(kv, "fp8_e5m2").dtype == torch.float8_e5m2


def test_capability_per_platform():
    """CPU never lists fp8 (razor's C++ kernels read 16/32-bit caches); CUDA lists it exactly when
    every kernel of both pools is ready for it."""
    assert not set(kv_dtypes.FP8_KV_CACHE_DTYPES) & set(kv_dtypes.supported_kv_cache_dtypes("cpu"))
    cuda = set(kv_dtypes.supported_kv_cache_dtypes("cuda"))
    assert (set(kv_dtypes.FP8_KV_CACHE_DTYPES) <= cuda) == kv_dtypes.FP8_READY_ON_CUDA
    from razor_vllm.backend import RazorAttentionBackend

    assert RazorAttentionBackend.supported_kv_cache_dtypes == kv_dtypes.supported_kv_cache_dtypes()
    assert not RazorAttentionBackend.supports_kv_cache_dtype("fp8")  # this machine: CPU


def test_forced_cpu_kernels_refuse_fp8_at_start_up(monkeypatch):
    """RAZOR_VLLM_KERNELS=reference|cpp on a GPU: those kernels read no fp8, so it is not offered."""
    from razor_vllm import ops

    monkeypatch.setenv(ops.KERNELS_ENV, "reference")
    assert not set(kv_dtypes.FP8_KV_CACHE_DTYPES) & set(kv_dtypes.supported_kv_cache_dtypes("cuda"))
    monkeypatch.delenv(ops.KERNELS_ENV)
    assert set(kv_dtypes.FP8_KV_CACHE_DTYPES) <= set(kv_dtypes.supported_kv_cache_dtypes("cuda"))


def test_fp8_cache_view_rejects_other_storage():
    with pytest.raises(ValueError, match="stored as uint8"):
        kv_dtypes.fp8_view(torch.zeros(2, 4, dtype=torch.bfloat16), "fp8_e4m3")


# ---------------------------------------------------------------------------------------------
# The reference kernels on any device (RAZOR_VLLM_KERNELS=reference on a GPU)


def _step():
    """One mixed step (a chunk past the window, a decode, a padding request) of one pool."""
    from razor_vllm.ops.api import LocalRule, PagedBatch, PoolHeads

    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(8, 3, 8, 32, generator=gen)
    tails = torch.randn(8, 3, 2, 16, generator=gen)
    query = torch.randn(7, 4, 16, generator=gen)
    batch = PagedBatch(
        block_table=torch.tensor([[2, 4, 6], [1, 5, 3], [0, 0, 0]], dtype=torch.int32),
        seq_lens=torch.tensor([22, 20, 0], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 6, 7, 7], dtype=torch.int32),
        prompt_lens=torch.tensor([22, 12, 0], dtype=torch.int32),
        max_query_len=6,
    )
    return query, kv, tails, batch, PoolHeads(offset=1, count=2), LocalRule(sink=2, window=5)


def test_reference_builds_nothing_on_the_default_device():
    """Every tensor the reference makes must live on its inputs' device. With the default device set
    to "meta", a factory call without device= makes a meta tensor, and combining it with the (CPU)
    caches raises, exactly as a host tensor against CUDA caches would on a GPU: all three kernels,
    exact and compressed prefill, give the same results as without the meta default."""
    from razor_vllm.ops import reference

    query, kv, tails, batch, heads, rule = _step()
    k, v = kv[..., :16], kv[..., 16:]
    for exact in (True, False):
        r = type(rule)(sink=rule.sink, window=rule.window, exact_prefill=exact)
        expected = reference.local_attention(query, k, v, tails, batch, heads, r, 0.25)
        with torch.device("meta"):
            got = reference.local_attention(query, k, v, tails, batch, heads, r, 0.25)
        assert got.device.type == "cpu" and torch.equal(got, expected)
    expected = reference.paged_attention(query, k, v, batch, heads, 0.25)
    with torch.device("meta"):
        got = reference.paged_attention(query, k, v, batch, heads, 0.25)
    assert got.device.type == "cpu" and torch.equal(got, expected)
    want = tails.clone()
    reference.write_block_tails(k, v, want, batch, heads, rule)
    with torch.device("meta"):
        reference.write_block_tails(k, v, tails, batch, heads, rule)
    assert torch.equal(tails, want) and tails.device.type == "cpu"


def test_the_meta_default_device_catches_host_tensors():
    """The check above can fail: a kernel that builds a mask without device= (as the reference's
    causal mask does today) raises under it; the same kernel with device= passes."""

    def careless(logits: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(logits.shape[1])
        return logits.masked_fill(positions[None, :] > positions[:, None], -1e9).softmax(-1)

    def careful(logits: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(logits.shape[1], device=logits.device)
        return logits.masked_fill(positions[None, :] > positions[:, None], -1e9).softmax(-1)

    logits = torch.randn(4, 4)
    expected = careful(logits)
    with torch.device("meta"):
        assert torch.equal(careful(logits), expected)
        with pytest.raises((RuntimeError, NotImplementedError)):
            careless(logits)


def test_store_kv_reference_path_builds_nothing_on_the_default_device():
    """ops.store_kv's non-Triton path (cache.write_kv, used with RAZOR_VLLM_KERNELS=reference on a GPU)."""
    from razor_vllm.ops.cache import write_kv

    kv = torch.zeros(3, 2, 4, 16)
    key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    slots = torch.tensor([5, -1, 2])
    with torch.device("meta"):
        write_kv(kv[..., :8], kv[..., 8:], key, value, slots, 1)
    assert torch.equal(kv[1, 1, 1, :8], key[0, 0]) and torch.equal(kv[0, 1, 2, 8:], value[2, 0])


# ---------------------------------------------------------------------------------------------
# The dispatcher's wiring of the Triton-only arguments (the engine's path to split-key decode and fp8)


def test_dispatcher_hands_triton_the_step_and_the_scales(monkeypatch):
    """ops hands the Triton kernels the contract's objects as they are (the very batch, whose
    max_query_len selects vLLM's split-key decode path in paged_attention, tested in
    tests/kernels/test_triton_kernels.py) and the layer's fp8 scales as keywords; the CPU kernels
    refuse scales (a clear error, never an fp8 cache read as if it were unscaled)."""
    from razor_vllm import ops

    calls = []

    class Recorder:  # stands in for razor_vllm.triton_kernels (no CUDA here); records the calls
        def __getattr__(self, kernel):
            return lambda *args, **kwargs: calls.append((kernel, args, kwargs))

    query, kv, tails, batch, heads, rule = _step()
    k, v = kv[..., :16], kv[..., 16:]
    k_scale, v_scale = torch.tensor([0.5]), torch.tensor([0.25])
    with monkeypatch.context() as patched:
        patched.setattr(ops, "_choose", lambda *args: Recorder())  # what it chooses for CUDA tensors
        ops.paged_attention(query, k, v, batch, heads, 0.25, k_scale, v_scale)
        ops.write_block_tails(k, v, tails, batch, heads, rule, k_scale, v_scale)
        ops.local_attention(query, k, v, tails, batch, heads, rule, 0.25, k_scale, v_scale)
    assert [kernel for kernel, _, _ in calls] == ["paged_attention", "write_block_tails", "local_attention"]
    expected = [(query, k, v, batch, heads, 0.25), (k, v, tails, batch, heads, rule)]
    expected.append((query, k, v, tails, batch, heads, rule, 0.25))
    for (kernel, args, kwargs), want in zip(calls, expected):
        assert kwargs == dict(k_scale=k_scale, v_scale=v_scale), kernel
        assert len(args) == len(want) and all(got is w for got, w in zip(args[:-1], want[:-1])), kernel
        assert args[-1] == want[-1], kernel

    for forced in ("reference", "cpp", ""):  # "": the CPU's own choice (C++ when built)
        if forced == "cpp" and ops.cpp is None:
            continue
        monkeypatch.setenv(ops.KERNELS_ENV, forced)
        with pytest.raises(NotImplementedError, match="paged_attention with fp8 scales runs only on CUDA"):
            ops.paged_attention(query, kv[..., :16], kv[..., 16:], batch, heads, 0.25, k_scale, v_scale)
        with pytest.raises(NotImplementedError, match="write_block_tails with fp8 scales runs only on CUDA"):
            ops.write_block_tails(kv[..., :16], kv[..., 16:], tails, batch, heads, rule, k_scale, v_scale)
        with pytest.raises(NotImplementedError, match="local_attention with fp8 scales runs only on CUDA"):
            ops.local_attention(query, kv[..., :16], kv[..., 16:], tails, batch, heads, rule, 0.25, k_scale, v_scale)
    with pytest.raises(NotImplementedError, match="store_kv with fp8 scales"):
        ops.store_kv(
            kv[..., :16],
            kv[..., 16:],
            query[:, :2],
            query[:, :2],
            torch.zeros(7, dtype=torch.int64),
            heads,
            k_scale,
            v_scale,
        )

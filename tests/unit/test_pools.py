"""The local pool's block manager and spec with vLLM's real BlockPool (no engine): what a request
holds while it prefills and after, what admission reserves, in both prefill modes and window rules."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool

from razor_vllm.geometry import LocalGeometry, cdiv, max_concurrency
from razor_vllm.pools import RazorLocalManager, RazorLocalSpec

B, SINK, WINDOW = 16, 4, 24


def make_manager(exact: bool, ratio=None, max_model_len: int = 4096, num_blocks: int = 512):
    geo = LocalGeometry(sink=SINK, window=WINDOW, block_size=B, exact_prefill=exact, compression_ratio=ratio)
    spec = RazorLocalSpec(
        block_size=B,
        num_kv_heads=2,
        head_size=8,
        dtype=torch.float32,
        sliding_window=geo.max_window(max_model_len),
        sink=SINK,
        window=WINDOW,
        exact_prefill=exact,
        compression_ratio=ratio,
    )
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=B)
    manager = RazorLocalManager(
        spec,
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=0,
        scheduler_block_size=B,
        max_admission_blocks_per_request=spec.max_admission_blocks_per_request(64, max_model_len),
    )
    return manager, pool


def run_chunks(manager, rid: str, prompt: int, total: int, chunk: int):
    """Drive a request as vLLM's allocate_slots does: free what is skipped at the processed count,
    then allocate slots for the next chunk. Yields (processed, held block indices) before each step."""
    processed = 0
    while processed < total:
        manager.remove_skipped_blocks(rid, processed, prompt)
        end = min(total, processed + (chunk if processed < prompt else 1))
        end = min(end, prompt) if processed < prompt else end
        manager.allocate_new_blocks(rid, end, end)
        held = [i for i, b in enumerate(manager.req_to_blocks[rid]) if not b.is_null]
        yield processed, end, held
        processed = end


@pytest.mark.parametrize("chunk", [7, 64])
def test_exact_prefill_keeps_every_prompt_block_until_the_prompt_is_done(chunk):
    manager, pool = make_manager(exact=True)
    prompt, total = 203, 260  # the prompt ends mid-block; 57 generated tokens
    free_before = pool.get_num_free_blocks()
    for processed, end, held in run_chunks(manager, "r", prompt, total, chunk):
        if processed < prompt:
            assert held == list(range(cdiv(end, B)))  # nothing freed while the prompt prefills
        else:
            # After the prompt: sinks + the blocks from the one holding the oldest window position
            # (processed - W + 1) on; the block before the step's block is in memory too.
            first = (processed - WINDOW + 1) // B
            assert held == list(range(cdiv(SINK, B))) + list(range(max(first, 1), cdiv(end, B)))
            assert (processed - 1) // B in held
    manager.free("r")
    assert pool.get_num_free_blocks() == free_before


def test_compressed_prefill_frees_while_prefilling():
    manager, _ = make_manager(exact=False)
    peaks = []
    for processed, end, held in run_chunks(manager, "r", 203, 210, 32):
        first = max(0, processed - WINDOW + 1) // B
        assert held == sorted(set(range(cdiv(SINK, B))) | set(range(first, cdiv(end, B))))
        peaks.append(len(held))
    assert max(peaks) < cdiv(203, B)


def test_preempted_request_recomputes_prompt_exactly_then_by_the_window_rule():
    """After preemption vLLM recomputes prompt + generated tokens as one prefill (prefill_end =
    num_tokens - 1): the manager keeps every block only up to the prompt's end."""
    manager, _ = make_manager(exact=True)
    prompt = 100
    list(run_chunks(manager, "r", prompt, prompt + 40, 64))
    manager.free("r")  # preempted
    processed = 0
    for end in (64, 128, 180):  # recompute in chunks crossing the prompt's end
        manager.remove_skipped_blocks("r", processed, prompt)
        manager.allocate_new_blocks("r", end, end)
        held = [i for i, b in enumerate(manager.req_to_blocks["r"]) if not b.is_null]
        if processed < prompt:
            assert held == list(range(cdiv(end, B)))
        else:
            assert 0 in held and len(held) < cdiv(end, B)
        processed = end


def test_admission_reserves_the_prompt_in_exact_mode():
    for exact in (True, False):
        manager, _ = make_manager(exact=exact)
        cap = manager.max_admission_blocks_per_request
        need = manager.get_num_blocks_to_allocate(
            "new", 1000, [], 0, 0, 1000, apply_admission_cap=True, prefill_end=1000
        )
        assert need == (cdiv(1000, B) if exact else cap)
        assert manager.max_admission_blocks_per_request == cap  # restored
        # Per-step allocation (no cap) counts the same blocks in both modes for a new request.
        assert manager.get_num_blocks_to_allocate("new", 64, [], 0, 0, 64) == cdiv(64, B)


def test_spec_peak_memory_and_concurrency():
    from types import SimpleNamespace

    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), max_in_flight_tokens=64)
    exact, _ = make_manager(exact=True)
    compressed, _ = make_manager(exact=False)
    page = exact.kv_cache_spec.page_size_bytes
    assert exact.kv_cache_spec.max_memory_usage_bytes(config) == cdiv(4096, B) * page
    cap = compressed.kv_cache_spec.max_admission_blocks_per_request(64, 4096)
    assert compressed.kv_cache_spec.max_memory_usage_bytes(config) == cap * page
    # (c - 1) requests at their steady cap plus one at its peak fit in the pool.
    c = max_concurrency(1000, cap, cdiv(4096, B) - cap)
    assert (int(c) - 1) * cap + cdiv(4096, B) <= 1000 < int(c) * cap + cdiv(4096, B)


def test_paper_window_rule_grows_with_the_prompt():
    geo = LocalGeometry(sink=SINK, window=WINDOW, block_size=B, compression_ratio=4.0)
    assert geo.request_window(40) == WINDOW and geo.request_window(401) == 101
    manager, _ = make_manager(exact=True, ratio=4.0)
    prompt = 400  # window max(24, 100) = 100
    for processed, end, held in run_chunks(manager, "r", prompt, prompt + 20, 128):
        if processed >= prompt:
            first = (processed - 100 + 1) // B
            assert held == [0] + list(range(first, cdiv(end, B)))
    assert manager.kv_cache_spec.sliding_window == 1024  # the spec's window: max_model_len / C


def test_skipped_tokens_keep_the_block_before_a_new_block():
    """Window 1 would free position p0 - 1 when a step starts a block at p0; write_block_tails reads it."""
    geo = LocalGeometry(sink=0, window=1, block_size=B, exact_prefill=False)
    for p0 in range(1, 100):
        assert geo.skipped_tokens(p0, 0) <= p0 - 1


def test_pool_layer_views_follow_the_cache_vllm_binds():
    """A pool layer's kernel views (K, V, and the local pool's fp32 page tails) are made when vLLM
    binds a cache to it (``AttentionLayerBase.bind_kv_cache``) and dropped when vLLM clears it
    (``layer.kv_cache = torch.tensor([])``, vllm/v1/worker/utils.py clear_layer_kv_caches), so no
    layer makes them per step and none keeps a dropped cache alive."""
    from razor_vllm.backend import RazorAttentionBackend
    from razor_vllm.layout import plan_layout
    from razor_vllm.pools import RazorPoolLayer, build_specs, compensation_view

    layout = plan_layout([[1], [0, 2]], 3, B, 4)
    retrieval_spec, local_spec = build_specs(layout, 8, torch.float32, SINK, WINDOW, max_model_len=256)
    local = RazorPoolLayer("razor_pools.100001.local", local_spec, RazorAttentionBackend, layout)
    retrieval = RazorPoolLayer("razor_pools.100000.retrieval", retrieval_spec, RazorAttentionBackend, layout)
    assert local.views is None and retrieval.views is None  # nothing bound yet

    def cache(spec, num_blocks=5):
        page = spec.page_size_bytes // 4
        pages = torch.randn(num_blocks, page)
        width = 2 * spec.head_size
        shape = (num_blocks, spec.num_kv_heads, spec.block_size, width)
        return pages.as_strided(shape, (page, spec.block_size * width, width, 1))

    for _ in range(2):  # bound, cleared, bound again (a new tensor)
        kv = cache(local_spec)
        local.bind_kv_cache(kv)
        retrieval.kv_cache = cache(retrieval_spec)
        views = local.views
        assert torch.equal(views.key_cache, kv[..., :8]) and views.key_cache.data_ptr() == kv.data_ptr()
        assert torch.equal(views.value_cache, kv[..., 8:])
        assert torch.equal(views.tails, compensation_view(kv, layout, 8))
        assert retrieval.views.tails is None
        assert retrieval.views.key_cache.data_ptr() == retrieval.kv_cache.data_ptr()
        local.kv_cache = torch.tensor([])
        assert local.views is None

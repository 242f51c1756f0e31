"""``razor_vllm.geometry`` against independent counts: blocks found by enumerating the token positions a
request keeps, bytes by counting the slots of a page, on awkward inputs (windows that are not a
multiple of the block, sink 0, sinks longer than a block, contexts shorter than sink + window, the
paper's window rule). No engine: vLLM's own spec classes are the second opinion where vLLM's formula
is the rule (the admission cap, stock pages, the "Maximum concurrency" figure).
"""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from razor_vllm.geometry import (
    LocalGeometry,
    PoolGeometry,
    StockGeometry,
    cdiv,
    head_token_bytes,
    max_concurrency,
    paged_bytes,
)
from razor_vllm.layout import plan_layout, shard_kv_heads

# (sink, window, block): window < block, = block, block + 1, many blocks; sink 0, 1, > block; block 1.
RULES = [
    (0, 1, 16),
    (0, 2, 16),
    (0, 17, 16),
    (1, 3, 7),
    (4, 24, 16),
    (4, 256, 32),
    (5, 33, 8),
    (20, 16, 16),
    (33, 100, 32),
    (0, 40, 1),
    (3, 9, 1),
]
RATIOS = [None, 3.0, 8.0]


def blocks_of(positions, block: int) -> set[int]:
    return {p // block for p in positions}


def kept_blocks(geo: LocalGeometry, t: int, window: int) -> set[int]:
    """Blocks held when the query at position ``t`` is computed by the sink + window rule: block 0 and
    the sinks' blocks for life, the window ``[t - W + 1, t]`` (at least ``t - 1, t``: the block before
    a newly started block is read for its tail), counted position by position."""
    sinks = set(range(geo.sink_blocks)) | blocks_of(range(min(geo.sink, t + 1)), geo.block_size)
    first = max(0, t - max(window, 2) + 1)
    return sinks | blocks_of(range(first, t + 1), geo.block_size)


def steady_by_enumeration(geo: LocalGeometry, tokens: int) -> int:
    """The most blocks a request of ``tokens`` tokens holds at any query position by the window rule."""
    window = geo.request_window(tokens)
    return max(len(kept_blocks(geo, t, window) & set(range(cdiv(tokens, geo.block_size)))) for t in range(tokens))


def contexts_for(sink: int, window: int, block: int, long: int = 700) -> list[int]:
    """Shorter than a block, than sink + window, around both, and long."""
    edge = sink + window
    lengths = {1, 2, block - 1, block, block + 1, edge - 1, edge, edge + 1, edge + block + 3, 2 * edge + 5, long}
    return sorted(lengths - {0})


@pytest.mark.parametrize("sink,window,block", RULES)
@pytest.mark.parametrize("ratio", RATIOS)
def test_steady_blocks_are_the_most_a_decoding_request_holds(sink, window, block, ratio):
    geo = LocalGeometry(sink=sink, window=window, block_size=block, exact_prefill=False, compression_ratio=ratio)
    for tokens in contexts_for(sink, window, block):
        assert geo.steady_blocks(tokens) == steady_by_enumeration(geo, tokens), (tokens, geo)


@pytest.mark.parametrize("sink,window,block", RULES)
def test_window_blocks_and_hit_blocks_by_enumeration(sink, window, block):
    geo = LocalGeometry(sink=sink, window=window, block_size=block)
    w = max(window, 2)
    # A span of w positions starting at every offset in a block: window_blocks is the worst case.
    spans = [len(blocks_of(range(start, start + w), block)) for start in range(5 * block, 6 * block)]
    assert geo.window_blocks(window) == max(spans)
    # A prefix-cache hit ending on a block boundary h: the query at h reads [h - w + 1, h - 1] before it.
    h = 10 * block + block * cdiv(w, block)
    assert geo.blocks_behind(window) == len(blocks_of(range(h - w + 1, h), block))
    assert geo.held_blocks(window) == len(set(range(geo.sink_blocks)) | blocks_of(range(sink), block)) + max(spans)


@pytest.mark.parametrize("sink,window,block", RULES)
def test_tokens_before_window_frees_nothing_the_next_query_reads(sink, window, block):
    geo = LocalGeometry(sink=sink, window=window, block_size=block, exact_prefill=False)
    for processed in range(0, 3 * (window + block)):
        skipped = geo.skipped_tokens(processed, processed)
        # Query at `processed` reads [processed - window + 1, processed]; the position before stays too.
        assert skipped == max(0, min(processed - window + 1, processed - 1)), processed
    exact = LocalGeometry(sink=sink, window=window, block_size=block, exact_prefill=True)
    assert exact.skipped_tokens(50, 60) == 0 and exact.skipped_tokens(50, None) == 0  # prompt not done
    assert exact.skipped_tokens(500, 60) == geo.skipped_tokens(500, 60)


def test_paper_window_rule():
    geo = LocalGeometry(sink=4, window=24, block_size=16, compression_ratio=8.0)
    for prompt in (1, 24 * 8 - 1, 24 * 8, 24 * 8 + 1, 1000, 1001, 4096):
        assert geo.request_window(prompt) == max(24, -(-prompt // 8))  # N / C rounded up, never below S0
    assert geo.max_window(4096) == 512
    prompts = [1, 24 * 8, 24 * 8 + 1, 1001, 4096]
    assert geo.request_windows(prompts) == [24, 24, 25, 126, 512]  # the builder's per-step windows
    fixed = LocalGeometry(sink=4, window=24, block_size=16)
    assert fixed.request_window(10**6) == fixed.max_window(10**6) == 24


@pytest.mark.parametrize("sink,window,block", RULES)
@pytest.mark.parametrize("ratio", [None, 3.0])
def test_admission_exact_reserves_every_prompt_block(sink, window, block, ratio):
    geo = LocalGeometry(sink=sink, window=window, block_size=block, exact_prefill=True, compression_ratio=ratio)
    for tokens in contexts_for(sink, window, block):
        prompt_blocks = len(blocks_of(range(tokens), block))
        assert geo.admission_blocks(tokens, in_flight=64) == prompt_blocks
        assert geo.transient_blocks(tokens, 64) == prompt_blocks - geo.steady_blocks(tokens)


@pytest.mark.parametrize("sink,window,block", RULES)
@pytest.mark.parametrize("ratio", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 13, 64])
def test_admission_compressed_covers_every_chunk_step(sink, window, block, ratio, chunk):
    """Compressed prefill in chunks of ``chunk`` tokens: at every step the request holds its sinks, the
    window of the step's first query and the chunk; admission reserves at least that peak, and is
    vLLM's sliding-window cap plus the sink blocks (vLLM's SlidingWindowSpec is the second opinion)."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    geo = LocalGeometry(sink=sink, window=window, block_size=block, exact_prefill=False, compression_ratio=ratio)
    for tokens in contexts_for(sink, window, block, long=300):
        w, own = geo.request_window(tokens), set(range(cdiv(tokens, block)))
        peak = 0
        for start in range(tokens):  # every offset a chunk can start at
            end = min(start + chunk, tokens)
            held = kept_blocks(geo, start, w) | blocks_of(range(start, end), block)
            peak = max(peak, len(held & own))
        assert peak <= geo.admission_blocks(tokens, chunk), (tokens, peak)
        # Razor keeps a window of at least 2 positions (LocalGeometry.skipped_tokens).
        window_kept = max(geo.max_window(tokens), 2)
        vllm = SlidingWindowSpec(
            block_size=block, num_kv_heads=1, head_size=8, dtype=torch.float32, sliding_window=window_kept
        )
        cap = min(vllm.max_admission_blocks_per_request(chunk, tokens) + geo.sink_blocks, cdiv(tokens, block))
        assert geo.chunk_cap(chunk, tokens) == cap
        assert geo.admission_blocks(tokens, chunk) == min(cdiv(tokens, block), cap)


@pytest.mark.parametrize("exact", [True, False])
def test_logged_blocks_and_max_concurrency_by_counting_requests(exact):
    """The "Maximum concurrency" figure: the most requests that fit when every one holds its steady
    cap and the one being admitted its transient too, found by adding requests one at a time."""
    geo = LocalGeometry(sink=4, window=100, block_size=16, exact_prefill=exact)
    for max_len, in_flight, num_blocks in itertools.product((50, 300, 4096), (16, 512), (40, 1000, 12345)):
        held, extra = geo.logged_blocks(in_flight, max_len)
        assert held == geo.chunk_cap(in_flight, max_len)
        assert extra == (max(0, cdiv(max_len, 16) - held) if exact else 0)
        fitted = 0
        while (fitted + 1) * held + extra <= num_blocks:
            fitted += 1
        assert math.floor(max_concurrency(num_blocks, held, extra)) == fitted


def layouts():
    """Pool layouts of uneven profiles: no retrieval head, no local head, padding heads, hash-aligned."""
    rng = random.Random(0)
    for layers, kv, share, dtype_bytes, local_block, aligned in [
        (6, 2, 0.3, 4, 16, False),
        (30, 3, 0.15, 2, 32, False),
        (30, 3, 0.15, 2, 32, True),
        (8, 8, 0.5, 1, 48, False),
        (4, 2, 0.0, 4, 16, False),
        (4, 2, 1.0, 2, 16, False),
    ]:
        heads = [[h for h in range(kv) if rng.random() < share] for _ in range(layers)]
        layout = plan_layout(heads, kv, local_block, dtype_bytes, default_block_size=128, hash_aligned=aligned)
        yield layout, dtype_bytes


@pytest.mark.parametrize("layout,dtype_bytes", list(layouts()))
def test_pool_bytes_by_counting_slots(layout, dtype_bytes):
    head_size = 64
    pool = PoolGeometry.of(layout, head_size, dtype_bytes, sink=4, window=100, exact_prefill=True)
    k_and_v = 2 * head_size * dtype_bytes
    assert head_token_bytes(head_size, dtype_bytes) == pool.head_token_bytes == k_and_v
    if layout.has_local_pool:  # per local pool head: its block's token slots and the tail; then padding
        slots = sum(layout.local_block_size + layout.tail_slots for _ in range(layout.local_pool_heads))
        slots += layout.page_padding_slots
    else:
        slots = sum(layout.retrieval_block_size for _ in range(layout.retrieval_pool_heads))
    assert pool.page_bytes == slots * k_and_v
    if layout.has_retrieval_pool:  # equal pages: a retrieval block is a page
        assert pool.page_bytes == layout.retrieval_pool_heads * layout.retrieval_block_size * k_and_v
    assert pool.retrieval_bytes_per_token == layout.retrieval_pool_heads * k_and_v
    assert pool.local_bytes_per_token == (pool.page_bytes / layout.local_block_size if layout.has_local_pool else 0)
    for tokens in (1, 99, 100, 101, 1000, 4099):
        retrieval = len(blocks_of(range(tokens), layout.retrieval_block_size)) if layout.has_retrieval_pool else 0
        local_steady = steady_by_enumeration(pool.local, tokens) if layout.has_local_pool else 0
        local_peak = len(blocks_of(range(tokens), layout.local_block_size)) if layout.has_local_pool else 0
        assert pool.steady_pages(tokens) == retrieval + local_steady
        assert pool.admission_pages(tokens, 512) == retrieval + local_peak
        # Three requests decoding and a fourth admitted: its prompt's pages on top of their steady ones.
        assert pool.batch_pages(4, tokens, 512) == 3 * (retrieval + local_steady) + retrieval + local_peak
    assert pool.num_blocks(10 * pool.page_bytes + 1) == 10


def test_pool_bytes_are_vllms_spec_pages():
    """build_specs' specs (vLLM's page arithmetic for the retrieval pool) agree with PoolGeometry."""
    from razor_vllm.pools import build_specs

    for layout, dtype_bytes in layouts():
        dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
        pool = PoolGeometry.of(layout, 64, dtype_bytes, 4, 100, compression_ratio=4.0)
        retrieval, local = build_specs(layout, 64, dtype, 4, 100, compression_ratio=4.0, max_model_len=2000)
        for spec in (retrieval, local):
            if spec is not None:
                assert spec.page_size_bytes == pool.page_bytes
        if retrieval is not None:
            assert retrieval.page_size_bytes // retrieval.block_size == pool.retrieval_bytes_per_token
        if local is not None:
            assert local.sliding_window == pool.local.max_window(2000) == 500
            assert local.geometry == pool.local


@pytest.mark.parametrize("exact", [True, False])
def test_logged_concurrency_is_vllms_figure_or_hook_10s(exact):
    """Compressed: vLLM's own get_max_concurrency_for_kv_cache_config on the pools' specs. Exact: the
    figure hook 10 logs (vllm_compat.razor_max_concurrency) on the same specs."""
    from vllm.v1.core import kv_cache_utils

    from razor_vllm.pools import build_specs
    from razor_vllm.vllm_compat import razor_max_concurrency

    original = getattr(kv_cache_utils.get_max_concurrency_for_kv_cache_config, "__wrapped__", None)
    original = original or kv_cache_utils.get_max_concurrency_for_kv_cache_config
    for layout, dtype_bytes in layouts():
        if dtype_bytes == 1:
            continue
        dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
        pool = PoolGeometry.of(layout, 64, dtype_bytes, 4, 100, exact_prefill=exact)
        specs = [s for s in build_specs(layout, 64, dtype, 4, 100, exact_prefill=exact, max_model_len=3000) if s]
        config = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=3000),
            parallel_config=SimpleNamespace(decode_context_parallel_size=1, prefill_context_parallel_size=1),
            max_in_flight_tokens=256,
        )
        kv = SimpleNamespace(
            num_blocks=777, kv_cache_groups=[SimpleNamespace(kv_cache_spec=s, host_resident=False) for s in specs]
        )
        ours = razor_max_concurrency(config, kv)
        if ours is None:  # no exact-prefill local pool: vLLM's figure stands
            ours = original(config, kv)
        assert pool.logged_concurrency(777, 3000, 256) == pytest.approx(ours)


@pytest.mark.parametrize("num_kv_heads,tp", [(8, 1), (8, 2), (8, 8), (3, 3), (3, 6), (2, 8), (1, 4)])
def test_stock_bytes_by_counting_pages(num_kv_heads, tp):
    """Stock: a page per layer, every KV head each rank holds (replicas when tp exceeds the heads)."""
    held = sum(len(shard_kv_heads(list(range(num_kv_heads)), num_kv_heads, tp, r)) for r in range(tp))
    stock = StockGeometry.of(num_layers=5, num_kv_heads=num_kv_heads, head_token_bytes=256, block_size=16, tp_size=tp)
    assert stock.kv_heads == held
    assert stock.bytes_per_token == 5 * held * 256
    for tokens in (1, 15, 16, 17, 1000):
        pages = len(blocks_of(range(tokens), 16))
        assert stock.blocks(tokens) == pages
        assert stock.request_bytes(tokens) == pages * 16 * stock.bytes_per_token
        assert paged_bytes(tokens, 16, stock.bytes_per_token) == stock.request_bytes(tokens)
    assert stock.num_blocks(3 * stock.block_bytes - 1) == 2

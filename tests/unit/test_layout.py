"""Pool layout: equal pages for vLLM's shared block pool, no per-layer padding, TP shards."""

import random

import pytest

from razor_vllm.layout import plan_layout, shard_kv_heads, tail_slots_for


def _random_heads(rng, layers, kv_heads, share):
    pairs = rng.sample([(l, h) for l in range(layers) for h in range(kv_heads)], round(share * layers * kv_heads))
    return [sorted(h for l2, h in pairs if l2 == l) for l in range(layers)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype_size", [2, 4])
@pytest.mark.parametrize("local_block", [16, 32, 64])
def test_pages_equal_and_heads_placed_once(seed, dtype_size, local_block):
    rng = random.Random(seed)
    layers, kv_heads = rng.choice([(30, 3), (32, 8), (28, 4), (4, 2)])
    heads = _random_heads(rng, layers, kv_heads, rng.choice([0.05, 0.14, 0.25, 0.5]))
    layout = plan_layout(heads, kv_heads, local_block, dtype_size)
    tail = tail_slots_for(dtype_size)
    n_r = sum(map(len, heads))
    n_l = layers * kv_heads - n_r
    assert layout.num_retrieval_heads == n_r and layout.num_local_heads == n_l
    if n_r and n_l:
        # vLLM pools blocks of both groups: the pages must be byte-identical.
        assert layout.retrieval_pool_heads * layout.retrieval_block_size == layout.local_pool_heads * (
            local_block + tail
        )
    # Padding is a few heads, not "every layer padded to the largest count".
    assert layout.retrieval_pool_heads - n_r <= max(2, n_r // 4)
    # Each layer's heads are contiguous, disjoint, and cover exactly its heads.
    seen_r, seen_l = set(), set()
    for layer, want in zip(layout.layers, heads):
        assert list(layer.retrieval) == want
        assert sorted(layer.retrieval + layer.local) == list(range(kv_heads))
        slots_r = set(range(layer.retrieval_offset, layer.retrieval_offset + len(layer.retrieval)))
        slots_l = set(range(layer.local_offset, layer.local_offset + len(layer.local)))
        assert not slots_r & seen_r and not slots_l & seen_l
        seen_r |= slots_r
        seen_l |= slots_l
    assert max(seen_r, default=-1) < layout.retrieval_pool_heads
    assert max(seen_l, default=-1) < layout.local_pool_heads


def test_layers_without_retrieval_heads_cost_nothing_in_retrieval_pool():
    heads = [[0], [], [], [1, 2], []]
    layout = plan_layout(heads, 3, 32, 2)
    assert [len(l.retrieval) for l in layout.layers] == [1, 0, 0, 2, 0]
    assert layout.retrieval_pool_heads < 2 * 3  # far below padding every layer to 2 heads (10)


def test_single_pool_layouts():
    all_retrieval = plan_layout([[0, 1]] * 4, 2, 32, 2, default_block_size=128)
    assert not all_retrieval.has_local_pool and all_retrieval.retrieval_block_size == 128
    all_local = plan_layout([[]] * 4, 2, 32, 2)
    assert not all_local.has_retrieval_pool and all_local.local_pool_heads == 8


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_shards_partition_global_heads(tp):
    total = 8
    global_heads = [0, 3, 4, 7]
    per_rank = total // tp
    collected = []
    for rank in range(tp):
        local = shard_kv_heads(global_heads, total, tp, rank)
        assert all(0 <= h < per_rank for h in local)
        collected += [rank * per_rank + h for h in local]
    assert sorted(collected) == global_heads


@pytest.mark.parametrize("tp", [4, 8])
def test_tp_replicated_kv_heads(tp):
    # 2 KV heads over 4/8 ranks: vLLM replicates each head on tp/2 ranks.
    held = [shard_kv_heads([1], 2, tp, rank) for rank in range(tp)]
    assert held == [[]] * (tp // 2) + [[0]] * (tp // 2)


def test_tp_size_must_divide():
    with pytest.raises(ValueError, match="cannot be split"):
        shard_kv_heads([0], 6, 4, 0)


# -- prefix caching: block sizes vLLM can hash -------------------------------------------------------


def _vllm_block_sizes(layout, head_size=64, dtype=None):
    """(scheduler_block_size, hash_block_size) that vLLM 0.32 derives from the pools' specs with
    prefix caching on (kv_cache_utils.resolve_kv_cache_block_sizes, the engine core's own call)."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from razor_vllm.pools import build_specs

    dtype = dtype or {2: torch.bfloat16, 1: torch.float32}[layout.tail_slots]
    retrieval, local = build_specs(layout, head_size, dtype, sink=4, window=64)
    if retrieval is not None and local is not None:
        assert retrieval.page_size_bytes == local.page_size_bytes  # vLLM's shared block pool
    groups = [KVCacheGroupSpec([name], spec) for name, spec in (("r", retrieval), ("l", local)) if spec is not None]
    config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=groups)
    vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=True, prefix_match_unit=None, block_size=128),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        kv_transfer_config=None,
    )
    return resolve_kv_cache_block_sizes(config, vllm_config)


def _default_profile_heads():
    from pathlib import Path

    from razor_vllm.config import RazorProfile

    return RazorProfile.load(Path(__file__).parents[2] / "configs" / "smollm2-135m-instruct.yaml").retrieval_heads


def _assert_hash_aligned(heads, dtype_size, *, retrieval_heads, local_heads, block):
    """Sink 3, window 32, hash-aligned: retrieval heads unpadded in blocks of ``block`` tokens, the local
    pool's page padded up to the retrieval page (less than one more retrieval block step), and vLLM
    schedules ``block``-token blocks over 32-token hash blocks."""
    layout = plan_layout(heads, 3, 32, dtype_size, hash_aligned=True)
    assert (layout.retrieval_pool_heads, layout.local_pool_heads) == (retrieval_heads, local_heads)
    assert layout.retrieval_block_size == block
    page = retrieval_heads * block
    assert layout.page_slots() == page == local_heads * (32 + layout.tail_slots) + layout.page_padding_slots
    assert layout.page_padding_slots < retrieval_heads * 32
    scheduler_block, hash_block = _vllm_block_sizes(layout)
    assert (scheduler_block, hash_block) == (block, 32) == (layout.cache_hit_granularity, layout.hash_block_size)


@pytest.mark.parametrize("dtype_size", [2, 4])
def test_default_profile_hash_aligned_for_prefix_caching(dtype_size):
    heads = _default_profile_heads()
    unaligned = plan_layout(heads, 3, 32, dtype_size)
    # The first solver's blocks: a hash unit of gcd(68, 32) = 4 / gcd(66, 32) = 2 tokens, hits only
    # every lcm = 544 / 1,056 tokens.
    assert unaligned.retrieval_block_size == {2: 68, 4: 66}[dtype_size]
    # The shipped profile (35/90 heads): 35 retrieval heads unpadded; 55 local heads, page padded from
    # 55 * (32 + tail) up to 35 * 64.
    _assert_hash_aligned(heads, dtype_size, retrieval_heads=35, local_heads=55, block=64)


@pytest.mark.parametrize("dtype_size", [2, 4])
def test_paper_share_of_the_default_profile_hash_aligned(dtype_size):
    """The 14-head selection shipped before the calibrated profile (the paper's 15% share of the same
    scores), kept as a case with far more local than retrieval heads: blocks 192 and 32."""
    from pathlib import Path

    from razor_vllm.config import RazorProfile
    from razor_vllm.eval.variants import share_profile

    shipped = RazorProfile.load(Path(__file__).parents[2] / "configs" / "smollm2-135m-instruct.yaml")
    heads = share_profile(shipped, 0.15).retrieval_heads
    unaligned = plan_layout(heads, 3, 32, dtype_size)
    # The first solver's blocks: vLLM would hash every token and land hits only every 5,984 / 3,168 tokens.
    assert unaligned.retrieval_block_size in (187, 198)
    # 14 retrieval heads unpadded; 76 local heads, page padded from 76 * (32 + tail) up to 14 * 192.
    _assert_hash_aligned(heads, dtype_size, retrieval_heads=14, local_heads=76, block=192)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype_size", [2, 4])
@pytest.mark.parametrize("local_block", [16, 32, 64])
def test_hash_aligned_layouts_least_padding(seed, dtype_size, local_block):
    """Unbalanced profiles (one retrieval head, half, a single local head): one block size divides the
    other, vLLM hashes in the smaller and hits on the larger, and no allowed retrieval block pads less."""
    rng = random.Random(seed)
    layers, kv_heads = rng.choice([(30, 3), (32, 8), (28, 4), (4, 2), (24, 1)])
    heads = _random_heads(rng, layers, kv_heads, rng.choice([0.03, 0.14, 0.5, 0.9]))
    if seed == 0:  # a single retrieval head in the whole model
        heads = [[0]] + [[] for _ in range(layers - 1)]
    if seed == 1:  # a single local head
        heads = [list(range(kv_heads)) for _ in range(layers)]
        heads[-1] = heads[-1][1:]
    layout = plan_layout(heads, kv_heads, local_block, dtype_size, hash_aligned=True)
    tail = tail_slots_for(dtype_size)
    n_r = sum(map(len, heads))
    n_l = layers * kv_heads - n_r
    assert (layout.num_retrieval_heads, layout.num_local_heads) == (n_r, n_l)
    if not (n_r and n_l):
        return
    b_r, b_l = layout.retrieval_block_size, local_block
    assert b_r % b_l == 0 or b_l % b_r == 0
    local_slots = layout.local_pool_heads * (b_l + tail)
    assert layout.page_padding_slots >= 0
    assert layout.retrieval_pool_heads * b_r == local_slots + layout.page_padding_slots == layout.page_slots()
    assert _vllm_block_sizes(layout) == (max(b_r, b_l), min(b_r, b_l))
    # Least padding: with the same retrieval heads, no smaller allowed block holds the local page.
    smaller = [b for b in range(16, b_r) if (b % b_l == 0 or b_l % b == 0)]
    assert all(layout.retrieval_pool_heads * b < local_slots for b in smaller)
    assert layout.local_pool_heads == n_l  # local padding goes into the page, not into heads
    if layout.retrieval_pool_heads == n_r:
        assert layout.page_padding_slots < n_r * b_l or b_r < b_l


def test_hash_aligned_single_pool_layouts_unchanged():
    assert plan_layout([[0, 1]] * 4, 2, 32, 2, hash_aligned=True).retrieval_block_size == 128
    all_local = plan_layout([[]] * 4, 2, 32, 2, hash_aligned=True)
    assert all_local.page_padding_slots == 0 and all_local.hash_block_size == 32

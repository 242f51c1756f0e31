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
        assert layout.retrieval_pool_heads * layout.retrieval_block_size == layout.local_pool_heads * (local_block + tail)
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

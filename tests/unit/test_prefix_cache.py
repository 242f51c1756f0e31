"""Prefix caching with both razor pools, on vLLM's real KV cache manager (hybrid coordinator, block
pool, block hashes; no engine): which blocks a hit hands over, in both prefill modes; what is never
published (exact mode: generated positions); freed and evicted blocks; and that a request writes
(K/V and block tails) only blocks it started itself, never a block another request can read.

The engine-level exactness (outputs with a hit == outputs without caching) is in
tests/engine/test_engine_prefix_cache.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from vllm import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from razor_vllm import vllm_compat
from razor_vllm.layout import plan_layout
from razor_vllm.pools import LOCAL_POOL_NAME, RETRIEVAL_POOL_NAME, RazorLocalManager, RazorRetrievalManager, build_specs

SINK, WINDOW, B_LOCAL = 4, 24, 16
# 2 retrieval + 6 local KV heads, fp32: the hash-aligned layout puts 64 tokens in a retrieval block.
HEADS = [[0], [], [1], []]


def make_manager(exact: bool, num_blocks: int = 256, max_model_len: int = 2048, window: int = WINDOW):
    register_all_kvcache_specs(None)
    vllm_compat.register_razor_specs()
    layout = plan_layout(HEADS, 2, B_LOCAL, 4, hash_aligned=True)
    assert (layout.retrieval_block_size, layout.hash_block_size, layout.cache_hit_granularity) == (64, 16, 64)
    retrieval, local = build_specs(
        layout, 8, torch.float32, SINK, window, exact_prefill=exact, max_model_len=max_model_len
    )
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec([RETRIEVAL_POOL_NAME], retrieval),
            KVCacheGroupSpec([LOCAL_POOL_NAME], local),
        ],
    )
    manager = KVCacheManager(
        config,
        max_model_len,
        scheduler_block_size=64,
        hash_block_size=16,
        max_in_flight_tokens=256,
        enable_caching=True,
        log_stats=True,
    )
    r_mgr, l_mgr = manager.coordinator.single_type_managers
    assert isinstance(r_mgr, RazorRetrievalManager) and isinstance(l_mgr, RazorLocalManager)
    return manager


hash_fn = get_hash_fn_by_name("sha256")
init_none_hash(hash_fn)
HASHER = get_request_block_hasher(16, hash_fn)


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=1000), None, block_hasher=HASHER)


@dataclass
class Driver:
    """Plays vLLM's scheduler against the manager: admit (cache lookup + allocate), prefill in chunks,
    decode, free; after each allocation checks what the step writes (memory safety)."""

    manager: KVCacheManager
    hits: dict[str, int] = field(default_factory=dict)
    hit_blocks: dict[str, set[int]] = field(default_factory=dict)

    def admit(self, req: Request, chunk: int = 10_000, same_step: bool = False) -> int:
        """A scheduler step that admits ``req``; ``same_step``: in the step of the previous call."""
        if not same_step:
            self.manager.new_step_starts()
        blocks, n_hit, _ = self.manager.get_computed_blocks(req)
        self.manager.record_prefix_cache_stats(req, n_hit)  # as the scheduler does on admission
        self.hits[req.request_id] = n_hit
        self.hit_blocks[req.request_id] = {b.block_id for group in blocks.blocks for b in group if not b.is_null}
        new = min(chunk, req.num_tokens - n_hit)
        assert self.manager.allocate_slots(req, new, n_hit, blocks) is not None
        req.num_computed_tokens = n_hit
        self.check_writes(req, new)
        req.num_computed_tokens += new
        return n_hit

    def step(self, req: Request, chunk: int = 10_000) -> None:
        """The next prefill chunk, or one decode token (a generated token appended first)."""
        if req.num_computed_tokens >= req.num_tokens:
            req.append_output_token_ids(random.Random(req.num_tokens).randrange(1000, 2000))
        new = min(chunk, req.num_tokens - req.num_computed_tokens)
        self.manager.new_step_starts()
        assert self.manager.allocate_slots(req, new) is not None
        self.check_writes(req, new)
        req.num_computed_tokens += new

    def run(self, req: Request, total: int, chunk: int = 10_000) -> None:
        while req.num_computed_tokens < total:
            self.step(req, chunk)

    def check_writes(self, req: Request, new: int) -> None:
        """This step stores K/V at positions [p0, p0 + new) and writes the tail of every local block it
        starts: all of those blocks are the request's own, none came from a cache hit, and no other
        request holds them (ref_cnt 1). So no block is written while another request can read it."""
        p0 = req.num_computed_tokens
        for manager in self.manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks[req.request_id]
            written = {p // manager.block_size: blocks[p // manager.block_size] for p in range(p0, p0 + new)}
            for block in written.values():
                assert not block.is_null
                assert block.block_id not in self.hit_blocks[req.request_id]
                assert block.ref_cnt == 1, (req.request_id, block)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def local_held(manager: KVCacheManager, rid: str) -> list[int]:
    l_mgr = manager.coordinator.single_type_managers[1]
    return [i for i, b in enumerate(l_mgr.req_to_blocks[rid]) if not b.is_null]


@pytest.mark.parametrize("chunk", [10_000, 48])
def test_exact_mode_hit_hands_over_every_prefix_block(chunk):
    manager = make_manager(exact=True)
    drive = Driver(manager)
    doc = tokens(1, 200)
    a = request("a", doc)
    drive.admit(a, chunk)
    drive.run(a, 200 + 30, chunk)  # prefill (chunked or not), then 30 decode steps
    manager.free(a)

    # B shares 150 tokens: the hit is the largest multiple of the retrieval block (64) <= 150.
    b = request("b", doc[:150] + tokens(2, 90))
    assert drive.admit(b, chunk) == 128
    # Local pool: all 8 blocks of the prefix (the rest of B's prompt attends to every position).
    assert local_held(manager, "b") == list(range(cdiv(128 + min(chunk, 112), B_LOCAL)))
    drive.run(b, 240 + 5, chunk)
    manager.free(b)

    # The same prompt again: hit up to the last full 64 before its last token.
    c = request("c", list(doc))
    assert drive.admit(c) == 192


def multi_turn_hits(manager) -> tuple[int, tuple[int, ...]]:
    """A 200-token prompt answered with 70 tokens; the second turn re-sends both plus a question.
    Returns the second turn's hit and each pool's own longest hit."""
    drive = Driver(manager)
    a = request("a", tokens(3, 200))
    drive.admit(a)
    drive.run(a, 200 + 70)  # 270 tokens: full 64-blocks up to 256, but only 200 were prompt
    turn2 = request("b", list(a.all_token_ids) + tokens(4, 40))
    manager.free(a)
    _, per_group = manager.coordinator.find_longest_cache_hit_per_group(turn2.block_hashes, turn2.num_tokens - 1)
    return drive.admit(turn2), per_group


def test_exact_mode_never_publishes_generated_positions():
    """Multi-turn: the second prompt re-sends the first prompt and its answer. Exact mode: positions
    computed as decode queries are not what an exact prefill writes, so neither pool publishes them
    and the hit stops at the first prompt's aligned part (192), not at the answer's (256). A window
    of 100 keeps the answer's local blocks alive long enough to be published if they were allowed."""
    hit, per_group = multi_turn_hits(make_manager(exact=True, window=100))
    assert hit == 192 and per_group == (192, 192)


def test_exact_mode_break_check_uncapped_would_hit_generated_positions(monkeypatch):
    """Break it once: without the cap both pools publish the answer's blocks and the hit covers 56
    positions computed by decode queries (which would change the second turn's output)."""
    from razor_vllm import pools

    monkeypatch.setattr(pools, "_prefix_cacheable_tokens", lambda request, n, exact: n)
    hit, per_group = multi_turn_hits(make_manager(exact=True, window=100))
    assert hit == 256 and per_group == (256, 256)


def test_compressed_mode_hit_needs_sinks_and_window_only():
    manager = make_manager(exact=False)
    drive = Driver(manager)
    a = request("a", tokens(5, 200))
    drive.admit(a, 64)
    drive.run(a, 200 + 70, 64)  # compressed: the local pool keeps only sinks + window while prefilling
    turn2 = list(a.all_token_ids) + tokens(6, 40)
    manager.free(a)
    # Compressed mode: prompt and decode queries follow one rule, generated positions are cacheable.
    b = request("b", turn2)
    assert drive.admit(b, 16) == 256
    # The hit's local blocks: the sink block and the window of position 256 (W=24: blocks 14, 15);
    # nulls between.
    l_mgr = manager.coordinator.single_type_managers[1]
    held = l_mgr.req_to_blocks["b"]
    assert [i for i, blk in enumerate(held[:16]) if not blk.is_null] == [0, 14, 15]


def test_compressed_mode_no_hit_without_the_sink_block():
    """A hit needs the request's sink block: once it is evicted, the window blocks alone do not hit."""
    manager = make_manager(exact=False)
    drive = Driver(manager)
    a = request("a", tokens(7, 200))
    drive.admit(a)
    manager.free(a)
    b = request("b", tokens(7, 200) + [5])
    blocks, n_hit, _ = manager.get_computed_blocks(b)
    assert n_hit == 192
    sink_block = blocks.blocks[1][0]
    manager.block_pool.evict_blocks({sink_block.block_id})
    assert manager.get_computed_blocks(request("b2", tokens(7, 200) + [5]))[1] == 0


@pytest.mark.parametrize("exact", [True, False])
def test_eviction_small_pool(exact):
    """A pool too small to keep A's blocks once others arrive: A's freed blocks stay hashed in the free
    queue and hit until reused; once reused, the hit shrinks to what is left (exact: a run from block
    0; compressed: sinks + window), and a hit never hands over a block that was reused."""
    num_blocks = 40 if exact else 24
    manager = make_manager(exact=exact, num_blocks=num_blocks, max_model_len=1024)
    drive = Driver(manager)
    doc = tokens(8, 300)
    a = request("a", doc)
    drive.admit(a, 64)
    drive.run(a, 300, 64)
    manager.free(a)
    assert manager.get_computed_blocks(request("probe", doc + [1]))[1] == 256
    # Another long request takes most of the free queue (LRU: A's blocks are reused from its tail end).
    c = request("c", tokens(9, 280 if exact else 700))
    drive.admit(c, 64)
    drive.run(c, 280, 64)
    blocks, n_hit, _ = manager.get_computed_blocks(request("d", doc + [1]))
    assert n_hit < 256
    for group in blocks.blocks:
        for blk in group:
            assert blk.is_null or blk.block_hash is not None  # still published, not reused
    managers = manager.coordinator.single_type_managers
    c_ids = {b.block_id for m in managers for b in m.req_to_blocks["c"] if not b.is_null}
    assert not c_ids & {b.block_id for g in blocks.blocks for b in g if not b.is_null}
    manager.free(c)
    # Everything is back in the free queue.
    assert manager.block_pool.get_num_free_blocks() == num_blocks - 1  # minus the null block


@pytest.mark.parametrize("exact", [True, False])
def test_many_requests_share_and_diverge(exact):
    """Eight requests share a 130-token document and diverge; the first computes it, the others hit
    it while the first still runs (shared blocks: ref_cnt counts every holder) and write only their
    own blocks."""
    manager = make_manager(exact=exact)
    drive = Driver(manager)
    doc = tokens(10, 130)
    first = request("q0", doc + tokens(100, 20))
    drive.admit(first)
    drive.run(first, 150 + 3)
    others = [request(f"q{i}", doc + tokens(100 + i, 20 + i)) for i in range(1, 8)]
    for req in others:
        assert drive.admit(req) == 128
        drive.run(req, req.num_prompt_tokens + 2)
    r_mgr = manager.coordinator.single_type_managers[0]
    shared = r_mgr.req_to_blocks["q1"][:2]
    assert all(blk.ref_cnt == 8 for blk in shared)  # every request holds the document's retrieval blocks
    for req in [first, *others]:
        manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == 256 - 1
    stats = manager.make_prefix_cache_stats()
    assert stats.hits == 7 * 128 and stats.requests == 8
    # /razor/status's per-pool view (pools.pool_usage, read from a scheduler-like object).
    from types import SimpleNamespace

    from razor_vllm.pools import pool_usage

    for req in [first, *others]:  # hold them again to see sharing counted once
        drive.admit(request(req.request_id + "x", list(req.prompt_token_ids)))
    config = manager.coordinator.kv_cache_config
    scheduler = SimpleNamespace(kv_cache_manager=manager, kv_cache_config=config, requests={})
    usage = pool_usage(scheduler)
    r_mgr, l_mgr = manager.coordinator.single_type_managers
    for label, mgr in (("retrieval", r_mgr), ("local", l_mgr)):
        ids = [b.block_id for blocks in mgr.req_to_blocks.values() for b in blocks if not b.is_null]
        assert usage["blocks_in_use"][label] == len(set(ids)) < len(ids)  # shared blocks counted once
        assert usage["shared_blocks"][label] == len({i for i in ids if ids.count(i) > 1}) > 0
    hits = usage["prefix_cache_hits"]
    assert hits["retrieval"]["requests"] == hits["local"]["requests"] == 7 + 8
    assert hits["retrieval"]["tokens"] == hits["local"]["tokens"] == stats.hits + manager.make_prefix_cache_stats().hits
    assert hits["retrieval"]["blocks"] == hits["retrieval"]["tokens"] // 64
    # Local: exact mode hands over every block of the hit, compressed only sinks + window.
    assert (hits["local"]["blocks"] == hits["local"]["tokens"] // 16) == exact


@pytest.mark.parametrize("exact", [True, False])
def test_no_hit_on_blocks_computed_in_the_same_step(exact):
    """vLLM hashes a block when it allocates it, before the step computes it. A request admitted in the
    same step as the one computing its prefix would start its local blocks' tails from a tail the
    other request writes in the same kernel call: razor's local pool defers it one step (as vLLM does
    for Mamba states); in the next step it takes the hit, computed by then."""
    manager = make_manager(exact=exact)
    drive = Driver(manager)
    doc = tokens(11, 130)
    first, second = request("a", doc + tokens(200, 20)), request("b", doc + tokens(201, 20))
    drive.admit(first)  # computes the document in this step: its blocks are hashed already
    blocks, n_hit, _ = manager.get_computed_blocks(second)
    assert n_hit == 128  # the lookup finds them...
    assert manager.allocate_slots(second, second.num_tokens - n_hit, n_hit, blocks) is None  # ...but waits
    assert drive.admit(second) == 128  # the next step: the hit, and only the request's own blocks written
    drive.run(second, second.num_prompt_tokens + 2)
    for req in (first, second):
        manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == 256 - 1

"""Where every layer's heads live in the two pools, and the pools' block sizes.

One retrieval pool and one local pool each span all layers: layer ``l`` owns the contiguous
pool heads ``[offset, offset + count)``. Layers therefore keep different numbers of retrieval
heads (some none) without padding every layer to the largest count.

vLLM allocates both pools from one block pool whose pages must be equal in size, so
``R_pool * retrieval_block = L_pool * (local_block + tail_slots) + page_padding_slots``. The local
page carries a tail of ``tail_slots`` token slots per head, where every local block keeps the fp32
compensation sums of the positions before it (written once, when the block is started). A few
padding heads (never read) make the equation solvable.

With prefix caching on, vLLM hashes prompts in units of the GCD of the groups' block sizes and
lands cache hits on their LCM (``kv_cache_utils.resolve_kv_cache_block_sizes``; fine-grained hits
exist only for Mamba groups). The first solver's blocks (187 retrieval, 32 local on the default
model's earlier 14-head profile) give a 1-token hash unit and a 5,984-token hit granularity, so with
caching on the retrieval block is a multiple of the local block instead (or divides it): the hash unit is the
smaller block, hits land on the larger one, and the local page is padded up to the retrieval page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

MIN_RETRIEVAL_BLOCK = 16
MAX_RETRIEVAL_BLOCK = 4096
MAX_PADDING_HEADS = 64


@dataclass(frozen=True)
class LayerHeads:
    """One layer's KV heads (rank-local ids) in each pool, and where they sit in the pool."""

    retrieval: tuple[int, ...]
    local: tuple[int, ...]
    retrieval_offset: int
    local_offset: int


@dataclass(frozen=True)
class PoolLayout:
    layers: tuple[LayerHeads, ...]
    retrieval_pool_heads: int  # including padding
    local_pool_heads: int  # including padding
    retrieval_block_size: int
    local_block_size: int
    tail_slots: int  # extra token slots per local head and block (compensation sums)
    page_padding_slots: int = 0  # token-head slots after the local page's tails (never read)

    @property
    def num_retrieval_heads(self) -> int:
        return sum(len(layer.retrieval) for layer in self.layers)

    @property
    def num_local_heads(self) -> int:
        return sum(len(layer.local) for layer in self.layers)

    @property
    def has_retrieval_pool(self) -> bool:
        # Pool heads, not this rank's heads: under tensor parallelism a rank may serve no retrieval
        # head of its own yet must register the pool its peers register (``balance.py``).
        return self.retrieval_pool_heads > 0

    @property
    def has_local_pool(self) -> bool:
        return self.local_pool_heads > 0

    def page_slots(self) -> int:
        """Token-head slots per page (equal for both pools when both exist)."""
        if self.has_local_pool:
            return self.local_pool_heads * (self.local_block_size + self.tail_slots) + self.page_padding_slots
        return self.retrieval_pool_heads * self.retrieval_block_size

    @property
    def hash_block_size(self) -> int:
        """The prompt-hash unit vLLM derives from these blocks when prefix caching is on (their GCD)."""
        if self.has_retrieval_pool and self.has_local_pool:
            return math.gcd(self.retrieval_block_size, self.local_block_size)
        return self.local_block_size if self.has_local_pool else self.retrieval_block_size

    @property
    def cache_hit_granularity(self) -> int:
        """Tokens a prefix-cache hit is a multiple of (vLLM's scheduler block size: the LCM)."""
        if self.has_retrieval_pool and self.has_local_pool:
            return math.lcm(self.retrieval_block_size, self.local_block_size)
        return self.hash_block_size


def tail_slots_for(dtype_size: int) -> int:
    """Token slots per head that hold fp32 K and V sums (2 x D x 4 bytes) in a cache of ``dtype_size``."""
    return -(-4 // dtype_size)


def shard_kv_heads(global_heads: Sequence[int], total_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Rank-local ids of the profile's global KV heads that ``tp_rank`` holds.

    With ``tp_size <= total_kv_heads`` rank r holds global heads [r*n, (r+1)*n), n = total/tp.
    With more ranks than KV heads, vLLM replicates: rank r holds global head r * total // tp_size.
    """
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ValueError(f"{total_kv_heads} KV heads cannot be split over tensor parallel size {tp_size}")
        per_rank = total_kv_heads // tp_size
        first = tp_rank * per_rank
        return [h - first for h in global_heads if first <= h < first + per_rank]
    if tp_size % total_kv_heads:
        raise ValueError(f"tensor parallel size {tp_size} is not a multiple of {total_kv_heads} KV heads")
    held = tp_rank * total_kv_heads // tp_size
    return [0] if held in global_heads else []


def _solve_block_sizes(
    num_retrieval: int, num_local: int, local_block: int, tail: int, preferred_retrieval_block: int
) -> tuple[int, int, int]:
    """(retrieval_pool_heads, local_pool_heads, retrieval_block) with equal pages and least padding."""
    best: Optional[tuple[tuple[int, int, int], tuple[int, int, int]]] = None
    for pad_r in range(0, MAX_PADDING_HEADS + 1):
        for pad_l in range(0, MAX_PADDING_HEADS + 1):
            r, l = num_retrieval + pad_r, num_local + pad_l
            slots = l * (local_block + tail)
            if slots % r:
                continue
            block = slots // r
            if not MIN_RETRIEVAL_BLOCK <= block <= MAX_RETRIEVAL_BLOCK:
                continue
            # Retrieval padding costs on every token of a sequence, local padding only on the window:
            # rank by relative retrieval waste first, then local waste, then a block size near preferred.
            key = (pad_r * 1000 // r, pad_l * 1000 // l, abs(block - preferred_retrieval_block))
            if best is None or key < best[0]:
                best = (key, (r, l, block))
        if best is not None and best[0][0] == 0:
            break
    if best is None:
        raise ValueError(
            f"no equal-page layout for {num_retrieval} retrieval and {num_local} local heads "
            f"with local block size {local_block}; try another local_block_size"
        )
    return best[1]


def _hash_aligned_retrieval_blocks(local_block: int) -> list[int]:
    """Retrieval block sizes whose GCD with ``local_block`` is the smaller of the two and whose LCM the
    larger: the divisors of the local block and its multiples, within the allowed range."""
    divisors = [d for d in range(MIN_RETRIEVAL_BLOCK, local_block) if local_block % d == 0]
    multiples = range(local_block, MAX_RETRIEVAL_BLOCK + 1, local_block)
    return [b for b in (*divisors, *multiples) if MIN_RETRIEVAL_BLOCK <= b <= MAX_RETRIEVAL_BLOCK]


def _solve_hash_aligned_block_sizes(
    num_retrieval: int, num_local: int, local_block: int, tail: int, preferred_retrieval_block: int
) -> tuple[int, int, int, int]:
    """(retrieval_pool_heads, local_pool_heads, retrieval_block, page_padding_slots) for prefix caching.

    The retrieval block is one of ``_hash_aligned_retrieval_blocks``; the local page is padded (vLLM's
    ``page_size_padded``) up to the retrieval page, which must be at least as large. Padding local
    heads instead would waste the same bytes, so only retrieval heads are padded (when that saves
    more than it costs). Ranked like ``_solve_block_sizes``: relative retrieval waste, then relative
    local waste, then a block near the preferred size.
    """
    local_slots = num_local * (local_block + tail)
    candidates = _hash_aligned_retrieval_blocks(local_block)
    best: Optional[tuple[tuple[int, int, int], tuple[int, int, int, int]]] = None
    for pad_r in range(0, MAX_PADDING_HEADS + 1):
        r = num_retrieval + pad_r
        block = next((b for b in candidates if r * b >= local_slots), None)
        if block is None:
            continue
        padding = r * block - local_slots
        key = (pad_r * 1000 // r, padding * 1000 // (r * block), abs(block - preferred_retrieval_block))
        if best is None or key < best[0]:
            best = (key, (r, num_local, block, padding))
    if best is None:
        raise ValueError(
            f"no prefix-cacheable layout for {num_retrieval} retrieval and {num_local} local heads "
            f"with local block size {local_block}; try another local_block_size"
        )
    return best[1]


def plan_layout(
    retrieval_heads_per_layer: Sequence[Sequence[int]],
    num_kv_heads: int,
    local_block_size: int,
    dtype_size: int,
    default_block_size: int = 128,
    hash_aligned: bool = False,
    pool_heads: Optional[tuple[int, int]] = None,
) -> PoolLayout:
    """Place each layer's heads (rank-local ids) into the pools and choose block sizes.

    ``hash_aligned`` (set when vLLM's prefix caching is on): one block size divides the other, so
    vLLM hashes prompts in local blocks and lands hits on the retrieval block (see the module doc).
    ``pool_heads``: the (retrieval, local) head counts to size the pools for, at least this rank's
    own; every rank of a parallel engine passes the same (``balance.ScaleoutPlan.pool_heads``) so
    that all of them plan identical pool specs. Default: this rank's own counts.
    """
    counts_r = [len(h) for h in retrieval_heads_per_layer]
    num_r = sum(counts_r)
    num_l = num_kv_heads * len(retrieval_heads_per_layer) - num_r
    if pool_heads is not None:
        if pool_heads[0] < num_r or pool_heads[1] < num_l:
            raise ValueError(f"pool heads {pool_heads} cannot hold {num_r} retrieval and {num_l} local heads")
        num_r, num_l = pool_heads
    tail = tail_slots_for(dtype_size)
    padding = 0
    if num_r and num_l and hash_aligned:
        pool_r, pool_l, block_r, padding = _solve_hash_aligned_block_sizes(
            num_r, num_l, local_block_size, tail, default_block_size
        )
    elif num_r and num_l:
        pool_r, pool_l, block_r = _solve_block_sizes(num_r, num_l, local_block_size, tail, default_block_size)
    else:
        pool_r, pool_l, block_r = num_r, num_l, default_block_size
    layers = []
    off_r = off_l = 0
    for heads in retrieval_heads_per_layer:
        retrieval = tuple(sorted(heads))
        local = tuple(h for h in range(num_kv_heads) if h not in set(retrieval))
        layers.append(LayerHeads(retrieval, local, off_r, off_l))
        off_r += len(retrieval)
        off_l += len(local)
    return PoolLayout(
        layers=tuple(layers),
        retrieval_pool_heads=pool_r,
        local_pool_heads=pool_l,
        retrieval_block_size=block_r,
        local_block_size=local_block_size,
        tail_slots=tail,
        page_padding_slots=padding,
    )

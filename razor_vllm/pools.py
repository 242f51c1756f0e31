"""The two KV pools as vLLM cache layers: their specs, the local pool's block manager, installation.

vLLM allocates KV memory per *cache layer* from each layer's ``KVCacheSpec``. Razor adds two
companion cache layers that span all model layers:

- the retrieval pool (``FullAttentionSpec``): every retrieval head's full paged cache;
- the local pool (``RazorLocalSpec``, a sliding-window spec): sink blocks kept for the request's
  life, window blocks freed as the window moves (``RazorLocalManager``; in exact-prefill mode only
  once the prompt is done), and in each block's page tail the fp32 sums of K and V over
  [sink, start of that block), written once when the block is started (the kernel contract).

The model's own attention layers get no cache of their own: they are declared KV-sharing
layers of a pool (vLLM's cross-layer sharing), so the runner binds them metadata and skips
allocating for them; the Razor impl then reads both pools through the pool layers its layer state
holds (``RazorPoolLayer.views``, made once per bound cache) and their metadata in the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec

from razor_vllm import kv_dtypes
from razor_vllm.geometry import LocalGeometry, PoolGeometry
from razor_vllm.layout import PoolLayout

if TYPE_CHECKING:
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.request import Request

logger = init_logger("vllm." + __name__)  # under "vllm" so it shares vLLM's log handlers

# Names must carry exactly one integer (vLLM's extract_layer_index); large ones sort the pools
# after every model layer in the runner's cache list.
RETRIEVAL_POOL_NAME = "razor_pools.100000.retrieval"
LOCAL_POOL_NAME = "razor_pools.100001.local"
POOL_LABELS = ("retrieval", "local")  # metric / status labels: the names' last part


def pool_names(stage: int = 0) -> tuple[str, str]:
    """(retrieval, local) pool layer names of pipeline stage ``stage``; stage 0's are the constants.

    vLLM merges the specs of all workers by layer name, so each stage's pools need their own names
    (a stage holds only its layers' heads).
    """
    return f"razor_pools.{100000 + 2 * stage}.retrieval", f"razor_pools.{100001 + 2 * stage}.local"


def pool_label(layer_name: str) -> Optional[str]:
    """``retrieval`` / ``local`` for a razor pool layer name, else ``None``."""
    if not layer_name.startswith("razor_pools."):
        return None
    label = layer_name.rsplit(".", 1)[-1]
    return label if label in POOL_LABELS else None


def _prefix_cacheable_tokens(request: Any, num_tokens: int, exact_prefill: bool) -> int:
    """How many of ``num_tokens`` a razor pool may publish to the prefix cache.

    Exact prefill: only prompt positions. K/V at a position computed as a decode query (a generated
    token, or one recomputed after preemption) come from local heads that read the compressed
    cache, so they differ from what an exact prefill of the same tokens writes, in both pools (the
    retrieval heads' inputs depend on earlier layers' local heads). A later prompt that re-sends
    an answer (multi-turn chat) must prefill it exactly, not hit those blocks.
    Compressed prefill: prompt and decode queries follow the same rule, so every token is cacheable.
    """
    if exact_prefill:
        return min(num_tokens, request.num_prompt_tokens)
    return num_tokens


class _PrefixHitCounter:
    """Per-pool prefix-cache hits since start-up, for ``/razor/status`` (vLLM counts hit tokens once
    for all groups): requests that started from a hit, the hit tokens, and the cached blocks handed
    over (the local pool's hits hold fewer blocks than tokens / block in compressed mode)."""

    def _count_hit(self, new_computed_blocks, num_local_computed_tokens: int) -> None:
        if not num_local_computed_tokens:
            return
        hits = self.__dict__.setdefault("prefix_cache_hits", {"requests": 0, "tokens": 0, "blocks": 0})
        hits["requests"] += 1
        hits["tokens"] += num_local_computed_tokens
        hits["blocks"] += sum(not b.is_null for b in new_computed_blocks)


@dataclass(frozen=True, kw_only=True)
class RazorRetrievalSpec(FullAttentionSpec):
    """The retrieval pool: full attention whose prefix-cache entries stop at the prompt in exact mode."""

    exact_prefill: bool = True


class RazorRetrievalManager(_PrefixHitCounter, FullAttentionManager):
    """vLLM's full-attention manager, publishing only what ``_prefix_cacheable_tokens`` allows."""

    def add_local_computed_blocks(
        self, request_id: str, new_computed_blocks, num_local_computed_tokens: int, *args, **kwargs
    ) -> None:
        self._count_hit(new_computed_blocks, num_local_computed_tokens)
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens, *args, **kwargs)

    def cache_blocks(self, request: Request, num_tokens: int, *args, **kwargs) -> None:
        exact = self.kv_cache_spec.exact_prefill
        super().cache_blocks(request, _prefix_cacheable_tokens(request, num_tokens, exact), *args, **kwargs)


@dataclass(frozen=True, kw_only=True)
class RazorLocalSpec(SlidingWindowSpec):
    """Sliding window plus ``sink`` tokens at the start that are never freed, and the prefill mode.

    ``sliding_window`` is the largest window any request gets (``window`` under the fixed rule, the
    paper's max(window, N / C) at ``max_model_len`` under the paper's rule); per-request windows and
    the block arithmetic come from ``geometry``. The first ``sink_blocks`` blocks of a request stay
    allocated, so admission reserves them too; in exact-prefill mode admission also reserves every
    prompt block, which the request holds until its prompt is done. Each block's page tail holds
    the fp32 sums of the positions between the sinks and the block (``razor_vllm.ops``: block tails).
    """

    sink: int = 0
    window: int = 0  # the configured window (the paper's S0); 0: ``sliding_window``
    exact_prefill: bool = True
    compression_ratio: Optional[float] = None  # the paper's C; None: fixed window

    @property
    def geometry(self) -> LocalGeometry:
        return LocalGeometry(
            sink=self.sink,
            window=self.window or self.sliding_window,
            block_size=self.block_size,
            exact_prefill=self.exact_prefill,
            compression_ratio=self.compression_ratio,
        )

    @property
    def sink_blocks(self) -> int:
        return self.geometry.sink_blocks

    @property
    def prefix_cacheable(self) -> bool:
        # Every block's tail holds sums over the positions before it, written once when the block
        # is started (``razor_vllm.ops``: block tails): a block depends only on its token prefix.
        return True

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """The steady cap (sinks + window + tokens in flight); the manager lifts it to the prompt's
        blocks for a request that prefills exactly (``RazorLocalManager.get_num_blocks_to_allocate``)."""
        return self.geometry.chunk_cap(max_in_flight_tokens, max_model_len)

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        """One request at ``max_model_len`` at its peak: vLLM checks at start-up that one fits."""
        blocks = self.geometry.admission_blocks(
            vllm_config.model_config.max_model_len,
            vllm_config.max_in_flight_tokens,
            vllm_config.model_config.max_model_len,
        )
        return blocks * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(spec, RazorLocalSpec) for spec in kv_cache_specs.values())


class RazorLocalManager(_PrefixHitCounter, SlidingWindowManager):
    """Frees window blocks that slid out, but never the request's sink blocks; prefix-cache hits
    carry what the rest of the request reads.

    A hit of ``h`` tokens (a multiple of vLLM's hit alignment, so a local block boundary) needs:
    - exact prefill: every block before ``h`` (the rest of the prompt attends to all of it);
    - compressed prefill: the sink blocks and the blocks of the window of position ``h``, from block
      ``c = (h - W + 1) // B`` (its tail holds the sums up to it) to block ``h/B - 1``.
    Both include block ``h/B - 1``, whose tail and positions the first block the request starts
    reads. Blocks a request takes from the cache were started (tails written) by another request
    and are never written again: the request computes positions >= ``h`` only, so the first block
    it starts is ``h/B``, a fresh block of its own (no partial hits: vLLM's sliding-window hits are
    whole blocks). Freed blocks stay hashed in vLLM's free queue until reused, as stock's do.

    Exact prefill: nothing is freed while the request's prompt is being computed (its prompt queries
    attend to every position); once it is done, every block outside sinks + window goes. A request
    resumed after preemption recomputes its prompt exactly and its generated tokens by the window
    rule (they are at positions >= the prompt length), as the first time.
    """

    def __init__(self, kv_cache_spec: RazorLocalSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.geometry = kv_cache_spec.geometry
        self.sink_blocks = self.geometry.sink_blocks
        self.exact_prefill = self.geometry.exact_prefill
        # Hashes of the blocks cached in this scheduler step (get_num_blocks_to_allocate).
        self.cached_blocks_this_step: set = set()

    def new_step_starts(self) -> None:
        self.cached_blocks_this_step.clear()

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        # Without the prompt length: exact mode skips nothing (a new request still prefills), the
        # compressed mode skips what the largest window would (never more than a request's own).
        if self.geometry.exact_prefill:
            return 0
        return self.geometry.tokens_before_window(num_computed_tokens, self.sliding_window)

    def _num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        args = (request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens)
        if not (apply_admission_cap and self.geometry.exact_prefill):
            return super().get_num_blocks_to_allocate(
                *args, num_tokens_main_model, apply_admission_cap=apply_admission_cap, prefill_end=prefill_end
            )
        # Exact prefill holds every block up to the prompt's end: the admission cap is at least
        # those. ``prefill_end`` is vLLM's max(prompt, num_tokens - 1) (0 when the coordinator drops
        # it): exact for a new request, an upper bound for a resumed one.
        steady_cap = self.max_admission_blocks_per_request
        prompt_end = min(prefill_end or num_tokens, num_tokens)
        self.max_admission_blocks_per_request = max(steady_cap or 0, cdiv(prompt_end, self.block_size))
        try:
            return super().get_num_blocks_to_allocate(
                *args, num_tokens_main_model, apply_admission_cap=True, prefill_end=prefill_end
            )
        finally:
            self.max_admission_blocks_per_request = steady_cap

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: Optional[int] = None
    ) -> None:
        num_skipped_tokens = self.geometry.skipped_tokens(processed_computed_tokens, num_prompt_tokens)
        if num_skipped_tokens <= 0:
            return
        blocks = self.req_to_blocks[request_id]
        last = min(num_skipped_tokens // self.block_size, len(blocks))
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)

    # -- prefix caching --------------------------------------------------------------------------

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        assert isinstance(kv_cache_spec, RazorLocalSpec)
        assert dcp_world_size == 1 and pcp_world_size == 1 and not drop_eagle_block
        block_size = kv_cache_spec.block_size
        block_hashes = resolve_block_hashes(
            block_hashes,
            block_pool.hash_block_size,
            block_size,
            supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
            alignment_tokens=alignment_tokens,
        )
        max_blocks = min(max_length // block_size, len(block_hashes))
        found: dict[int, Any] = {}

        def cached(i: int):
            if i not in found:
                found[i] = block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)
            return found[i]

        def aligned(k: int) -> bool:
            return (k * block_size) % alignment_tokens == 0

        if kv_cache_spec.exact_prefill:
            # Every block from 0: the longest cached run (chained hashes), cut to the alignment.
            run = 0
            while run < max_blocks and cached(run):
                run += 1
            hits = [(k, range(k)) for k in range(run, 0, -1) if aligned(k)][:1]
        else:
            # The blocks of the window of position h (a window of at least 2: get_num_skipped_tokens).
            window_blocks = kv_cache_spec.geometry.blocks_behind(kv_cache_spec.sliding_window)
            sinks = kv_cache_spec.sink_blocks
            hits = (
                (k, sorted({*range(min(sinks, k)), *range(max(0, k - window_blocks), k)}))
                for k in range(max_blocks, 0, -1)  # longest hit first
                if aligned(k)
            )
        for k, needed in hits:
            if all(cached(i) for i in needed):
                hit = tuple([block_pool.null_block] * k for _ in kv_cache_group_ids)
                for i in needed:
                    for computed, block in zip(hit, cached(i)):
                        computed[i] = block
                return hit, k * block_size
        return tuple([] for _ in kv_cache_group_ids), 0

    def _kept_hit_blocks(self, new_computed_blocks, num_computed_tokens: int) -> list:
        """The hit's blocks this request holds: all of them in exact mode (the prompt's rest reads them;
        the manager frees them once the prompt is done), else the sink blocks and those from the
        first block of the window on (the finder already put nulls between)."""
        if self.exact_prefill:
            return list(new_computed_blocks)
        skipped = self.get_num_skipped_tokens(num_computed_tokens) // self.block_size
        return [
            b if i < self.sink_blocks or i >= skipped else self._null_block for i, b in enumerate(new_computed_blocks)
        ]

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks, total_computed_tokens: int, *args, **kwargs
    ) -> int:
        if new_computed_blocks and new_computed_blocks[-1].block_hash in self.cached_blocks_this_step:
            # vLLM hashes a block when it allocates it, before the step computes it. Stock attention
            # may hit such a block in the same step (every layer stores its K/V before attending),
            # but a local block's tail is written by the request that computes it, in the same kernel
            # call that would start the hitting request's tails from it. As vLLM does for Mamba
            # states: report too many blocks, so the request waits one step and then takes the hit.
            # Blocks cached this step end a hit, so its last block (never null) tells.
            return self.block_pool.num_gpu_blocks + 1
        num = self._num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, *args, **kwargs
        )
        if request_id in self.num_cached_block or not new_computed_blocks:
            return num
        # vLLM counts the evictable hit blocks past the window only; the sink (and, in exact mode,
        # every) hit block this manager keeps leaves the free queue too when touched.
        skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        skipped = max(0, skipped - len(self.req_to_blocks.get(request_id, ())))
        kept = self._kept_hit_blocks(new_computed_blocks, total_computed_tokens)
        return num + self._get_num_evictable_blocks(kept[:skipped])

    def add_local_computed_blocks(
        self, request_id: str, new_computed_blocks, num_local_computed_tokens: int, num_external_computed_tokens: int
    ) -> None:
        if num_external_computed_tokens or not new_computed_blocks:
            return super().add_local_computed_blocks(
                request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens
            )
        req_blocks = self.req_to_blocks[request_id]
        assert not req_blocks and num_local_computed_tokens % self.block_size == 0
        kept = self._kept_hit_blocks(new_computed_blocks, num_local_computed_tokens)
        self._count_hit(kept, num_local_computed_tokens)
        self.block_pool.touch([b for b in kept if not b.is_null])
        req_blocks.extend(kept)
        self.num_cached_block[request_id] = len(req_blocks)

    @classmethod
    def reachable_block_mask(cls, start_block: int, end_block: int, alignment_tokens, kv_cache_spec, *args, **kwargs):
        """Which newly full blocks to publish: vLLM's sliding-window policy keeps only those a hit at
        an aligned boundary reads (the window before it); razor's hits also read the sink blocks,
        and in exact mode every block."""
        assert isinstance(kv_cache_spec, RazorLocalSpec)
        if kv_cache_spec.exact_prefill:
            return None
        window = replace(kv_cache_spec, sliding_window=max(kv_cache_spec.sliding_window, 2))
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, window, *args, **kwargs)
        if mask is None:
            return None
        return [keep or i < kv_cache_spec.sink_blocks for i, keep in enumerate(mask, start_block)]

    def cache_blocks(self, request: Request, num_tokens: int, *args, **kwargs) -> None:
        num_tokens = _prefix_cacheable_tokens(request, num_tokens, self.exact_prefill)
        before = self.num_cached_block.get(request.request_id, 0)
        super().cache_blocks(request, num_tokens, *args, **kwargs)
        blocks = self.req_to_blocks[request.request_id]
        for block in blocks[before : self.num_cached_block.get(request.request_id, 0)]:
            if not block.is_null and block.block_hash is not None:
                self.cached_blocks_this_step.add(block.block_hash)


@dataclass(frozen=True)
class PoolViews:
    """The kernels' views of one pool's bound cache (the kernel contract): K and V
    [num_blocks, pool_heads, block_size, head_size] (float8 views of an fp8 cache, which vLLM stores
    as uint8) and, for the local pool, the fp32 page tails (``compensation_view``)."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    tails: Optional[torch.Tensor]


class RazorPoolLayer(torch.nn.Module, AttentionLayerBase):
    """A cache-only layer: owns one pool's KV memory; never runs a forward of its own.

    Its ``views`` are made once each time vLLM binds a cache to it, not per layer and step: vLLM
    assigns ``kv_cache`` when it binds the allocated cache (``AttentionLayerBase.bind_kv_cache``,
    called by vllm/v1/worker/utils.py ``bind_kv_cache_to_layers``) and when it drops it
    (``clear_layer_kv_caches``, the runner's KV re-initialisation), so the views follow every
    assignment and never keep a dropped cache alive.
    """

    def __init__(
        self,
        name: str,
        spec: KVCacheSpec,
        backend: "type[AttentionBackend]",
        layout: Optional[PoolLayout] = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        super().__init__()
        self.layer_name = name
        self.spec = spec
        self.backend = backend
        self.layout = layout  # the local pool's page tails need it
        self.kv_cache_dtype = kv_cache_dtype
        self.views: Optional[PoolViews] = None
        self.kv_cache = torch.tensor([])

    @property
    def kv_cache(self) -> torch.Tensor:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: torch.Tensor) -> None:
        self._kv_cache = cache
        self.views = self._views_of(cache) if cache.dim() == 4 else None

    def _views_of(self, cache: torch.Tensor) -> PoolViews:
        head_size = self.spec.head_size
        kv = kv_dtypes.fp8_view(cache, self.kv_cache_dtype)
        tails = None
        if isinstance(self.spec, RazorLocalSpec):
            if self.layout is None:
                raise ValueError(f"{self.layer_name}: the local pool layer needs the pool layout for its page tails")
            tails = compensation_view(cache, self.layout, head_size)
        return PoolViews(kv[..., :head_size], kv[..., head_size:], tails)

    def get_attn_backend(self) -> "type[AttentionBackend]":
        return self.backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return self.spec


def build_specs(
    layout: PoolLayout,
    head_size: int,
    dtype: torch.dtype,
    sink: int,
    window: int,
    exact_prefill: bool = True,
    compression_ratio: Optional[float] = None,
    max_model_len: int = 0,
) -> tuple[Optional[RazorRetrievalSpec], Optional[RazorLocalSpec]]:
    """The pools' specs; pages are equal in size when both exist (see layout.py).

    Under the paper's window rule the spec's ``sliding_window`` is the window at ``max_model_len``.
    """
    elem = torch.tensor([], dtype=dtype).element_size()
    pool = PoolGeometry.of(layout, head_size, elem, sink, window, exact_prefill, compression_ratio)
    retrieval = local = None
    if layout.has_retrieval_pool:
        retrieval = RazorRetrievalSpec(
            block_size=layout.retrieval_block_size,
            num_kv_heads=layout.retrieval_pool_heads,
            head_size=head_size,
            dtype=dtype,
            exact_prefill=exact_prefill,
        )
    if layout.has_local_pool:
        local = RazorLocalSpec(
            block_size=layout.local_block_size,
            num_kv_heads=layout.local_pool_heads,
            head_size=head_size,
            dtype=dtype,
            sliding_window=pool.local.max_window(max_model_len),
            sink=sink,
            window=window,
            exact_prefill=exact_prefill,
            compression_ratio=compression_ratio,
            page_size_padded=pool.page_bytes,
        )
    if retrieval is not None and local is not None:
        assert retrieval.page_size_bytes == local.page_size_bytes, (retrieval, local)
    return retrieval, local


def compensation_view(local_cache: torch.Tensor, layout: PoolLayout, head_size: int) -> torch.Tensor:
    """fp32 [num_blocks, pool_heads, 2, head_size] view of the local pool's page tails.

    ``local_cache`` is vLLM's [num_blocks, heads, block_size, 2*head_size] view whose block stride
    spans the padded page; the tail starts right after the heads' token slots.
    """
    blocks, heads, block_size, width = local_cache.shape
    tail_elems = layout.tail_slots * width
    tail = torch.as_strided(
        local_cache,
        size=(blocks, heads, tail_elems),
        stride=(local_cache.stride(0), tail_elems, 1),
        storage_offset=local_cache.storage_offset() + heads * block_size * width,
    )
    fp32 = tail.view(torch.float32) if tail.dtype != torch.float32 else tail
    return fp32[..., : 2 * head_size].unflatten(-1, (2, head_size))


def pool_usage(scheduler: Any) -> Optional[dict[str, Any]]:
    """What the pools hold right now, read in the engine core from its scheduler; ``None`` without pools.

    Each pool is one KV cache group with its own block manager; the groups share one block pool.
    A block counts once however many requests hold it (prefix caching shares blocks: ``shared_blocks``
    counts those held by more than one request), and the null block that replaces freed window blocks
    does not count. ``tokens`` are the computed tokens of each request holding blocks (to compare
    with stock vLLM's paging). ``prefix_cache_hits``: each pool's hits since start-up
    (``_PrefixHitCounter``).
    """
    manager = scheduler.kv_cache_manager
    in_use: dict[str, int] = {}
    shared: dict[str, int] = {}
    hits: dict[str, dict[str, int]] = {}
    holders: set[str] = set()
    for group, single_type in zip(scheduler.kv_cache_config.kv_cache_groups, manager.coordinator.single_type_managers):
        label = next((pool_label(name) for name in group.layer_names if pool_label(name)), None)
        if label is None:
            continue
        ids: set[int] = set()
        many: set[int] = set()
        for request_id, blocks in single_type.req_to_blocks.items():
            held = {block.block_id for block in blocks if not block.is_null}
            if held:
                holders.add(request_id)
                many |= ids & held
                ids |= held
        in_use[label] = len(ids)
        shared[label] = len(many)
        hits[label] = dict(getattr(single_type, "prefix_cache_hits", None) or {"requests": 0, "tokens": 0, "blocks": 0})
    if not in_use:
        return None
    return {
        "blocks_in_use": in_use,
        "shared_blocks": shared,
        "prefix_cache_hits": hits,
        "num_blocks": int(scheduler.kv_cache_config.num_blocks),
        "free_blocks": int(manager.block_pool.get_num_free_blocks()),
        "tokens": sorted(scheduler.requests[r].num_computed_tokens for r in holders if r in scheduler.requests),
    }

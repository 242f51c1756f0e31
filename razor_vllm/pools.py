"""The two KV pools as vLLM cache layers: their specs, the local pool's block manager, installation.

vLLM allocates KV memory per *cache layer* from each layer's ``KVCacheSpec``. Razor adds two
companion cache layers that span all model layers:

- the retrieval pool (``FullAttentionSpec``): every retrieval head's full paged cache;
- the local pool (``RazorLocalSpec``, a sliding-window spec): sink blocks kept for the request's
  life, window blocks freed as the window moves (``RazorLocalManager``), and in the tail of each
  request's first block the fp32 compensation sums.

The model's own attention layers get no cache of their own: they are declared KV-sharing
layers of a pool (vLLM's cross-layer sharing), so the runner binds them metadata and skips
allocating for them; the Razor impl then reads both pools through the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec

from razor_vllm.layout import PoolLayout

if TYPE_CHECKING:
    from vllm.v1.attention.backend import AttentionBackend

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


@dataclass(frozen=True, kw_only=True)
class RazorLocalSpec(SlidingWindowSpec):
    """Sliding window plus ``sink`` tokens at the start that are never freed.

    The first ``sink_blocks`` blocks of a request stay allocated (they hold the sink tokens and,
    in block 0's page tail, the compensation sums), so admission reserves them too.
    """

    sink: int = 0

    @property
    def sink_blocks(self) -> int:
        return max(1, cdiv(self.sink, self.block_size))

    @property
    def prefix_cacheable(self) -> bool:
        return False

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window_blocks = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window_blocks + self.sink_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(spec, RazorLocalSpec) for spec in kv_cache_specs.values())


class RazorLocalManager(SlidingWindowManager):
    """Frees window blocks that slid out, but never the request's sink blocks."""

    def __init__(self, kv_cache_spec: RazorLocalSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: Optional[int] = None
    ) -> None:
        num_skipped_tokens = self.get_num_skipped_tokens(processed_computed_tokens)
        if num_skipped_tokens <= 0:
            return
        blocks = self.req_to_blocks[request_id]
        last = min(num_skipped_tokens // self.block_size, len(blocks))
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)


class RazorPoolLayer(torch.nn.Module, AttentionLayerBase):
    """A cache-only layer: owns one pool's KV memory; never runs a forward of its own."""

    def __init__(self, name: str, spec: KVCacheSpec, backend: "type[AttentionBackend]") -> None:
        super().__init__()
        self.layer_name = name
        self.spec = spec
        self.backend = backend
        self.kv_cache = torch.tensor([])

    def get_attn_backend(self) -> "type[AttentionBackend]":
        return self.backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return self.spec


def build_specs(
    layout: PoolLayout, head_size: int, dtype: torch.dtype, sink: int, window: int
) -> tuple[Optional[FullAttentionSpec], Optional[RazorLocalSpec]]:
    """The pools' specs; pages are equal in size when both exist (see layout.py)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    token_bytes = 2 * head_size * elem
    retrieval = local = None
    if layout.has_retrieval_pool:
        retrieval = FullAttentionSpec(
            block_size=layout.retrieval_block_size,
            num_kv_heads=layout.retrieval_pool_heads,
            head_size=head_size,
            dtype=dtype,
        )
    if layout.has_local_pool:
        local = RazorLocalSpec(
            block_size=layout.local_block_size,
            num_kv_heads=layout.local_pool_heads,
            head_size=head_size,
            dtype=dtype,
            sliding_window=window,
            sink=sink,
            page_size_padded=layout.local_pool_heads * (layout.local_block_size + layout.tail_slots) * token_bytes,
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
    A block counts once however many requests hold it (razor switches prefix caching off, so none
    are shared), and the null block that replaces freed window blocks does not count. ``tokens``
    are the computed tokens of each request holding blocks (to compare with stock vLLM's paging).
    """
    manager = scheduler.kv_cache_manager
    in_use: dict[str, int] = {}
    holders: set[str] = set()
    for group, single_type in zip(scheduler.kv_cache_config.kv_cache_groups, manager.coordinator.single_type_managers):
        label = next((pool_label(name) for name in group.layer_names if pool_label(name)), None)
        if label is None:
            continue
        ids = set()
        for request_id, blocks in single_type.req_to_blocks.items():
            held = {block.block_id for block in blocks if not block.is_null}
            if held:
                holders.add(request_id)
                ids |= held
        in_use[label] = len(ids)
    if not in_use:
        return None
    return {
        "blocks_in_use": in_use,
        "num_blocks": int(scheduler.kv_cache_config.num_blocks),
        "free_blocks": int(manager.block_pool.get_num_free_blocks()),
        "tokens": sorted(scheduler.requests[r].num_computed_tokens for r in holders if r in scheduler.requests),
    }

"""The RAZOR attention backend: retrieval heads over a full paged pool, local heads over sinks +
a recent window + one compensation token in a bounded pool.

Read top to bottom in the order data flows: the Backend (capabilities), the per-pool Metadata and
its Builder (once per step and pool), and the Impl (per layer: write this step's K/V into both
pools, attend, fold tokens leaving the window into the compensation sums). Kernels live in
``razor_vllm.ops``. How the pools are laid out and registered with vLLM: ``pools.py``,
``install.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from razor_vllm import ops
from razor_vllm.ops.cache import SlotIndex, write_kv

if TYPE_CHECKING:
    from razor_vllm.install import LayerRazorState


class RazorAttentionBackend(AttentionBackend):
    # The impl writes K/V itself: one layer writes into two pools at different slots.
    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "bfloat16", "float16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "RAZOR"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # Our kernels take any block size; never split vLLM's blocks.
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Kernels index pages as [block, head, token, 2*head_size].
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["RazorAttentionImpl"]:
        return RazorAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["RazorMetadataBuilder"]:
        return RazorMetadataBuilder


@dataclass
class RazorPoolMetadata:
    """One step's view of one pool: exactly what the kernels need."""

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, including this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, this pool's block ids
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64: this step's slots in this pool, -1 = padding
    # The same slots as indices, built once per step for every layer's writes; None on GPU, where
    # ``ops.store_kv`` reads ``slot_mapping`` on the device (no host sync, CUDA-graph safe).
    slots: Optional[SlotIndex]


class RazorMetadataBuilder(AttentionMetadataBuilder[RazorPoolMetadata]):
    """Built once per step for each pool's KV group; every layer reads it.

    Full CUDA graphs of decode batches: every tensor here is a view of the runner's persistent
    buffers (already int32/int64, so ``.to`` copies nothing), the kernels size their grids from
    shapes alone and skip what vLLM pads with (requests without queries, seq_len 0, slot -1), and
    the impl allocates and indexes only on the device. Prefill stays piecewise.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> RazorPoolMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        slot_mapping = cm.slot_mapping[: cm.num_actual_tokens]
        block_size = self.kv_cache_spec.block_size
        return RazorPoolMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc[: num_reqs + 1].to(torch.int32),
            seq_lens=cm.seq_lens[:num_reqs].to(torch.int32),
            block_table=cm.block_table_tensor[:num_reqs].to(torch.int32),
            slot_mapping=slot_mapping,
            slots=None if slot_mapping.is_cuda else SlotIndex.from_slot_mapping(slot_mapping, block_size),
        )


class RazorAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: Optional[list[float]],
        sliding_window: Optional[int],
        kv_cache_dtype: str,
        logits_soft_cap: Optional[float] = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: Optional[str] = None,
        **extra,
    ) -> None:
        from razor_vllm.model_support import layer_reasons

        unsupported = layer_reasons(
            alibi_slopes, sliding_window, logits_soft_cap, attn_type, kv_sharing_target_layer_name
        )
        if unsupported:
            raise NotImplementedError(f"RAZOR attention does not support {', '.join(unsupported)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Optional[RazorPoolMetadata],
        output: Optional[torch.Tensor] = None,
        output_scale: Optional[torch.Tensor] = None,
        output_block_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        assert output is not None, "RAZOR attention writes into the output buffer vLLM passes"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by RAZOR attention")
        if attn_metadata is None:
            return output  # profiling run: no KV cache yet
        state: LayerRazorState = layer.razor_state
        ctx = get_forward_context()
        num_tokens = attn_metadata.num_actual_tokens
        query, key, value = query[:num_tokens], key[:num_tokens], value[:num_tokens]
        out = output[:num_tokens]
        if state.retrieval.num_kv_heads:
            self._retrieval(state, ctx, query, key, value, out)
        if state.local.num_kv_heads:
            self._local(state, ctx, query, key, value, out)
        return output

    def _pool(self, ctx, name: str, heads, key: torch.Tensor, value: torch.Tensor):
        """This step's metadata and K/V caches of pool ``name``, with the layer's new K/V written in."""
        md: RazorPoolMetadata = ctx.attn_metadata[name]
        cache = ctx.no_compile_layers[name].kv_cache
        key_cache, value_cache = cache[..., : self.head_size], cache[..., self.head_size :]
        key, value = heads.select_kv(key), heads.select_kv(value)
        if md.slots is None:
            ops.store_kv(key_cache, value_cache, key, value, md.slot_mapping, heads.offset)
        else:
            write_kv(key_cache, value_cache, key, value, md.slots, heads.offset)
        return md, cache, key_cache, value_cache

    def _retrieval(self, state, ctx, query, key, value, out) -> None:
        heads = state.retrieval
        md, _, key_cache, value_cache = self._pool(ctx, state.retrieval_pool, heads, key, value)
        out_heads = ops.paged_attention(
            heads.select_q(query),
            key_cache,
            value_cache,
            md.block_table,
            md.seq_lens,
            md.query_start_loc,
            heads.offset,
            heads.num_kv_heads,
            self.scale,
        )
        heads.scatter_q(out, out_heads)

    def _local(self, state, ctx, query, key, value, out) -> None:
        heads = state.local
        md, cache, key_cache, value_cache = self._pool(ctx, state.local_pool, heads, key, value)
        comp = state.compensation(cache)
        out_heads = ops.local_attention(
            heads.select_q(query),
            key_cache,
            value_cache,
            comp,
            md.block_table,
            md.seq_lens,
            md.query_start_loc,
            heads.offset,
            heads.num_kv_heads,
            state.sink,
            state.window,
            self.scale,
            compensation=state.use_compensation,
        )
        heads.scatter_q(out, out_heads)
        if not state.use_compensation:
            return
        # Fold the tokens that leave the window for the next step now: the scheduler may hand
        # their blocks to another request before that step runs.
        ops.fold_compensation(
            key_cache,
            value_cache,
            comp,
            md.block_table,
            md.seq_lens,
            md.query_start_loc,
            heads.offset,
            heads.num_kv_heads,
            state.sink,
            state.window,
        )

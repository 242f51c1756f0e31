"""The RAZOR attention backend: retrieval heads over a full paged pool, local heads over sinks +
a recent window + one compensation token in a bounded pool.

Read top to bottom in the order data flows: the Backend (capabilities), the per-pool Metadata and
its Builder (once per step and pool), and the Impl (per layer: write this step's K/V into both
pools, write the tails of local blocks started this step, attend). Between the builder and
the impl: the state each model attention layer carries (its heads in each pool). Kernels live in
``razor_vllm.ops``. How the pools are laid out and registered with vLLM, and the layer states
attached: ``pools.py``, ``install.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

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

from razor_vllm import kv_dtypes, ops
from razor_vllm.geometry import LocalGeometry
from razor_vllm.layout import PoolLayout
from razor_vllm.model_support import layer_reasons
from razor_vllm.ops.api import LocalRule, PagedBatch, PoolHeads
from razor_vllm.ops.cache import SlotIndex, write_kv
from razor_vllm.pools import LOCAL_POOL_NAME, RETRIEVAL_POOL_NAME, RazorLocalSpec, compensation_view


class RazorAttentionBackend(AttentionBackend):
    # The impl writes K/V itself: one layer writes into two pools at different slots.
    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # Per platform (kv_dtypes.py): fp8 only where every kernel of both pools reads it.
    supported_kv_cache_dtypes: ClassVar[list[str]] = kv_dtypes.supported_kv_cache_dtypes()

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
    batch: PagedBatch  # the kernels' view of the step (the same tensors as above)


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
        # The local pool's rule; its kernels need each request's prompt length (exact prefill) and
        # window (the paper's window rule), kept in persistent device buffers (CUDA-graph replay).
        self.geometry: Optional[LocalGeometry] = (
            kv_cache_spec.geometry if isinstance(kv_cache_spec, RazorLocalSpec) else None
        )
        self._prompt_lens_source: Optional[Callable[[], torch.Tensor]] = None
        max_reqs = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", 0) or 0
        self._prompt_lens = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self._windows = torch.zeros(max_reqs, dtype=torch.int32, device=device)

    @property
    def needs_prompt_lengths(self) -> bool:
        geo = self.geometry
        return geo is not None and (geo.exact_prefill or geo.compression_ratio is not None)

    def bind_prompt_lengths(self, source: Callable[[], torch.Tensor]) -> None:
        """``source()`` returns the runner's host int32 prompt length per batch row (vllm_compat hook 9)."""
        self._prompt_lens_source = source

    def request_lengths(self, num_reqs: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """This step's per-request prompt lengths and windows on the device, as views of persistent
        buffers (``None`` where the rule needs none). Rows past the live requests (CUDA-graph
        padding) hold stale values; the kernels skip those rows (no queries)."""
        if not self.needs_prompt_lengths:
            return None, None
        if self._prompt_lens_source is None:
            raise RuntimeError(
                "razor: the local pool's metadata builder has no prompt lengths "
                "(vllm_compat.wrap_runner_builder_prompt_lengths did not run)"
            )
        if self._prompt_lens.shape[0] < num_reqs:  # only without a vllm_config (direct tests)
            self._prompt_lens = torch.zeros(num_reqs, dtype=torch.int32, device=self.device)
            self._windows = torch.zeros(num_reqs, dtype=torch.int32, device=self.device)
        host = self._prompt_lens_source()[:num_reqs]
        prompt_lens = self._prompt_lens[:num_reqs]
        prompt_lens.copy_(host, non_blocking=True)
        geo = self.geometry
        if geo.compression_ratio is None:
            return prompt_lens, None
        # max(S0, ceil(N / C)) on the host in float64, as geometry.request_window computes it.
        windows = torch.ceil(host.to(torch.float64) / geo.compression_ratio).clamp_(min=geo.window)
        self._windows[:num_reqs].copy_(windows.to(torch.int32))
        return prompt_lens, self._windows[:num_reqs]

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> RazorPoolMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        slot_mapping = cm.slot_mapping[: cm.num_actual_tokens]
        block_size = self.kv_cache_spec.block_size
        prompt_lens, windows = self.request_lengths(num_reqs)
        if self.geometry is None or not self.geometry.exact_prefill:
            prompt_lens = None  # only exact prefill reads them (the paper's window rule reads windows)
        query_start_loc = cm.query_start_loc[: num_reqs + 1].to(torch.int32)
        seq_lens = cm.seq_lens[:num_reqs].to(torch.int32)
        block_table = cm.block_table_tensor[:num_reqs].to(torch.int32)
        return RazorPoolMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=slot_mapping,
            slots=None if slot_mapping.is_cuda else SlotIndex.from_slot_mapping(slot_mapping, block_size),
            batch=PagedBatch(
                block_table=block_table,
                seq_lens=seq_lens,
                query_start_loc=query_start_loc,
                prompt_lens=prompt_lens,
                windows=windows,
                max_query_len=cm.max_query_len,
                max_seq_len=cm.max_seq_len,
            ),
        )


@dataclass
class LayerPoolHeads:
    """One layer's heads in one pool (its retrieval heads, or its local heads): which of the layer's
    KV and query heads, and where they sit in the pool."""

    kv_heads: tuple[int, ...]
    offset: int
    queries_per_kv: int
    kv_index: Optional[torch.Tensor] = field(default=None, repr=False)
    q_index: Optional[torch.Tensor] = field(default=None, repr=False)
    q_slice: Optional[slice] = None
    _device_indices: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, kv_heads: tuple[int, ...], offset: int, queries_per_kv: int) -> "LayerPoolHeads":
        sel = cls(kv_heads, offset, queries_per_kv)
        if kv_heads and kv_heads == tuple(range(kv_heads[0], kv_heads[-1] + 1)):
            # Contiguous heads: slices, no copies.
            sel.q_slice = slice(kv_heads[0] * queries_per_kv, (kv_heads[-1] + 1) * queries_per_kv)
        sel.kv_index = torch.tensor(kv_heads, dtype=torch.long)
        sel.q_index = torch.tensor(
            [h * queries_per_kv + j for h in kv_heads for j in range(queries_per_kv)], dtype=torch.long
        )
        return sel

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        """``kv_index`` or ``q_index`` on ``device``, copied there once: the first call is an eager
        warm-up step, so CUDA-graph capture never sees a host-to-device copy."""
        index = getattr(self, name)
        if index.device == device:
            return index
        on_device = self._device_indices.get((name, device))
        if on_device is None:
            on_device = self._device_indices[(name, device)] = index.to(device)
        return on_device

    def select_kv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_slice is not None:
            return x[:, self.kv_heads[0] : self.kv_heads[-1] + 1]
        return x.index_select(1, self._index("kv_index", x.device))

    def select_q(self, q: torch.Tensor) -> torch.Tensor:
        if self.q_slice is not None:
            return q[:, self.q_slice]
        return q.index_select(1, self._index("q_index", q.device))

    def scatter_q(self, out: torch.Tensor, heads_out: torch.Tensor) -> None:
        if self.q_slice is not None:
            out[:, self.q_slice] = heads_out
        else:
            out.index_copy_(1, self._index("q_index", out.device), heads_out.to(out.dtype))


@dataclass
class LayerRazorState:
    """What one model attention layer needs at run time; ``install.install_pools`` attaches it as
    ``layer.razor_state``."""

    retrieval: LayerPoolHeads
    local: LayerPoolHeads
    sink: int
    window: int
    layout: PoolLayout
    use_compensation: bool  # False: the no-compensation ablation
    head_size: int
    exact_prefill: bool = True  # prompt queries attend to the whole prompt (the paper)
    # The pool layers this layer reads (forward-context names): each pipeline stage has its own.
    retrieval_pool: str = RETRIEVAL_POOL_NAME
    local_pool: str = LOCAL_POOL_NAME
    _comp_cache: dict = field(default_factory=dict, repr=False)

    def compensation(self, local_cache: torch.Tensor) -> torch.Tensor:
        """fp32 compensation-sum view of the local pool (built once per bound cache tensor)."""
        key = (local_cache.data_ptr(), tuple(local_cache.shape))
        view = self._comp_cache.get(key)
        if view is None:
            self._comp_cache.clear()
            view = self._comp_cache[key] = compensation_view(local_cache, self.layout, self.head_size)
        return view


@functools.cache
def _local_rule(sink: int, window: int, compensation: bool, exact_prefill: bool) -> LocalRule:
    # Exact prefill: the builder puts each request's prompt length in the batch, and the local
    # pool's manager keeps every prompt block until the prompt is done (pools.RazorLocalManager).
    return LocalRule(sink=sink, window=window, compensation=compensation, exact_prefill=exact_prefill)


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
        # fp8 caches (kv_dtypes.py): vLLM's per-layer per-tensor scales, read on the device.
        scales = (layer._k_scale, layer._v_scale) if self.kv_cache_dtype in kv_dtypes.FP8_TORCH_DTYPES else None
        if state.retrieval.num_kv_heads:
            self._retrieval(state, ctx, query, key, value, out, scales)
        if state.local.num_kv_heads:
            self._local(state, ctx, query, key, value, out, scales)
        return output

    def _pool(self, ctx, name: str, heads, key: torch.Tensor, value: torch.Tensor, scales):
        """This step's metadata and K/V caches of pool ``name`` (float8 views of an fp8 cache), with the
        layer's new K/V written in."""
        md: RazorPoolMetadata = ctx.attn_metadata[name]
        cache = ctx.no_compile_layers[name].kv_cache
        kv = kv_dtypes.fp8_view(cache, self.kv_cache_dtype)
        key_cache, value_cache = kv[..., : self.head_size], kv[..., self.head_size :]
        key, value = heads.select_kv(key), heads.select_kv(value)
        pool_heads = PoolHeads(heads.offset, heads.num_kv_heads)
        if md.slots is None:
            ops.store_kv(key_cache, value_cache, key, value, md.slot_mapping, pool_heads, *(scales or ()))
        elif scales is not None:
            raise NotImplementedError("fp8 KV caches are served on CUDA only (razor_vllm/kv_dtypes.py)")
        else:
            write_kv(key_cache, value_cache, key, value, md.slots, heads.offset)
        return md, cache, key_cache, value_cache, pool_heads

    def _retrieval(self, state, ctx, query, key, value, out, scales) -> None:
        heads = state.retrieval
        md, _, key_cache, value_cache, pool_heads = self._pool(ctx, state.retrieval_pool, heads, key, value, scales)
        out_heads = ops.paged_attention(
            heads.select_q(query), key_cache, value_cache, md.batch, pool_heads, self.scale, *(scales or ())
        )
        heads.scatter_q(out, out_heads)

    def _local(self, state, ctx, query, key, value, out, scales) -> None:
        heads = state.local
        md, cache, key_cache, value_cache, pool_heads = self._pool(ctx, state.local_pool, heads, key, value, scales)
        tails = state.compensation(cache)
        rule = _local_rule(state.sink, state.window, state.use_compensation, state.exact_prefill)
        # Before attention: a chunk's later queries read the tails of blocks started in this chunk.
        ops.write_block_tails(key_cache, value_cache, tails, md.batch, pool_heads, rule, *(scales or ()))
        out_heads = ops.local_attention(
            heads.select_q(query),
            key_cache,
            value_cache,
            tails,
            md.batch,
            pool_heads,
            rule,
            self.scale,
            *(scales or ()),
        )
        heads.scatter_q(out, out_heads)

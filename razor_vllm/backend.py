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

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

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
from razor_vllm.ops.api import LayerPoolHeads, LocalRule, PagedBatch
from razor_vllm.pools import RazorLocalSpec, RazorPoolLayer


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
        windows = torch.tensor(geo.request_windows(host.tolist()), dtype=torch.int32)  # the paper's max(S0, N / C)
        self._windows[:num_reqs].copy_(windows)
        return prompt_lens, self._windows[:num_reqs]

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> RazorPoolMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        slot_mapping = cm.slot_mapping[: cm.num_actual_tokens]
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


@dataclass(frozen=True)
class LayerRazorState:
    """What one model attention layer needs at run time; ``install.install_pools`` attaches it as
    ``layer.razor_state``. Built once: the forward only reads it."""

    retrieval: LayerPoolHeads
    local: LayerPoolHeads
    rule: LocalRule  # the local heads' rule (sink, window, compensation, exact prefill)
    layout: PoolLayout
    # The pool layers this layer reads (each pipeline stage has its own); their ``views`` follow
    # the cache vLLM binds to them. None: no such pool on this rank.
    retrieval_pool: Optional[RazorPoolLayer]
    local_pool: Optional[RazorPoolLayer]


def layer_reasons(
    alibi_slopes: Any, sliding_window: Any, logits_soft_cap: Any, attn_type: str, kv_sharing_target_layer_name: Any
) -> list[str]:
    """What one attention layer asks of the impl that the razor kernels do not do (the model-level
    check, before any engine starts, is ``model_support.py``'s)."""
    reasons = []
    if alibi_slopes is not None:
        reasons.append("ALiBi")
    if sliding_window is not None:
        reasons.append("a model sliding window")
    if logits_soft_cap:
        reasons.append("logits soft-capping")
    if attn_type != AttentionType.DECODER:
        reasons.append(f"attention type {attn_type}")
    if kv_sharing_target_layer_name is not None:
        reasons.append("cross-layer KV sharing")
    return reasons


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
        metadata = get_forward_context().attn_metadata
        num_tokens = attn_metadata.num_actual_tokens
        out = output
        if query.shape[0] != num_tokens:  # padded batches (shapes only: fixed in a CUDA graph)
            query, key, value, out = query[:num_tokens], key[:num_tokens], value[:num_tokens], output[:num_tokens]
        # fp8 caches (kv_dtypes.py): vLLM's per-layer per-tensor scales, read on the device.
        scales = (layer._k_scale, layer._v_scale) if self.kv_cache_dtype in kv_dtypes.FP8_TORCH_DTYPES else ()
        if state.retrieval.num_kv_heads:
            self._retrieval(state, metadata, query, key, value, out, scales)
        if state.local.num_kv_heads:
            self._local(state, metadata, query, key, value, out, scales)
        return output

    def _retrieval(self, state, metadata, query, key, value, out, scales) -> None:
        heads, pool = state.retrieval, state.retrieval_pool
        md: RazorPoolMetadata = metadata[pool.layer_name]
        views = pool.views
        ops.retrieval_step(
            query,
            key,
            value,
            md.slot_mapping,
            out,
            views.key_cache,
            views.value_cache,
            md.batch,
            heads,
            self.scale,
            *scales,
        )

    def _local(self, state, metadata, query, key, value, out, scales) -> None:
        heads, pool = state.local, state.local_pool
        md: RazorPoolMetadata = metadata[pool.layer_name]
        views = pool.views
        ops.local_step(
            query,
            key,
            value,
            md.slot_mapping,
            out,
            views.key_cache,
            views.value_cache,
            views.tails,
            md.batch,
            heads,
            state.rule,
            self.scale,
            *scales,
        )

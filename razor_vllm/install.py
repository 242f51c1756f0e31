"""Turning a model built with ``--attention-backend razor`` into one served from two pools.

Runs in each worker right before the runner collects KV-cache specs: resolves the profile for
this model and rank, plans the pool layout, registers the two pool layers, points every model
attention layer at them, and logs one summary line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention

from razor_vllm.balance import ScaleoutPlan, plan_for_resolved
from razor_vllm.config import ModelFingerprint
from razor_vllm.geometry import PoolGeometry
from razor_vllm.layout import PoolLayout, plan_layout
from razor_vllm.options import ResolvedRazorConfig, resolve_for_vllm_config
from razor_vllm.pools import (
    LOCAL_POOL_NAME,
    RETRIEVAL_POOL_NAME,
    RazorPoolLayer,
    build_specs,
    compensation_view,
    pool_names,
)

logger = init_logger("vllm." + __name__)  # under "vllm" so it shares vLLM's log handlers


@dataclass
class HeadSelection:
    """One layer's heads of one kind: which KV/query heads, and where they sit in the pool."""

    kv_heads: tuple[int, ...]
    offset: int
    queries_per_kv: int
    kv_index: Optional[torch.Tensor] = field(default=None, repr=False)
    q_index: Optional[torch.Tensor] = field(default=None, repr=False)
    q_slice: Optional[slice] = None
    _device_indices: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, kv_heads: tuple[int, ...], offset: int, queries_per_kv: int) -> "HeadSelection":
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
    """What one model attention layer needs at run time (attached as ``layer.razor_state``)."""

    retrieval: HeadSelection
    local: HeadSelection
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


def razor_layers(vllm_config: VllmConfig) -> dict[str, Attention]:
    from razor_vllm.backend import RazorAttentionBackend

    context = vllm_config.compilation_config.static_forward_context
    return {
        name: layer
        for name, layer in context.items()
        if isinstance(layer, Attention) and issubclass(layer.get_attn_backend(), RazorAttentionBackend)
    }


def install_pools(vllm_config: VllmConfig) -> Optional[PoolLayout]:
    """Idempotent; returns the layout, or None when no layer uses RAZOR."""
    from razor_vllm.backend import RazorAttentionBackend

    context = vllm_config.compilation_config.static_forward_context
    layers = razor_layers(vllm_config)
    if not layers:
        return None
    existing = [layer.razor_state.layout for layer in layers.values() if hasattr(layer, "razor_state")]
    if existing:
        return existing[0]

    resolved = resolve_for_vllm_config(vllm_config)
    names = sorted(layers, key=_layer_index)
    first = layers[names[0]]
    served = ModelFingerprint.from_hf_config(vllm_config.model_config.hf_config)
    tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    pp_group = get_pp_group()
    stage, pp_size = pp_group.rank_in_group, pp_group.world_size
    # Every worker plans every rank of every stage from the profile alone, so all agree on one
    # pool shape (vLLM requires equal specs per layer name and equal pages; balance.py).
    plan = plan_for_resolved(resolved, served.num_kv_heads, tp_size, pp_size)
    mine = plan.rank(stage, tp_rank)
    indices = [_layer_index(name) for name in names]
    if indices != list(mine.layers):
        raise ValueError(
            f"razor found attention layers {indices[:3]}...{indices[-1:]} on pipeline stage {stage}, "
            f"expected layers {mine.layers[0]}-{mine.layers[-1]} of the profile's {served.num_layers}"
        )
    if first.num_kv_heads != mine.kv_heads:
        raise ValueError(
            f"razor expected {mine.kv_heads} KV heads per rank, the model's layers have {first.num_kv_heads}"
        )
    dtype = first.kv_cache_torch_dtype
    layout = plan_layout(
        mine.heads,
        mine.kv_heads,
        resolved.local_block_size,
        torch.tensor([], dtype=dtype).element_size(),
        default_block_size=vllm_config.cache_config.block_size,
        hash_aligned=bool(vllm_config.cache_config.enable_prefix_caching),
        pool_heads=plan.pool_heads,
    )
    retrieval_spec, local_spec = build_specs(
        layout,
        first.head_size,
        dtype,
        resolved.sink,
        resolved.window,
        exact_prefill=resolved.exact_prefill,
        compression_ratio=resolved.compression_ratio,
        max_model_len=vllm_config.model_config.max_model_len,
    )
    retrieval_name, local_name = pool_names(stage)
    if retrieval_spec is not None:
        context[retrieval_name] = RazorPoolLayer(retrieval_name, retrieval_spec, RazorAttentionBackend)
    if local_spec is not None:
        context[local_name] = RazorPoolLayer(local_name, local_spec, RazorAttentionBackend)
    share_target = local_name if local_spec is not None else retrieval_name

    for name, heads in zip(names, layout.layers):
        layer = layers[name]
        g = layer.num_heads // layer.num_kv_heads
        layer.razor_state = LayerRazorState(
            retrieval=HeadSelection.of(heads.retrieval, heads.retrieval_offset, g),
            local=HeadSelection.of(heads.local, heads.local_offset, g),
            sink=resolved.sink,
            window=resolved.window,
            layout=layout,
            use_compensation=resolved.compensation,
            head_size=layer.head_size,
            exact_prefill=resolved.exact_prefill,
            retrieval_pool=retrieval_name,
            local_pool=local_name,
        )
        # vLLM's cross-layer KV sharing: the runner allocates nothing for this layer, adds it to
        # the pool's KV group (so it receives that group's metadata) and binds it that pool.
        layer.kv_sharing_target_layer_name = share_target

    if tp_rank == 0:
        logger.info(summary_line(resolved, layout, retrieval_spec, local_spec, plan if plan.ranks[1:] else None))
    return layout


def summary_line(
    resolved: ResolvedRazorConfig, layout: PoolLayout, retrieval_spec, local_spec, plan: Optional[ScaleoutPlan] = None
) -> str:
    total = layout.num_retrieval_heads + layout.num_local_heads
    parts = [
        f"RAZOR: profile {resolved.profile_source}",
        f"{layout.num_retrieval_heads}/{total} KV heads retrieval ({100 * layout.num_retrieval_heads / total:.1f}%)",
        f"sink={resolved.sink} window={resolved.window}",
    ]
    if resolved.compression_ratio is not None:
        parts.append(f"window rule max(window, N/{resolved.compression_ratio:g})")
    parts.append("prefill exact" if resolved.exact_prefill else "prefill compressed")
    if plan is not None:
        parts.append(f"retrieval heads per rank {plan.describe()}")
    if not resolved.compensation:
        parts.append("compensation off")
    spec = local_spec if local_spec is not None else retrieval_spec
    pool = PoolGeometry.for_resolved(layout, spec.head_size, spec.dtype.itemsize, resolved)
    if retrieval_spec is not None:
        parts.append(f"retrieval pool {pool.retrieval_bytes_per_token} B/token (block {layout.retrieval_block_size})")
    if local_spec is not None:
        held = pool.local.held_blocks(local_spec.sliding_window) * layout.local_block_size
        per_token = int(pool.local_bytes_per_token)  # whole bytes, as /razor/status reports them
        text = f"local pool {per_token} B/token for at most {held} token slots per request after its prompt"
        if resolved.exact_prefill:
            text += " (every prompt block while it prefills)"
        parts.append(text + f" (block {layout.local_block_size})")
    return ", ".join(parts)


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)

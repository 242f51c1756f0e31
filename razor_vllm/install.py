"""Turning a model built with ``--attention-backend razor`` into one served from two pools.

Runs in each worker right before the runner collects KV-cache specs: resolves the profile for
this model and rank, plans the pool layout, registers the two pool layers, points every model
attention layer at them, and logs one summary line.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention

from razor_vllm.backend import LayerRazorState, RazorAttentionBackend
from razor_vllm.balance import ScaleoutPlan, plan_for_resolved
from razor_vllm.config import ModelFingerprint
from razor_vllm.geometry import PoolGeometry
from razor_vllm.layout import PoolLayout
from razor_vllm.ops.api import LayerPoolHeads, LocalRule
from razor_vllm.options import ResolvedRazorConfig, resolve_for_vllm_config
from razor_vllm.pools import RazorPoolLayer, build_specs, pool_names

logger = init_logger("vllm." + __name__)  # under "vllm" so it shares vLLM's log handlers


def razor_layers(vllm_config: VllmConfig) -> dict[str, Attention]:
    context = vllm_config.compilation_config.static_forward_context
    return {
        name: layer
        for name, layer in context.items()
        if isinstance(layer, Attention) and issubclass(layer.get_attn_backend(), RazorAttentionBackend)
    }


def install_pools(vllm_config: VllmConfig, device: Union[torch.device, str, None] = None) -> Optional[PoolLayout]:
    """Idempotent; returns the layout, or None when no layer uses RAZOR.

    ``device``: the runner's device, where the layers' head index tensors are made (default: the
    device vLLM's config names)."""
    context = vllm_config.compilation_config.static_forward_context
    layers = razor_layers(vllm_config)
    if not layers:
        return None
    existing = [layer.razor_state.layout for layer in layers.values() if hasattr(layer, "razor_state")]
    if existing:
        return existing[0]

    resolved = resolve_for_vllm_config(vllm_config)
    if device is None:
        device = getattr(vllm_config.device_config, "device", None) or "cpu"
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
    layout = plan.rank_layout(
        mine,
        resolved.local_block_size,
        torch.tensor([], dtype=dtype).element_size(),
        default_block_size=vllm_config.cache_config.block_size,
        hash_aligned=bool(vllm_config.cache_config.enable_prefix_caching),
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
    cache_dtype = vllm_config.cache_config.cache_dtype
    retrieval_pool = local_pool = None
    if retrieval_spec is not None:
        retrieval_pool = RazorPoolLayer(retrieval_name, retrieval_spec, RazorAttentionBackend, layout, cache_dtype)
        context[retrieval_name] = retrieval_pool
    if local_spec is not None:
        local_pool = RazorPoolLayer(local_name, local_spec, RazorAttentionBackend, layout, cache_dtype)
        context[local_name] = local_pool
    share_target = local_name if local_spec is not None else retrieval_name
    rule = LocalRule(
        sink=resolved.sink,
        window=resolved.window,
        compensation=resolved.compensation,
        exact_prefill=resolved.exact_prefill,
    )

    for name, heads in zip(names, layout.layers):
        layer = layers[name]
        g = layer.num_heads // layer.num_kv_heads
        layer.razor_state = LayerRazorState(
            retrieval=LayerPoolHeads.of(heads.retrieval, heads.retrieval_offset, g, layer.num_kv_heads, device),
            local=LayerPoolHeads.of(heads.local, heads.local_offset, g, layer.num_kv_heads, device),
            rule=rule,
            layout=layout,
            retrieval_pool=retrieval_pool,
            local_pool=local_pool,
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

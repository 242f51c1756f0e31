"""Which models razor can serve, decided from vLLM's ``ModelConfig`` before any engine starts.

Razor splits a decoder's per-head K/V cache into retrieval heads (full cache) and local heads
(sinks + window + compensation). Models without such a cache, or whose attention the razor kernels
do not implement, are refused in the API process (``vllm_compat.prepare_razor_config``, before the
profile is looked up) with one message naming every problem, instead of failing in a worker while
the model is built. The backend class's declared capabilities (attention types, MLA, sliding
window, dtypes) decide where it declares them; the rest mirrors what ``RazorAttentionImpl.__init__``
refuses (ALiBi, logit soft-capping, cross-layer KV sharing).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backend import AttentionType

# vLLM's ModelConfig.attn_type -> (the layers' AttentionType, if any; why razor cannot serve it).
_MODEL_ATTENTION_KINDS = {
    "encoder_only": (
        AttentionType.ENCODER_ONLY,
        "it uses encoder-only (bidirectional) attention; razor compresses the cache of causal decoder attention",
    ),
    "encoder_decoder": (
        AttentionType.ENCODER_DECODER,
        "it is an encoder-decoder model (its decoder cross-attends to the encoder); razor serves decoder-only models",
    ),
    "attention_free": (None, "it has no attention layers (state-space/recurrent), so no KV cache to compress"),
    "hybrid": (
        None,
        "it mixes attention with state-space/linear-attention layers; razor needs every layer to be attention",
    ),
}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def unsupported_reasons(vllm_config: Any) -> list[str]:
    """Every reason razor cannot serve ``vllm_config``'s model; empty when it can."""
    from razor_vllm.backend import RazorAttentionBackend as backend

    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    reasons: list[str] = []

    kind = model_config.attn_type
    if kind != "decoder":
        attn_type, why = _MODEL_ATTENTION_KINDS.get(kind, (None, f"its attention is of kind {kind!r}"))
        if attn_type is None or not backend.supports_attn_type(attn_type):
            reasons.append(why)
    if model_config.use_mla and not backend.is_mla():
        reasons.append(
            "it uses multi-head latent attention (MLA, DeepSeek-V2/V3 style): its cache holds one compressed "
            "latent per token, not per-head K/V, so there are no KV heads to split into retrieval and local heads"
        )
    from razor_vllm.config import position_encoding_of

    # vLLM's own test misses configs that say ALiBi only through their family's convention
    # (Baichuan-13B: no max_position_embeddings); ours reads those too (config.position_encoding_of).
    if model_config.uses_alibi or position_encoding_of(text_config) == "alibi":
        reasons.append("it adds ALiBi position biases, which the razor kernels do not apply")
    window = model_config.get_sliding_window()
    if window is not None and not backend.supports_sliding_window():
        reasons.append(
            f"it has a sliding attention window of its own ({window} tokens; --disable-sliding-window serves it "
            "with full attention, max_model_len capped at the window)"
        )
    if getattr(text_config, "dual_chunk_attention_config", None):
        reasons.append(
            "it uses dual chunk attention (dual_chunk_attention_config, e.g. Qwen2.5-*-Instruct-1M): its chunked "
            "RoPE and attention are not what the razor kernels compute"
        )
    if getattr(text_config, "attn_logit_softcapping", None):
        reasons.append("it soft-caps attention logits, which the razor kernels do not do")
    if getattr(text_config, "num_kv_shared_layers", 0):
        reasons.append("it shares KV caches across layers (num_kv_shared_layers), which razor's pools already do")
    if model_config.dtype not in backend.supported_dtypes:
        supported = ", ".join(_dtype_name(d) for d in backend.supported_dtypes)
        reasons.append(f"dtype {_dtype_name(model_config.dtype)} is not supported (razor: {supported})")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in backend.supported_kv_cache_dtypes:
        supported = ", ".join(backend.supported_kv_cache_dtypes)
        reasons.append(f"--kv-cache-dtype {cache_dtype} is not supported (razor: {supported})")
    return reasons


def check_servable(vllm_config: Any) -> None:
    """Raise ``ValueError`` naming the model and every reason razor cannot serve it."""
    reasons = unsupported_reasons(vllm_config)
    if reasons:
        model_config = vllm_config.model_config
        archs = ", ".join(model_config.architectures or []) or type(model_config.hf_config).__name__
        raise ValueError(f"RAZOR attention cannot serve {model_config.model} ({archs}): " + "; ".join(reasons))

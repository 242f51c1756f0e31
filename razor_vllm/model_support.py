"""What razor can serve: the one capability check, decided before any engine process starts.

Razor splits a decoder's per-head K/V cache into retrieval heads (full cache) and local heads
(sinks + window + compensation). What razor refuses for a model or an engine is decided here, and
the two places vLLM gives us a say before any engine process call in:

- ``check_servable`` (from ``vllm_compat.prepare_razor_config``, in the API process before the
  profile is looked up): the model (MLA, encoder-only, ALiBi, ...) and engine features whose
  semantics the pools would silently break (speculative decoding, KV connectors and offloading,
  sleep mode, context parallelism, ...), each reason naming its option, all in one message;
- ``selector_reasons`` (vLLM's backend selection, ``vllm_compat._select_backend``).

The backend class's declared capabilities (attention types, MLA, sliding window, dtypes, KV-cache
dtypes) decide where it declares them, so a backend that gains a capability (e.g. fp8 KV caches on
GPU) is served without editing this module. The dependency runs one way, this module reads
``backend.py``: the impl's own per-layer refusal (``backend.layer_reasons``, for models built
outside vLLM's selection path) sits with the impl, as in vLLM's backends.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backend import AttentionType

from razor_vllm.backend import RazorAttentionBackend

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
    backend = RazorAttentionBackend
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


def engine_feature_reasons(vllm_config: Any) -> list[str]:
    """Engine features razor's pools cannot serve faithfully, each naming the option that turns it on."""
    reasons: list[str] = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        reasons.append(
            "--speculative-config: the local heads fold tokens leaving the window into the compensation sums as "
            "soon as they are written, so draft tokens that vLLM rejects and rewinds would stay in the sums"
        )
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        reasons.append(
            "--kv-transfer-config: KV connectors copy each model layer's cache by layer name; razor's layers own "
            "no cache (their K/V live in two shared pools with a local window and compensation sums)"
        )
    cache_config = vllm_config.cache_config
    if getattr(cache_config, "kv_offloading_size", None):
        reasons.append(
            "--kv-offloading-size: KV offloading swaps whole blocks in and out by prefix; the local pool's blocks "
            "hold a sliding window and its first block the compensation sums"
        )
    if getattr(cache_config, "kv_sharing_fast_prefill", False):
        reasons.append(
            "--kv-sharing-fast-prefill: it drops prefill tokens from the metadata of KV-sharing layers, and every "
            "razor layer is one (it shares a pool)"
        )
    if getattr(vllm_config.model_config, "enable_sleep_mode", False):
        reasons.append(
            "--enable-sleep-mode: sleep discards the KV cache, including the compensation sums of running "
            "requests that the local heads cannot rebuild"
        )
    parallel = vllm_config.parallel_config
    for option, name in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        if getattr(parallel, option, 1) > 1:
            reasons.append(
                f"{name} > 1: context parallelism splits a sequence's KV cache across ranks; razor's window, sinks "
                "and compensation sums need each head's whole sequence on one rank"
            )
    if getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", False):
        reasons.append("--disable-hybrid-kv-cache-manager: razor's two pools are two KV cache groups")
    return reasons


def selector_reasons(attn_selector_config: Any) -> list[str]:
    """Why vLLM's attention selector may not pick razor for a layer (the backend's declared capabilities)."""
    reasons = RazorAttentionBackend.validate_configuration(device_capability=None, **attn_selector_config._asdict())
    return [r for r in reasons if r != "compute capability not supported"]  # razor runs on any device


def check_servable(vllm_config: Any) -> None:
    """Raise ``ValueError`` naming the model and every reason razor cannot serve it as configured."""
    reasons = unsupported_reasons(vllm_config) + engine_feature_reasons(vllm_config)
    if reasons:
        model_config = vllm_config.model_config
        archs = ", ".join(model_config.architectures or []) or type(model_config.hf_config).__name__
        raise ValueError(f"RAZOR attention cannot serve {model_config.model} ({archs}): " + "; ".join(reasons))

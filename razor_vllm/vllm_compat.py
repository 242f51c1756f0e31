"""Every place razor hooks into vLLM internals (pinned: vLLM 0.32.x). One function per hook.

Each hook names the vLLM code it depends on; tests/unit/test_vllm_compat.py exercises each one so
that a vLLM upgrade that moves any of them fails loudly instead of silently serving stock attention.
"""

from __future__ import annotations

import copyreg
import functools
from typing import Any, Optional

from vllm.logger import init_logger

logger = init_logger("vllm." + __name__)  # under "vllm" so it shares vLLM's log handlers

BACKEND_NAME = "RAZOR"
BACKEND_PATH = "razor_vllm.backend.RazorAttentionBackend"
_INSTALLED = False


def install() -> None:
    """Install all hooks once per process (vLLM calls plugins in every process it spawns)."""
    global _INSTALLED
    if _INSTALLED:
        return
    register_backend_name()
    install_enum_pickling()
    wrap_platform_backend_selection()
    wrap_platform_config_check()
    wrap_platform_kv_spec_registration()
    wrap_runner_kv_spec_collection()
    add_pool_usage_utility()
    wrap_runner_discarded_sample_rewind()
    wrap_runner_builder_prompt_lengths()
    wrap_max_concurrency()
    _INSTALLED = True


def razor_enum_member():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]


# -- 1. the backend name --------------------------------------------------------------------
# vllm/v1/attention/backends/registry.py: register_backend(name, path) adds an enum member;
# --attention-backend razor is looked up as AttentionBackendEnum["RAZOR"] (config/attention.py).


def register_backend_name() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)


# -- 2. pickling the new member across spawned processes ----------------------------------------
# The CPU platform spawns engine/worker processes and unpickles VllmConfig before plugins load
# there; an Enum member pickles by value, which the child cannot resolve. Pickle RAZOR as a call
# that registers it first. ForkingPickler copies copyreg.dispatch_table.


def _razor_member():
    register_backend_name()
    return razor_enum_member()


def _reduce_backend_enum(member):
    if member.name == BACKEND_NAME:
        return (_razor_member, ())
    return (type(member), (member._value_,))


def install_enum_pickling() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    copyreg.pickle(AttentionBackendEnum, _reduce_backend_enum)


# -- 3. backend selection on the platform ---------------------------------------------------------
# vllm/platforms/cpu.py CpuPlatform.get_attn_backend_cls ignores the selected backend for
# non-MLA models and returns CPU_ATTN. CUDA's honours a registered selection already but we route
# RAZOR through the same validation on every platform.


def _wrap_platform_classmethod(name: str, make_wrapper) -> None:
    """Replace ``current_platform``'s classmethod ``name`` by ``make_wrapper(original_function)``, once."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = getattr(platform_cls, name)
    if getattr(original, "__razor_wrapped__", False):
        return
    wrapper = functools.wraps(original.__func__)(make_wrapper(original.__func__))
    wrapper.__razor_wrapped__ = True
    setattr(platform_cls, name, classmethod(wrapper))


def wrap_platform_backend_selection() -> None:
    _wrap_platform_classmethod("get_attn_backend_cls", _select_backend)


def _select_backend(original_func):
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None, *args, **kwargs):
        if selected_backend is not None and getattr(selected_backend, "name", None) == BACKEND_NAME:
            from razor_vllm.model_support import selector_reasons

            reasons = selector_reasons(attn_selector_config)
            if reasons:
                raise ValueError(f"RAZOR attention cannot serve this model: {', '.join(reasons)}")
            return BACKEND_PATH
        return original_func(cls, selected_backend, attn_selector_config, num_heads, *args, **kwargs)

    return get_attn_backend_cls


# -- 4. engine configuration --------------------------------------------------------------------
# Platform.check_and_update_config runs in VllmConfig.__post_init__ in the API/LLM process before
# the config is shipped to the engine: refuse a model razor cannot serve or a bad profile there (a
# clear start-up error). Prefix caching stays as vLLM set it (on by default, engine/arg_utils.py):
# both pools are prefix-cacheable (pools.py). With a single pool (all heads local) vLLM hashes in
# cache_config.block_size (kv_cache_utils.resolve_kv_cache_block_sizes, one group) and the
# UnitaryKVCacheCoordinator asserts it equals the group's block size, so it becomes the local block.


def is_razor_config(vllm_config: Any) -> bool:
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return getattr(backend, "name", None) == BACKEND_NAME


def wrap_platform_config_check() -> None:
    def make(original_func):
        def check_and_update_config(cls, vllm_config, *args, **kwargs):
            result = original_func(cls, vllm_config, *args, **kwargs)
            if is_razor_config(vllm_config) and vllm_config.model_config is not None:
                prepare_razor_config(vllm_config)
            return result

        return check_and_update_config

    _wrap_platform_classmethod("check_and_update_config", make)


def prepare_razor_config(vllm_config: Any) -> None:
    from razor_vllm.model_support import check_servable
    from razor_vllm.options import resolve_for_vllm_config

    check_servable(vllm_config)  # the model and engine features (model_support.py), before looking for its profile
    resolved = resolve_for_vllm_config(vllm_config)  # raises ProfileError/ValueError naming the problem
    if vllm_config.lora_config is not None:
        # LoRA adapts the q/k/v projections, not attention itself: served, but the head profile was
        # measured on the base weights.
        logger.info("RAZOR: LoRA adapters are served with the base model's head profile.")
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching and not resolved.exact_prefill and resolved.compression_ratio is not None:
        # Compressed prefill under the paper's window rule: a position's K/V depend on the window of
        # the request that computed it, max(S0, N/C), i.e. on that request's prompt length, which
        # vLLM's block hashes do not see. (Exact prefill computes prompt positions exactly.)
        logger.info("RAZOR: prefix caching switched off (compressed prefill with the paper's window rule).")
        cache_config.enable_prefix_caching = False
    if cache_config.enable_prefix_caching and not any(resolved.retrieval_heads):
        cache_config.block_size = resolved.local_block_size  # one pool: vLLM hashes in its block size


# -- 5. the pools' block managers ------------------------------------------------------------------
# vllm/v1/core/single_type_kv_cache_manager.py register_all_kvcache_specs registers built-in specs
# and then calls current_platform.register_custom_kv_cache_specs; registering earlier would make
# KVCacheSpecRegistry skip the built-ins.


def wrap_platform_kv_spec_registration() -> None:
    def make(original_func):
        def register_custom_kv_cache_specs(cls, vllm_config, *args, **kwargs):
            original_func(cls, vllm_config, *args, **kwargs)
            register_razor_specs()

        return register_custom_kv_cache_specs

    _wrap_platform_classmethod("register_custom_kv_cache_specs", make)


def register_razor_specs() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from razor_vllm.pools import RazorLocalManager, RazorLocalSpec, RazorRetrievalManager, RazorRetrievalSpec

    KVCacheSpecRegistry.register(RazorLocalSpec, RazorLocalManager, uniform_type_base_spec=SlidingWindowSpec)
    KVCacheSpecRegistry.register(RazorRetrievalSpec, RazorRetrievalManager, uniform_type_base_spec=FullAttentionSpec)


# -- 6. building the pools before the runner collects KV specs ----------------------------------------
# vllm/v1/worker/gpu_model_runner.py GPUModelRunner.get_kv_cache_spec (inherited by CPUModelRunner)
# walks static_forward_context; the pools must be registered and the model's layers marked as
# KV-sharing layers of a pool before that walk. The runner's ``device`` (GPUModelRunner.__init__,
# CPUModelRunner) is where the layers' head index tensors are made.


def wrap_runner_kv_spec_collection() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.get_kv_cache_spec
    if getattr(original, "__razor_wrapped__", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, *args, **kwargs):
        if is_razor_config(self.vllm_config):
            from razor_vllm.install import install_pools

            install_pools(self.vllm_config, self.device)
        return original(self, *args, **kwargs)

    get_kv_cache_spec.__razor_wrapped__ = True
    GPUModelRunner.get_kv_cache_spec = get_kv_cache_spec


# -- 7. pool usage, from the engine core to the API server ------------------------------------------
# The KV block pool lives in the engine core's scheduler, out of reach of the API server (and of
# the workers that `collective_rpc` reaches). vllm/v1/engine/core.py EngineCoreProc answers a
# UTILITY request by calling getattr(engine_core, name)(*args) between steps, and the API process
# sends one with its core client's call_utility_all_async (vllm/v1/engine/core_client.py), as
# AsyncLLM does for its own is_sleeping, list_loras, ... We add one read-only method.

POOL_USAGE_UTILITY = "razor_pool_usage"


def _engine_pool_usage(engine_core) -> Optional[dict[str, Any]]:
    from razor_vllm.pools import pool_usage

    return pool_usage(engine_core.scheduler)


def add_pool_usage_utility() -> None:
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, POOL_USAGE_UTILITY):
        setattr(EngineCore, POOL_USAGE_UTILITY, _engine_pool_usage)


async def query_pool_usage(engine_client: Any) -> Optional[dict[str, Any]]:
    """``pools.pool_usage`` of every engine core behind ``engine_client`` (an ``AsyncLLM``), combined.

    ``None`` when the engines serve no razor pools or the client cannot reach them. With data
    parallelism each engine core has its own scheduler and block pool: see ``combine_pool_usage``.
    """
    core = getattr(engine_client, "engine_core", None)
    if core is None or not hasattr(core, "call_utility_all_async"):
        return None
    return combine_pool_usage(await core.call_utility_all_async(POOL_USAGE_UTILITY))


def combine_pool_usage(results: list[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Sums over engine cores, and each core's own figures under ``engines`` (in the client's
    engine order, which is the data-parallel rank: ``core_client.MPClient.core_engines``)."""
    engines = [dict(r, engine=i) for i, r in enumerate(results) if r is not None]
    if not engines:
        return None
    blocks: dict[str, int] = {}
    shared: dict[str, int] = {}
    hits: dict[str, dict[str, int]] = {}
    for r in engines:
        for pool, n in r["blocks_in_use"].items():
            blocks[pool] = blocks.get(pool, 0) + n
        for pool, n in r.get("shared_blocks", {}).items():
            shared[pool] = shared.get(pool, 0) + n
        for pool, counts in r.get("prefix_cache_hits", {}).items():
            total = hits.setdefault(pool, {})
            for key, n in counts.items():
                total[key] = total.get(key, 0) + n
    return {
        "blocks_in_use": blocks,
        "shared_blocks": shared,
        "prefix_cache_hits": hits,
        "num_blocks": sum(r["num_blocks"] for r in engines),
        "free_blocks": sum(r["free_blocks"] for r in engines),
        "tokens": sorted(t for r in engines for t in r["tokens"]),
        "engines": engines,
    }


# -- 8. seeded sampling while a prompt is prefilled in chunks, on CPU ------------------------------------
# vllm/v1/worker/gpu_model_runner.py GPUModelRunner._bookkeeping_sync (the CPU runner inherits it)
# undoes the random draw of each request whose sampled token is discarded (a prompt chunk that is
# not the last) with gen.set_offset(gen.get_offset() - 4), which only Philox (CUDA) generators
# have: a CPU torch.Generator raises "CPU Generator does not use offset" and the engine core dies
# (stock vLLM 0.32 too; only requests with a `seed` have a generator). With razor, _sample saves
# those CPU generators' state and _bookkeeping_sync restores it instead: the same rewind, so a
# seeded request samples the same tokens however its prompt was chunked.

_SAVED_RNG_STATES = "_razor_saved_rng_states"


def _discarded_cpu_generators(runner) -> dict[int, Any]:
    batch = runner.input_batch
    if not batch.generators:  # no seeded request in the batch
        return {}
    discarded = runner.discard_request_mask.np[: batch.num_reqs]
    return {
        i: gen
        for i, gen in batch.generators.items()
        if i < len(discarded) and discarded[i] and gen.device.type == "cpu"
    }


def _wrap_runner_method(name: str, make_wrapper) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, name)
    if getattr(original, "__razor_wrapped__", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__razor_wrapped__ = True
    setattr(GPUModelRunner, name, wrapper)


def wrap_runner_discarded_sample_rewind() -> None:
    def make_sample(original):
        def _sample(self, *args, **kwargs):
            saved = None
            if is_razor_config(self.vllm_config):
                saved = {i: gen.get_state() for i, gen in _discarded_cpu_generators(self).items()}
            setattr(self, _SAVED_RNG_STATES, saved)
            return original(self, *args, **kwargs)

        return _sample

    def make_bookkeeping(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            saved = getattr(self, _SAVED_RNG_STATES, None)
            setattr(self, _SAVED_RNG_STATES, None)
            if not saved:
                return original(self, *args, **kwargs)
            generators = self.input_batch.generators
            rewound = {i: generators.pop(i) for i in saved}  # the original's offset rewind skips them
            for i, gen in rewound.items():
                gen.set_state(saved[i])
            try:
                return original(self, *args, **kwargs)
            finally:
                generators.update(rewound)

        return _bookkeeping_sync

    _wrap_runner_method("_sample", make_sample)
    _wrap_runner_method("_bookkeeping_sync", make_bookkeeping)


# -- 9. prompt lengths for the metadata builder ------------------------------------------------------
# Exact prefill needs each request's prompt length in the kernels (a query before it is a prompt
# query). CommonAttentionMetadata carries none (only ``rswa_prefix_lens`` when the model itself has
# an R-SWA window). vllm/v1/worker/gpu_model_runner.py GPUModelRunner.initialize_metadata_builders
# creates the builders (attn_groups[g][i].metadata_builders); the runner's InputBatch keeps
# ``num_prompt_tokens_cpu_tensor`` (vllm/v1/worker/gpu_input_batch.py, pinned int32, one row per
# batch row, the rows of CommonAttentionMetadata). After the builders exist we hand every razor
# builder a getter of that tensor (the runner may replace its InputBatch after creating builders,
# in may_reinitialize_input_batch, so the builder reads it through the runner on each step).


def bind_razor_builders(runner: Any) -> None:
    """Give every razor metadata builder of ``runner`` a getter of its prompt lengths per batch row."""
    from razor_vllm.backend import RazorMetadataBuilder

    for groups in runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                if isinstance(builder, RazorMetadataBuilder):
                    builder.bind_prompt_lengths(lambda: runner.input_batch.num_prompt_tokens_cpu_tensor)


def wrap_runner_builder_prompt_lengths() -> None:
    def make(original):
        def initialize_metadata_builders(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            bind_razor_builders(self)
            return result

        return initialize_metadata_builders

    _wrap_runner_method("initialize_metadata_builders", make)


# -- 10. vLLM's "Maximum concurrency" with exact prefill ---------------------------------------------
# vllm/v1/core/kv_cache_utils.py get_max_concurrency_for_kv_cache_config divides the block pool by
# the sum over groups of cdiv(spec.max_memory_usage_bytes, page): one figure per request. With exact
# prefill a request holds its whole prompt only while it prefills, so the peak (what the start-up
# check must see, RazorLocalSpec.max_memory_usage_bytes) is not what every held request costs. The
# truthful figure: every request holds its steady blocks, the one being admitted its prompt too
# (geometry.max_concurrency). get_kv_cache_capacity (same module) calls it by its module name, so
# the logged line and cache_config.kv_cache_max_concurrency use ours.


def razor_max_concurrency(vllm_config: Any, kv_cache_config: Any) -> Optional[float]:
    """The exact-prefill concurrency figure, or None when no group is a razor local pool in exact mode."""
    from vllm.utils.math_utils import cdiv

    from razor_vllm.geometry import max_concurrency
    from razor_vllm.pools import RazorLocalSpec

    max_len = vllm_config.model_config.max_model_len
    in_flight = vllm_config.max_in_flight_tokens
    steady = transient = 0
    exact = False
    for group in kv_cache_config.kv_cache_groups:
        if getattr(group, "host_resident", False):
            return None
        spec = group.kv_cache_spec
        inner = list(getattr(spec, "kv_cache_specs", {}).values()) or [spec]
        if isinstance(inner[0], RazorLocalSpec):
            geo = inner[0].geometry
            exact = exact or geo.exact_prefill
            held, extra = geo.logged_blocks(in_flight, max_len)
            steady += held
            transient += extra
        else:
            steady += cdiv(spec.max_memory_usage_bytes(vllm_config), spec.page_size_bytes)
    if not exact:
        return None
    return max_concurrency(kv_cache_config.num_blocks, steady, transient)


def wrap_max_concurrency() -> None:
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils.get_max_concurrency_for_kv_cache_config
    if getattr(original, "__razor_wrapped__", False):
        return

    @functools.wraps(original)
    def get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config):
        if is_razor_config(vllm_config):
            ours = razor_max_concurrency(vllm_config, kv_cache_config)
            if ours is not None:
                return ours
        return original(vllm_config, kv_cache_config)

    get_max_concurrency_for_kv_cache_config.__razor_wrapped__ = True
    kv_cache_utils.get_max_concurrency_for_kv_cache_config = get_max_concurrency_for_kv_cache_config

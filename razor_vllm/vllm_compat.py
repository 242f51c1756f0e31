"""Every place razor hooks into vLLM internals (pinned: vLLM 0.32.x). One function per hook.

Each hook names the vLLM code it depends on; tests/test_vllm_compat.py exercises each one so
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
# clear start-up error), and switch prefix caching off (the local pool's window and compensation
# are not prefix-cacheable).


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
    resolve_for_vllm_config(vllm_config)  # raises ProfileError/ValueError naming the problem
    if vllm_config.lora_config is not None:
        # LoRA adapts the q/k/v projections, not attention itself: served, but the head profile was
        # measured on the base weights.
        logger.info("RAZOR: LoRA adapters are served with the base model's head profile.")
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        logger.info("RAZOR: prefix caching switched off (local heads keep a window, not a prefix).")
        cache_config.enable_prefix_caching = False


# -- 5. the local pool's block manager ----------------------------------------------------------
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
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from razor_vllm.pools import RazorLocalManager, RazorLocalSpec

    KVCacheSpecRegistry.register(RazorLocalSpec, RazorLocalManager, uniform_type_base_spec=SlidingWindowSpec)


# -- 6. building the pools before the runner collects KV specs ----------------------------------------
# vllm/v1/worker/gpu_model_runner.py GPUModelRunner.get_kv_cache_spec (inherited by CPUModelRunner)
# walks static_forward_context; the pools must be registered and the model's layers marked as
# KV-sharing layers of a pool before that walk.


def wrap_runner_kv_spec_collection() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.get_kv_cache_spec
    if getattr(original, "__razor_wrapped__", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, *args, **kwargs):
        if is_razor_config(self.vllm_config):
            from razor_vllm.install import install_pools

            install_pools(self.vllm_config)
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
    for r in engines:
        for pool, n in r["blocks_in_use"].items():
            blocks[pool] = blocks.get(pool, 0) + n
    return {
        "blocks_in_use": blocks,
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

"""Every place razor hooks into vLLM internals (pinned: vLLM 0.32.x). One function per hook.

Each hook names the vLLM code it depends on; tests/test_vllm_compat.py exercises each one so
that a vLLM upgrade that moves any of them fails loudly instead of silently serving stock attention.
"""

from __future__ import annotations

import copyreg
import functools
from typing import Any

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
            from razor_vllm.backend import RazorAttentionBackend

            reasons = RazorAttentionBackend.validate_configuration(
                device_capability=None, **attn_selector_config._asdict()
            )
            reasons = [r for r in reasons if r != "compute capability not supported"]
            if reasons:
                raise ValueError(f"RAZOR attention cannot serve this model: {', '.join(reasons)}")
            return BACKEND_PATH
        return original_func(cls, selected_backend, attn_selector_config, num_heads, *args, **kwargs)

    return get_attn_backend_cls


# -- 4. engine configuration --------------------------------------------------------------------
# Platform.check_and_update_config runs in VllmConfig.__post_init__ in the API/LLM process before
# the config is shipped to the engine: refuse a bad profile there (a clear start-up error), and
# switch prefix caching off (the local pool's window and compensation are not prefix-cacheable).


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
    from razor_vllm.options import resolve_for_vllm_config

    resolve_for_vllm_config(vllm_config)  # raises ProfileError/ValueError naming the problem
    if getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", False):
        raise ValueError("RAZOR attention needs vLLM's hybrid KV cache manager; drop --disable-hybrid-kv-cache-manager")
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

"""Each hook into vLLM internals, exercised on the installed vLLM: an upgrade that moves one fails here."""

import pickle
import subprocess
import sys

import pytest
import torch

from razor_vllm import vllm_compat

vllm_compat.install()

from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.selector import AttentionSelectorConfig  # noqa: E402


def test_backend_name_registered_and_resolves_to_our_class():
    from razor_vllm.backend import RazorAttentionBackend

    member = AttentionBackendEnum["RAZOR"]
    assert member.get_class() is RazorAttentionBackend
    assert RazorAttentionBackend.get_name() == "RAZOR"
    # `--attention-backend razor` goes through the same validator as the CLI.
    from vllm.config.attention import AttentionConfig

    assert AttentionConfig(backend="razor").backend is member


def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("razor") == "razor_vllm.plugin:register"


def test_enum_member_unpickles_in_a_fresh_process():
    payload = pickle.dumps(AttentionBackendEnum["RAZOR"])
    child = subprocess.run(
        [sys.executable, "-c", "import pickle,sys; m = pickle.loads(sys.stdin.buffer.read()); print(m.name, m.value)"],
        input=payload,
        capture_output=True,
        timeout=600,  # importing vLLM takes minutes on a loaded 2-core machine
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    assert child.stdout.decode().split() == ["RAZOR", vllm_compat.BACKEND_PATH]
    # Built-in members still pickle by value.
    assert pickle.loads(pickle.dumps(AttentionBackendEnum.CPU_ATTN)) is AttentionBackendEnum.CPU_ATTN


def _selector(**kw):
    base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128)
    base.update(kw)
    return AttentionSelectorConfig(**base)


def test_platform_selects_razor_when_asked():
    path = type(current_platform).get_attn_backend_cls(AttentionBackendEnum["RAZOR"], _selector())
    assert path == vllm_compat.BACKEND_PATH


def test_platform_refuses_models_razor_cannot_serve():
    with pytest.raises(ValueError, match="RAZOR attention cannot serve this model: .*MLA"):
        type(current_platform).get_attn_backend_cls(AttentionBackendEnum["RAZOR"], _selector(use_mla=True))
    with pytest.raises(ValueError, match="attention type encoder_only"):
        type(current_platform).get_attn_backend_cls(AttentionBackendEnum["RAZOR"], _selector(attn_type="encoder_only"))


def test_platform_other_backends_unchanged():
    path = type(current_platform).get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, _selector())
    assert path != vllm_compat.BACKEND_PATH


def test_pool_specs_get_razor_managers_after_builtin_registration():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, register_all_kvcache_specs
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from razor_vllm.pools import RazorLocalManager, RazorLocalSpec, RazorRetrievalManager, RazorRetrievalSpec

    register_all_kvcache_specs(None)
    spec = RazorLocalSpec(block_size=32, num_kv_heads=4, head_size=64, dtype=torch.bfloat16, sliding_window=64, sink=4)
    assert KVCacheSpecRegistry.get_manager_class(spec) is RazorLocalManager
    retrieval = RazorRetrievalSpec(block_size=192, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    assert KVCacheSpecRegistry.get_manager_class(retrieval) is RazorRetrievalManager
    # Both pools hash prompts (the hybrid coordinator drops groups that are not prefix-cacheable).
    assert spec.prefix_cacheable and retrieval.prefix_cacheable
    full = FullAttentionSpec(block_size=32, num_kv_heads=4, head_size=64, dtype=torch.bfloat16)
    assert KVCacheSpecRegistry.get_manager_class(full) is FullAttentionManager  # built-ins intact


def test_runner_spec_collection_is_wrapped():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert getattr(GPUModelRunner.get_kv_cache_spec, "__razor_wrapped__", False)
    assert CPUModelRunner.get_kv_cache_spec is GPUModelRunner.get_kv_cache_spec


def test_engine_core_answers_pool_usage():
    """Hook 7: the utility the status route calls exists on the engine core and reads its scheduler."""
    from types import SimpleNamespace

    from vllm.v1.engine.core import EngineCore

    method = getattr(EngineCore, vllm_compat.POOL_USAGE_UTILITY)
    block = SimpleNamespace(block_id=3, is_null=False)
    stock_scheduler = SimpleNamespace(  # one stock KV group holding a block: not a razor pool
        kv_cache_config=SimpleNamespace(
            kv_cache_groups=[SimpleNamespace(layer_names=["model.layers.0.self_attn.attn"])]
        ),
        kv_cache_manager=SimpleNamespace(
            coordinator=SimpleNamespace(single_type_managers=[SimpleNamespace(req_to_blocks={"r": [block]})])
        ),
    )
    assert method(SimpleNamespace(scheduler=stock_scheduler)) is None  # an engine without razor pools reports nothing


def test_runner_sampling_rewind_is_wrapped():
    """Hook 8: both halves of the seeded-generator rewind are wrapped once, and the CPU runner uses them."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name in ("_sample", "_bookkeeping_sync"):
        wrapped = getattr(GPUModelRunner, name)
        assert getattr(wrapped, "__razor_wrapped__", False), name
        assert getattr(CPUModelRunner, name) is wrapped, name
    vllm_compat.wrap_runner_discarded_sample_rewind()  # again: no double wrapping
    assert not getattr(GPUModelRunner._sample.__wrapped__, "__razor_wrapped__", False)


def test_runner_hands_razor_builders_the_prompt_lengths():
    """Hook 9: after GPUModelRunner.initialize_metadata_builders, every razor builder reads the
    runner's InputBatch.num_prompt_tokens_cpu_tensor (through the runner, which may swap its batch)."""
    from types import SimpleNamespace

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from razor_vllm.backend import RazorMetadataBuilder
    from razor_vllm.pools import RazorLocalSpec

    wrapped = GPUModelRunner.initialize_metadata_builders
    assert getattr(wrapped, "__razor_wrapped__", False) and CPUModelRunner.initialize_metadata_builders is wrapped
    assert "num_prompt_tokens_cpu_tensor" in InputBatch.__init__.__code__.co_names  # the attribute we read
    spec = RazorLocalSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32, sliding_window=8, sink=4)
    builder = RazorMetadataBuilder(spec, [], None, torch.device("cpu"))
    other = SimpleNamespace()
    runner = SimpleNamespace(
        attn_groups=[[SimpleNamespace(metadata_builders=[builder, other])]],
        input_batch=SimpleNamespace(num_prompt_tokens_cpu_tensor=torch.tensor([7, 300, 0], dtype=torch.int32)),
    )
    vllm_compat.bind_razor_builders(runner)  # what the wrapper runs after the original
    prompt_lens, windows = builder.request_lengths(2)
    assert prompt_lens.tolist() == [7, 300] and windows is None
    runner.input_batch = SimpleNamespace(num_prompt_tokens_cpu_tensor=torch.tensor([5, 6], dtype=torch.int32))
    assert builder.request_lengths(2)[0].tolist() == [5, 6]


def test_max_concurrency_is_razors_with_exact_prefill():
    """Hook 10: vLLM's capacity figure (the "Maximum concurrency" line) comes from razor's geometry
    when the local pool prefills exactly, and from vLLM otherwise."""
    from types import SimpleNamespace

    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from razor_vllm.pools import RazorLocalSpec

    assert getattr(kv_cache_utils.get_max_concurrency_for_kv_cache_config, "__razor_wrapped__", False)
    config = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=1024),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        max_in_flight_tokens=64,
        attention_config=SimpleNamespace(backend=vllm_compat.razor_enum_member()),
    )
    full = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)

    def groups(exact):
        local = RazorLocalSpec(
            block_size=16,
            num_kv_heads=1,
            head_size=8,
            dtype=torch.float32,
            sliding_window=32,
            sink=4,
            exact_prefill=exact,
        )
        return SimpleNamespace(
            num_blocks=1000,
            kv_cache_groups=[
                SimpleNamespace(kv_cache_spec=full, host_resident=False),
                SimpleNamespace(kv_cache_spec=local, host_resident=False),
            ],
        )

    retrieval, cap = (
        1024 // 16,
        groups(False).kv_cache_groups[1].kv_cache_spec.max_admission_blocks_per_request(64, 1024),
    )
    got = kv_cache_utils.get_max_concurrency_for_kv_cache_config(config, groups(True))
    assert got == pytest.approx((1000 - (1024 // 16 - cap)) / (retrieval + cap))
    assert kv_cache_utils.get_max_concurrency_for_kv_cache_config(config, groups(False)) == pytest.approx(
        1000 / (retrieval + cap)
    )  # compressed: vLLM's own figure


def test_install_is_idempotent():
    before = type(current_platform).get_attn_backend_cls
    vllm_compat._INSTALLED = False
    vllm_compat.install()
    assert type(current_platform).get_attn_backend_cls.__func__ is before.__func__

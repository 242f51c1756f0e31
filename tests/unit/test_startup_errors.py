"""Bad razor input, or a model razor cannot serve, stops vLLM's start-up (config creation, before any
engine process) with a clear message.

vLLM re-raises errors from config validation as pydantic's ValidationError (a ValueError) carrying
our message, so the tests match on the message.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.default_model


def _create_config(model_dir, enable_prefix_caching=None, **razor):
    from vllm import EngineArgs

    args = EngineArgs(
        model=str(model_dir),
        attention_backend="razor",
        additional_config={"razor": razor},
        max_model_len=2048,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
        enable_prefix_caching=enable_prefix_caching,
    )
    return args.create_engine_config()


def test_bundled_profile_is_found_and_prefix_caching_left_as_vllm_sets_it(default_model_dir):
    config = _create_config(default_model_dir)
    assert config.attention_config.backend.name == "RAZOR"
    assert config.cache_config.enable_prefix_caching is True  # vLLM's default for this model
    assert config.cache_config.block_size == 128  # vLLM's CPU default: the retrieval pool plans around it
    off = _create_config(default_model_dir, enable_prefix_caching=False)
    assert off.cache_config.enable_prefix_caching is False
    # All heads local: one KV group, which vLLM hashes in cache_config.block_size -> the local block.
    streaming = _create_config(default_model_dir, all_local=True, local_block_size=16)
    assert streaming.cache_config.enable_prefix_caching is True and streaming.cache_config.block_size == 16
    # Compressed prefill under the paper's window rule: K/V depend on each request's window, which
    # vLLM's block hashes do not see, so caching goes off; exact prefill keeps it.
    paper = dict(window_rule="paper", compression_ratio=4.0)
    assert _create_config(default_model_dir, prefill="compressed", **paper).cache_config.enable_prefix_caching is False
    assert _create_config(default_model_dir, prefill="exact", **paper).cache_config.enable_prefix_caching is True


def test_mismatched_profile_is_refused_naming_the_difference(default_model_dir, tmp_path):
    from razor_vllm.config import resolve_profile

    profile = resolve_profile("smollm2-135m-instruct")
    wrong = profile.model_copy(
        update={
            "model": profile.model.model_copy(update={"num_layers": 32}),
            "retrieval_heads": profile.retrieval_heads + [[], []],
            "scores": {},
        }
    )
    path = wrong.save(tmp_path / "wrong.yaml")
    with pytest.raises(ValueError, match="num_layers: profile has 32, model has 30"):
        _create_config(default_model_dir, profile=str(path))


def test_malformed_profile_is_refused_naming_the_field(default_model_dir, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("schema_version: 1\nsink: four\n")
    with pytest.raises(ValueError, match="field 'sink'"):
        _create_config(default_model_dir, profile=str(path))


def test_missing_profile_is_refused(default_model_dir):
    with pytest.raises(ValueError, match="no such file|not a file and not a bundled profile"):
        _create_config(default_model_dir, profile="no-such-profile")


@pytest.mark.parametrize("option, value", [("window", 0), ("sink", -2), ("window", "wide"), ("nonsense", 1)])
def test_invalid_options_are_refused(default_model_dir, option, value):
    with pytest.raises(ValueError, match=f"razor.{option}"):
        _create_config(default_model_dir, **{option: value})


# -- models razor cannot serve: refused at config time, in the calling process ----------------------

UNSERVABLE = {  # tests/model_configs/tiny-<kind>.json -> what the message must name
    "deepseek_v2": "it uses multi-head latent attention (MLA",
    "bert": "it uses encoder-only (bidirectional) attention",
    "whisper": "it is an encoder-decoder model",
    "mamba": "it has no attention layers",
    "jamba": "it mixes attention with state-space/linear-attention layers",
    "mistral": "it has a sliding attention window of its own (64 tokens",
    "bloom": "it adds ALiBi position biases",
}


@pytest.fixture(scope="module")
def unservable_models(tmp_path_factory):
    from tiny_models import build_tiny

    root = tmp_path_factory.mktemp("unservable")
    return {kind: build_tiny(kind, root / kind) for kind in UNSERVABLE}


def _engine_args(model_dir, **kwargs):
    from vllm import EngineArgs

    return EngineArgs(
        model=str(model_dir), max_model_len=256, kv_cache_memory_bytes=64 << 20, enforce_eager=True, **kwargs
    )


@pytest.mark.parametrize("kind", sorted(UNSERVABLE))
def test_model_razor_cannot_serve_is_refused_naming_why(unservable_models, kind):
    from vllm import LLM

    model_dir = unservable_models[kind]
    _engine_args(model_dir).create_engine_config()  # stock vLLM takes this model: the refusal below is razor's
    with pytest.raises(ValueError) as err:
        LLM(
            model=str(model_dir),
            attention_backend="razor",
            max_model_len=256,
            kv_cache_memory_bytes=64 << 20,
            enforce_eager=True,
        )
    message = str(err.value)
    assert f"RAZOR attention cannot serve {model_dir}" in message, message
    assert UNSERVABLE[kind] in message, message
    assert "profile" not in message, message  # the model is the problem, not a missing head profile


def test_unsupported_kv_cache_dtype_is_refused(default_model_dir):
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8 is not supported \(razor: auto, bfloat16"):
        _engine_args(default_model_dir, attention_backend="razor", kv_cache_dtype="fp8").create_engine_config()


@pytest.mark.engine
def test_vllm_serve_stops_before_any_engine_starts(unservable_models):
    """The CLI exits with the message; no engine process is started for a model razor cannot serve."""
    import subprocess

    from razor_vllm.serve.harness import free_port, serve_command

    args = ["--attention-backend", "razor", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20)]
    cmd = serve_command(str(unservable_models["deepseek_v2"]), args, free_port())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "RAZOR attention cannot serve" in output and "multi-head latent attention (MLA" in output, output[-3000:]
    assert "EngineCore" not in output, output[-3000:]


# -- engine features razor's pools would silently break: refused at config time, naming the option ---

ENGINE_FEATURES = {  # EngineArgs -> the option the message must name
    "speculative": (
        dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
        "--speculative-config",
    ),
    "kv_transfer": (
        dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
        "--kv-transfer-config",
    ),
    "kv_offloading": (dict(kv_offloading_size=1.0), "--kv-offloading-size"),
    "fast_prefill": (dict(kv_sharing_fast_prefill=True), "--kv-sharing-fast-prefill"),
    "hybrid_off": (dict(disable_hybrid_kv_cache_manager=True), "--disable-hybrid-kv-cache-manager"),
}


@pytest.mark.parametrize("feature", sorted(ENGINE_FEATURES))
def test_engine_feature_razor_cannot_serve_is_refused_naming_the_option(default_model_dir, feature):
    kwargs, option = ENGINE_FEATURES[feature]
    _engine_args(default_model_dir, **kwargs).create_engine_config()  # stock vLLM takes it: the refusal is razor's
    with pytest.raises(ValueError, match="RAZOR attention cannot serve") as err:
        _engine_args(default_model_dir, attention_backend="razor", **kwargs).create_engine_config()
    assert option in str(err.value)


def test_features_vllm_cpu_refuses_itself_are_refused_by_razor_too(default_model_dir):
    """Sleep mode and context parallelism stop earlier on CPU (vLLM's own checks); on GPU razor's check
    names them. Checked on a config razor accepts, with the feature switched on afterwards."""
    from razor_vllm.model_support import engine_feature_reasons

    config = _engine_args(default_model_dir, attention_backend="razor").create_engine_config()
    assert engine_feature_reasons(config) == []
    config.model_config.enable_sleep_mode = True
    config.parallel_config.decode_context_parallel_size = 2
    reasons = " ".join(engine_feature_reasons(config))
    assert "--enable-sleep-mode" in reasons and "--decode-context-parallel-size" in reasons


def test_kv_cache_dtypes_follow_the_backends_capability_list(default_model_dir):
    """Every value of vLLM's --kv-cache-dtype that the backend does not declare is refused; the declared
    ones are not (the list lives on RazorAttentionBackend: a backend that gains fp8 needs no edit here)."""
    import typing

    from vllm.config.cache import CacheDType

    from razor_vllm.backend import RazorAttentionBackend
    from razor_vllm.model_support import unsupported_reasons

    config = _engine_args(default_model_dir, attention_backend="razor").create_engine_config()
    for dtype in typing.get_args(CacheDType):
        config.cache_config.cache_dtype = dtype
        refused = any("--kv-cache-dtype" in r for r in unsupported_reasons(config))
        assert refused == (dtype not in RazorAttentionBackend.supported_kv_cache_dtypes), dtype

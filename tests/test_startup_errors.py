"""Bad razor input stops vLLM's start-up (config creation, before any engine process) with a clear message.

vLLM re-raises errors from config validation as pydantic's ValidationError (a ValueError) carrying
our message, so the tests match on the message.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.default_model


def _create_config(model_dir, **razor):
    from vllm import EngineArgs

    args = EngineArgs(
        model=str(model_dir),
        attention_backend="razor",
        additional_config={"razor": razor},
        max_model_len=2048,
        kv_cache_memory_bytes=64 << 20,
        enforce_eager=True,
    )
    return args.create_engine_config()


def test_bundled_profile_is_found_and_prefix_caching_switched_off(default_model_dir):
    config = _create_config(default_model_dir)
    assert config.attention_config.backend.name == "RAZOR"
    assert config.cache_config.enable_prefix_caching is False


def test_mismatched_profile_is_refused_naming_the_difference(default_model_dir, tmp_path):
    from razor_vllm.config import resolve_profile

    profile = resolve_profile("smollm2-135m-instruct")
    wrong = profile.model_copy(update={"model": profile.model.model_copy(update={"num_layers": 32}),
                                       "retrieval_heads": profile.retrieval_heads + [[], []], "scores": {}})
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

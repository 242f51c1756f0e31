"""Razor options and profile resolution: bad input stops start-up with a message naming it."""

import pytest

from razor_vllm.config import ModelFingerprint, ProfileError, Provenance, RazorProfile, utc_now
from razor_vllm.options import RazorOptions, resolve

SERVED = ModelFingerprint(
    architecture="LlamaForCausalLM",
    model_type="llama",
    num_layers=4,
    num_attention_heads=4,
    num_kv_heads=2,
    head_size=64,
    vocab_size=1000,
    position_encoding="rope",
)


def _profile(tmp_path, **overrides):
    fields = dict(
        model=SERVED,
        sink=4,
        window=64,
        retrieval_heads=[[0], [], [1], []],
        provenance=Provenance(method="manual", command="test", tool_version="0", created=utc_now()),
    )
    fields.update(overrides)
    return RazorProfile(**fields).save(tmp_path / "p.yaml")


def test_profile_defaults_and_overrides(tmp_path):
    path = _profile(tmp_path)
    resolved = resolve(RazorOptions(profile=str(path)), SERVED)
    assert (resolved.sink, resolved.window, resolved.retrieval_heads) == (4, 64, [[0], [], [1], []])
    resolved = resolve(RazorOptions(profile=str(path), window=16, sink=0), SERVED)
    assert (resolved.sink, resolved.window) == (0, 16)
    assert resolve(RazorOptions(profile=str(path), all_retrieval=True), SERVED).retrieval_heads == [[0, 1]] * 4
    assert resolve(RazorOptions(profile=str(path), all_local=True), SERVED).retrieval_heads == [[]] * 4


def test_mismatched_profile_names_the_difference(tmp_path):
    path = _profile(tmp_path)
    other = SERVED.model_copy(update={"num_kv_heads": 4, "vocab_size": 2000})
    with pytest.raises(ProfileError) as err:
        resolve(RazorOptions(profile=str(path)), other)
    assert "num_kv_heads: profile has 2, model has 4" in str(err.value)
    assert "vocab_size: profile has 1000, model has 2000" in str(err.value)


def test_missing_profile_file():
    with pytest.raises(ProfileError, match="no such file"):
        resolve(RazorOptions(profile="/nonexistent/profile.yaml"), SERVED)


def test_no_bundled_profile_for_unknown_model():
    stranger = SERVED.model_copy(update={"architecture": "NoSuchForCausalLM", "num_layers": 3})
    with pytest.raises(ProfileError, match="no head profile .* matches the served model"):
        resolve(RazorOptions(), stranger)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"window": 0}, "razor.window"),
        ({"sink": -1}, "razor.sink"),
        ({"windw": 5}, "razor.windw"),
        ({"window": "x"}, "razor.window"),
    ],
)
def test_invalid_options_name_the_field(raw, field):
    with pytest.raises(ValueError, match=field):
        RazorOptions.from_additional_config({"razor": raw})


def test_all_local_and_all_retrieval_exclusive():
    with pytest.raises(ValueError, match="exclude each other"):
        RazorOptions.from_additional_config({"razor": {"all_local": True, "all_retrieval": True}})


def test_malformed_yaml_names_the_field(tmp_path):
    path = _profile(tmp_path)
    text = path.read_text().replace("window: 64", "window: -3")
    path.write_text(text)
    with pytest.raises(ProfileError, match="field 'window'"):
        RazorProfile.load(path)
    path.write_text("retrieval_heads: [1, 2\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        RazorProfile.load(path)


def test_compensation_follows_the_profile_unless_overridden(tmp_path):
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    on = _profile(tmp_path / "on")
    assert "compensation: true" in on.read_text()
    assert resolve(RazorOptions(profile=str(on)), SERVED).compensation is True
    off = _profile(tmp_path / "off", compensation=False)
    assert resolve(RazorOptions(profile=str(off)), SERVED).compensation is False
    assert resolve(RazorOptions(profile=str(off), compensation=True), SERVED).compensation is True
    assert resolve(RazorOptions(profile=str(on), compensation=False), SERVED).compensation is False
    # Profiles written before the field existed keep the compensation token.
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text(on.read_text().replace("compensation: true\n", ""))
    assert RazorProfile.load(legacy).compensation is True
    with pytest.raises(ProfileError, match="compensation"):
        legacy.write_text(on.read_text().replace("compensation: true", "compensation: maybe"))
        RazorProfile.load(legacy)


def test_prefill_and_window_rule_options(tmp_path):
    path = _profile(tmp_path)
    resolved = resolve(RazorOptions(profile=str(path)), SERVED)
    assert resolved.exact_prefill and resolved.compression_ratio is None  # the paper's prefill by default
    options = RazorOptions.from_additional_config(
        {"razor": {"profile": str(path), "prefill": "compressed", "window_rule": "paper", "compression_ratio": 5}}
    )
    resolved = resolve(options, SERVED)
    assert not resolved.exact_prefill and resolved.compression_ratio == 5
    rule = resolved.local_rule()
    assert rule.request_window(100) == 64 and rule.request_window(1000) == 200  # max(S0, N / C)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"prefill": "fast"}, "razor.prefill"),
        ({"window_rule": "grow"}, "razor.window_rule"),
        ({"window_rule": "paper", "compression_ratio": 1}, "razor.compression_ratio"),
        ({"window_rule": "paper"}, "needs razor.compression_ratio"),
        ({"compression_ratio": 4}, "compression_ratio applies only with razor.window_rule"),
    ],
)
def test_bad_prefill_and_window_rule_options_name_the_option(raw, message):
    with pytest.raises(ValueError, match=message):
        RazorOptions.from_additional_config({"razor": raw})

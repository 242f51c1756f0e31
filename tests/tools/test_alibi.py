"""ALiBi models: Theorem 1's per-head range, checked against a direct computation and against real attention."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from razor_vllm.config import RazorProfile
from razor_vllm.profile import AlibiRangeSelector, alibi_head_ranges, command, profile_model
from razor_vllm.profile.alibi import alibi_slopes

from tiny_models import build_tiny, model_config

EPS = 1e-3
NUM_HEADS = 4


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory):
    # init 0.04: the content term 2 ||M|| R^2 is a sizeable part of L_h (about 20 of 50 tokens for head 0)
    path = tmp_path_factory.mktemp("tiny_bloom")
    return build_tiny("bloom", path, initializer_range=0.04, n_head=NUM_HEADS, seed=0, with_tokenizer=False)


def load(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


@pytest.mark.parametrize("num_heads", [1, 4, 6, 8, 12, 16])
def test_slopes_match_bloom(num_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's alibi at key position 1 is exactly the slope
    alibi = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float64).view(num_heads, 2)
    torch.testing.assert_close(alibi_slopes(num_heads), alibi[:, 1], rtol=1e-6, atol=0)


def test_range_formula_matches_direct_computation(tiny_bloom):
    model = load(tiny_bloom)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial norm parameters and projection biases
        for block in model.transformer.h:
            block.input_layernorm.weight.mul_(1 + 0.3 * torch.randn(64, dtype=torch.float64))
            block.input_layernorm.bias.normal_(0, 0.2)
            block.self_attention.query_key_value.bias.normal_(0, 0.1)
    got = alibi_head_ranges(model, eps=EPS)

    slopes = [2.0 ** (-2 * (h + 1)) for h in range(NUM_HEADS)]  # 4 heads: 1/4, 1/16, 1/64, 1/256
    head_dim = 64 // NUM_HEADS
    for layer, block in enumerate(model.transformer.h):
        w = block.self_attention.query_key_value.weight.view(NUM_HEADS, 3, head_dim, 64)
        b = block.self_attention.query_key_value.bias.view(NUM_HEADS, 3, head_dim)
        gamma, beta = block.input_layernorm.weight, block.input_layernorm.bias
        r2 = gamma.square().sum() + beta.square().sum() + 1  # +1: the bias coordinate
        for h in range(NUM_HEADS):
            wq = torch.cat([w[h, 0], b[h, 0, :, None]], 1)  # head_dim x (hidden + 1)
            wk = torch.cat([w[h, 1], b[h, 1, :, None]], 1)
            m = wq.T @ wk / math.sqrt(head_dim)  # full (hidden+1) x (hidden+1) bilinear form
            spectral = torch.linalg.svdvals(m)[0]
            expected = (2 * spectral * r2 - math.log(EPS)) / slopes[h]
            assert got[layer, h].item() == pytest.approx(expected.item(), rel=1e-9)


def test_range_bounds_real_attention(tiny_bloom):
    """No key further back than L_h gets more than eps of the weight of the query's own position."""
    model = load(tiny_bloom)
    ranges = alibi_head_ranges(model, eps=EPS)
    slopes = alibi_slopes(NUM_HEADS)
    seq = 512
    ids = torch.randint(4, 512, (4, seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        attentions = model(ids, output_attentions=True, use_cache=False).attentions
    distance = (torch.arange(seq)[:, None] - torch.arange(seq)[None]).double()
    checked, naive_violated = 0, 0
    for layer, probs in enumerate(attentions):  # probs (batch, heads, seq, seq)
        ratio = probs / torch.diagonal(probs, dim1=-2, dim2=-1)[..., None]
        for h in range(NUM_HEADS):
            beyond = distance > ranges[layer, h]
            if beyond.any():
                checked += 1
                assert ratio[:, h][:, beyond].max() <= EPS
                mass = (probs[:, h] * beyond).sum(-1).max()
                assert mass <= EPS / (1 - math.exp(-slopes[h].item()))
            # without the content term the range would be too short: the bound is not trivially loose
            naive = distance > -math.log(EPS) / slopes[h]
            if naive.any() and ratio[:, h][:, naive].max() > EPS:
                naive_violated += 1
    assert checked >= 4  # heads 0 and 1 of both layers have L_h < 512
    assert naive_violated >= 2


def test_selector_keeps_heads_whose_range_covers_the_context(tiny_bloom):
    model = load(tiny_bloom, torch.float32)
    ranges = alibi_head_ranges(model, eps=EPS)
    context = 1000  # between head 2 (~770) and head 3 (~3200) of both layers
    assert (ranges[:, 2] < context).all() and (ranges[:, 3] >= context).all()
    selection = AlibiRangeSelector(eps=EPS, context_length=context).select(tiny_bloom)
    assert selection.retrieval_heads == [[3], [3]]
    assert selection.suggested_window == math.ceil(ranges[:, :3].max().item())
    profile = selection.to_profile(command="test")
    assert profile.model.position_encoding == "alibi" and profile.model.num_kv_heads == NUM_HEADS
    assert profile.provenance.method == "alibi_range" and profile.provenance.alibi_eps == EPS
    assert profile.provenance.context_length == context
    assert profile.window == selection.suggested_window
    stored = torch.tensor(profile.scores["alibi_range"], dtype=torch.float64)
    torch.testing.assert_close(stored, ranges, rtol=1e-5, atol=0)
    assert RazorProfile.from_yaml(profile.to_yaml()) == profile
    # a longer context keeps fewer heads, a short one keeps them all
    assert AlibiRangeSelector(eps=EPS, context_length=100_000).select(model).retrieval_heads == [[], []]
    assert AlibiRangeSelector(eps=EPS, context_length=10).select(model).retrieval_heads == [[0, 1, 2, 3]] * 2


def test_smaller_eps_means_longer_ranges(tiny_bloom):
    model = load(tiny_bloom)
    assert (alibi_head_ranges(model, eps=1e-6) > alibi_head_ranges(model, eps=1e-3)).all()


def test_profile_model_and_cli_use_theorem_1_for_alibi(tiny_bloom, tmp_path):
    profile = profile_model(tiny_bloom, context_length=1000)
    assert profile.provenance.method == "alibi_range" and profile.retrieval_heads == [[3], [3]]

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    out = tmp_path / "bloom.yaml"
    args = parser.parse_args(
        [
            "--model",
            str(tiny_bloom),
            "--context-length",
            "1000",
            "--alibi-eps",
            "1e-3",
            "--window",
            "128",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    args.argv = ["--model", "X"]
    assert command.run(args) == 0
    loaded = RazorProfile.load(out)
    assert loaded.retrieval_heads == [[3], [3]] and loaded.window == 128
    # BLOOM's config names no context length: without --context-length the command says so
    args = parser.parse_args(["--model", str(tiny_bloom), "--quiet"])
    assert command.run(args) == 2


# -- classification by the config's position encoding --------------------------------------------------
# config.json values of Baichuan2-7B-Chat and Baichuan2-13B-Chat (tests/model_configs; baichuan-inc on the hub;
# the 13B's fields as in vLLM's former vllm/transformers_utils/configs/baichuan_13b.py: model_max_length,
# no max_position_embeddings). Both are model_type "baichuan", architecture BaichuanForCausalLM.
BAICHUAN2_7B = model_config("baichuan2-7b-chat")
BAICHUAN2_13B = model_config("baichuan2-13b-chat")


def _config(values):
    from transformers import PretrainedConfig

    values = dict(values)
    cfg = PretrainedConfig(**{k: v for k, v in values.items() if k != "model_type"})
    cfg.model_type = values["model_type"]  # remote-code configs: an instance attribute, not a registered class
    return cfg


def test_baichuan2_7b_is_rope_and_13b_is_alibi():
    from razor_vllm.config import ModelFingerprint, position_encoding_of

    seven, thirteen = _config(BAICHUAN2_7B), _config(BAICHUAN2_13B)
    assert position_encoding_of(seven) == "rope"
    assert position_encoding_of(thirteen) == "alibi"
    fp7, fp13 = ModelFingerprint.from_hf_config(seven), ModelFingerprint.from_hf_config(thirteen)
    assert (fp7.position_encoding, fp7.num_layers, fp7.num_kv_heads, fp7.head_size) == ("rope", 32, 32, 128)
    assert (fp13.position_encoding, fp13.num_layers, fp13.num_kv_heads, fp13.head_size) == ("alibi", 40, 40, 128)


@pytest.mark.parametrize(
    "values,expected",
    [
        (dict(model_type="falcon", alibi=True, rope_theta=10000.0), "alibi"),  # the flag wins
        (dict(model_type="mpt", attn_config={"alibi": True}), "alibi"),
        (dict(model_type="mpt", attn_config={"alibi": False}), "other"),
        (dict(model_type="bloom"), "alibi"),
        (dict(model_type="codellm", position_encoding_type="alibi"), "alibi"),
        (dict(model_type="omni", position_embedding_type="rope"), "rope"),
        (dict(model_type="llama", rope_theta=500000.0), "rope"),
        (dict(model_type="gpt2"), "other"),
    ],
)
def test_position_encoding_comes_from_the_config(values, expected):
    from razor_vllm.config import position_encoding_of

    assert position_encoding_of(_config(values)) == expected


def test_baichuan2_7b_gets_the_probe_and_13b_theorem_1(tmp_path, monkeypatch):
    """The profiler picks its selector from the same classification."""
    from razor_vllm import profile as profile_pkg
    from razor_vllm.config import ModelFingerprint
    from razor_vllm.profile import EchoInductionSelector

    for values, kind in ((BAICHUAN2_7B, EchoInductionSelector), (BAICHUAN2_13B, AlibiRangeSelector)):
        fingerprint = ModelFingerprint.from_hf_config(_config(values))
        monkeypatch.setattr(profile_pkg, "fingerprint_of", lambda _dir, fp=fingerprint: fp)
        assert isinstance(profile_pkg.selector_for(tmp_path), kind)

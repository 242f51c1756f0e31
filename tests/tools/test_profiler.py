"""The echo/induction profiler: block-wise scores, GQA, global selection, profiles on disk, the CLI."""

from __future__ import annotations

import argparse
import shlex
import sys

import pytest
import torch
import yaml

from razor_vllm.config import ProfileError, RazorProfile
from razor_vllm.profile import (
    EchoInductionSelector,
    command,
    global_top_k,
    kv_head_scores,
    make_probe,
    profile_model,
    reselect,
    scoring,
    select_union,
    top_k_count,
)
from razor_vllm.profile.probe import default_tokens, default_vocab_range
from razor_vllm.profile.scoring import ProbeScorer, copy_pairs

from tiny_models import BOS_ID, build_tiny_llama

PROBE_ARGS = ["--tokens", "48", "--repeats", "3", "--vocab-low", "100", "--vocab-high", "160"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    # Large init: peaked, uneven attention, so a wrong score formula shows.
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), initializer_range=0.2, seed=3)


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama):
    return profile_model(
        tiny_llama,
        tokens=48,
        repeats=3,
        vocab_range=(100, 160),
        seed=7,
        induction_ratio=0.25,
        echo_ratio=0.1,
        command="test",
    )


def reference_scores(attentions, input_ids, scored):
    """Echo/induction per (layer, query head) straight from the definition, on materialised maps."""
    ids = input_ids.tolist()
    n = len(ids)
    same = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        if scored[i]:
            for j in range(i):
                if ids[j] == ids[i]:
                    same[i, j] = 1.0
    shifted = torch.zeros_like(same)
    shifted[:, 1:] = same[:, :-1]  # attention to j + 1 for each matching j
    echo = torch.stack([(a[0].double() * same).sum((-1, -2)) for a in attentions])
    induction = torch.stack([(a[0].double() * shifted).sum((-1, -2)) for a in attentions])
    count = int(scored.sum())
    return echo / count, induction / count


# -- scores -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 50, 1000])
def test_blockwise_scores_equal_scores_from_eager_attention_maps(tiny_llama, block_size):
    from transformers import AutoModelForCausalLM

    # vocab range of 30 ids for 40 tokens: in-repeat duplicates, so J has several positions
    probe = make_probe(tokens=40, repeats=3, vocab_range=(200, 230), seed=1, prefix_id=BOS_ID)
    scored = probe.scored_mask()
    model = scoring.load_model(tiny_llama, dtype=torch.float64)
    got = scoring.score_probe(model, probe.input_ids, scored, block_size=block_size)

    eager = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float64, attn_implementation="eager")
    with torch.inference_mode():
        out = eager(probe.input_ids[None], output_attentions=True, use_cache=False)
    echo, induction = reference_scores(out.attentions, probe.input_ids, scored)

    assert got.num_scored == 80
    # eager's softmax runs in fp32, hence 1e-6 rather than float64 precision
    torch.testing.assert_close(got.echo, echo, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.induction, induction, rtol=0, atol=1e-6)
    # the two scores differ and vary across heads: the comparison is not between constants
    assert (echo - induction).abs().max() > 1e-2
    assert induction.max() > 3 * induction.min()


def test_scorer_honours_4d_float_and_bool_masks():
    torch.manual_seed(0)
    seq, heads, kv, dim = 37, 4, 2, 8
    ids = torch.randint(0, 5, (seq,))
    scored = torch.arange(seq) >= 10
    q = torch.randn(1, heads, seq, dim, dtype=torch.float64) * 2
    k = torch.randn(1, kv, seq, dim, dtype=torch.float64) * 2
    allowed = torch.rand(seq, seq) > 0.3
    allowed |= torch.eye(seq, dtype=torch.bool)
    float_mask = torch.zeros(seq, seq, dtype=torch.float64).masked_fill(~allowed, float("-inf"))

    # reference: full map with GQA (query head h reads KV head h // 2)
    logits = q[0] @ k[0].repeat_interleave(heads // kv, dim=0).transpose(1, 2) * 0.3
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~(causal & allowed), float("-inf")), -1)
    echo, induction = reference_scores([probs[None]], ids, scored)

    for mask in (allowed[None, None], float_mask[None, None]):
        scorer = ProbeScorer(ids, scored, num_layers=1, num_heads=heads, block_size=8)
        scorer.observe(0, q, k, mask, 0.3)
        result = scorer.result()
        torch.testing.assert_close(result.echo[0], echo[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(result.induction[0], induction[0], rtol=0, atol=1e-12)


def test_copy_pairs_are_earlier_equal_tokens_of_scored_queries():
    ids = torch.tensor([9, 1, 2, 1, 1, 2])
    scored = torch.tensor([False, False, False, True, True, True])
    q, k = copy_pairs(ids, scored)
    assert list(zip(q.tolist(), k.tolist())) == [(3, 1), (4, 1), (4, 3), (5, 2)]


def test_scorer_refuses_a_model_that_skips_layers():
    scorer = ProbeScorer(torch.tensor([1, 2, 2]), torch.tensor([False, False, True]), num_layers=2, num_heads=1)
    scorer.observe(0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), None, 1.0)
    with pytest.raises(RuntimeError, match="AttentionInterface"):
        scorer.result()


def test_kv_head_score_is_max_over_its_query_heads():
    per_query = torch.tensor([[0.1, 0.5, 0.3, 0.2, 0.9, 0.0], [0.7, 0.1, 0.2, 0.0, 0.0, 0.4]], dtype=torch.float64)
    # 6 query heads over 2 KV heads: KV head 0 <- query heads 0-2, KV head 1 <- 3-5
    assert kv_head_scores(per_query, 2).tolist() == [[0.5, 0.9], [0.7, 0.4]]
    assert kv_head_scores(per_query, 6).tolist() == per_query.tolist()
    with pytest.raises(ValueError):
        kv_head_scores(per_query, 4)


def test_profile_stores_kv_max_of_query_head_scores(tiny_llama, tiny_profile):
    probe = make_probe(48, 3, (100, 160), seed=7, prefix_id=BOS_ID)
    model = scoring.load_model(tiny_llama)
    per_query = scoring.score_probe(model, probe.input_ids, probe.scored_mask())
    for name, table in (("induction", per_query.induction), ("echo", per_query.echo)):
        expected = table.view(4, 2, 2).amax(-1)
        stored = torch.tensor(tiny_profile.scores[name], dtype=torch.float64)
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=0)  # stored with 6 significant digits


# -- selection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio,total,count",
    [
        (0.14, 90, 13),
        (0.01, 90, 1),
        (0.0, 90, 0),
        (0.15, 90, 14),
        (0.5, 3, 2),
        (1.0, 7, 7),
        (0.001, 10, 1),
        (0.14, 8, 1),
    ],
)
def test_top_k_count_rounds_half_up_and_keeps_at_least_one(ratio, total, count):
    assert top_k_count(ratio, total) == count


def test_global_top_k_breaks_ties_by_layer_then_head():
    table = [[0.5, 0.5], [0.9, 0.5], [0.5, 0.1]]
    assert global_top_k(table, 3) == [(1, 0), (0, 0), (0, 1)]
    assert global_top_k([[0.0] * 3] * 2, 4) == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_selection_is_global_union_of_induction_and_echo():
    # 10 layers x 2 KV heads = 20 heads: induction 0.14 -> 3 heads, echo 0.01 -> 1 head (at least one)
    induction = [[0.0, 0.0] for _ in range(10)]
    echo = [[0.0, 0.0] for _ in range(10)]
    induction[7][1], induction[7][0], induction[2][1], induction[5][0] = 0.9, 0.8, 0.7, 0.6
    echo[0][0], echo[7][1] = 0.5, 0.4
    scores = {"induction": induction, "echo": echo}

    heads = select_union(scores, {"induction": 0.14, "echo": 0.01})
    assert heads == [[0], [], [1], [], [], [], [], [0, 1], [], []]  # some layers get 2, most none
    # echo's top head already chosen by induction: the union does not grow
    echo[0][0] = 0.0
    assert sum(map(len, select_union(scores, {"induction": 0.14, "echo": 0.01}))) == 3
    # ratios scale the counts
    assert sum(map(len, select_union(scores, {"induction": 0.2, "echo": 0.0}))) == 4
    assert sum(map(len, select_union(scores, {"induction": 1.0, "echo": 0.0}))) == 20


def test_selection_with_reference_ratios_on_the_tiny_model(tiny_profile):
    # 8 KV heads: induction 0.25 -> 2, echo 0.1 -> 1 (union of 2 or 3)
    top_ind = set(global_top_k(tiny_profile.scores["induction"], 2))
    top_echo = set(global_top_k(tiny_profile.scores["echo"], 1))
    chosen = {(l, h) for l, heads in enumerate(tiny_profile.retrieval_heads) for h in heads}
    assert chosen == top_ind | top_echo


# -- determinism ------------------------------------------------------------------------------


def test_probe_is_seeded():
    a = make_probe(100, 4, (10, 50), seed=5)
    assert torch.equal(a.input_ids, make_probe(100, 4, (10, 50), seed=5).input_ids)
    assert not torch.equal(a.input_ids, make_probe(100, 4, (10, 50), seed=6).input_ids)
    assert a.length == 401 and a.input_ids[0] == 1
    assert torch.equal(a.input_ids[1:101], a.input_ids[301:401])
    assert int(a.input_ids[1:].min()) >= 10 and int(a.input_ids.max()) < 50
    assert a.scored_mask().sum() == 300 and not a.scored_mask()[:101].any()


def test_probe_defaults_fit_model():
    assert default_vocab_range(49152) == (10000, 12500)
    low, high = default_vocab_range(512)
    assert 0 < low < high <= 512 and high - low == 256
    assert default_tokens(4, 8192) == 2047
    assert default_tokens(4, None) == 2500 and default_tokens(4, 100_000) == 2500


def test_profiling_is_deterministic(tiny_llama, tiny_profile):
    kwargs = dict(tokens=48, repeats=3, vocab_range=(100, 160), induction_ratio=0.25, echo_ratio=0.1, command="test")
    again = profile_model(tiny_llama, seed=7, **kwargs)
    assert again.scores == tiny_profile.scores
    assert again.retrieval_heads == tiny_profile.retrieval_heads
    other = profile_model(tiny_llama, seed=8, **kwargs)
    assert other.scores != tiny_profile.scores


# -- the profile on disk ------------------------------------------------------------------------


def test_profile_contents(tiny_profile):
    p = tiny_profile
    assert p.model.num_layers == 4 and p.model.num_kv_heads == 2 and p.model.position_encoding == "rope"
    assert p.provenance.method == "echo_induction"
    assert (p.provenance.seed, p.provenance.probe_tokens, p.provenance.probe_repeats) == (7, 48, 3)
    assert p.provenance.probe_vocab_range == (100, 160)
    assert (p.provenance.induction_ratio, p.provenance.echo_ratio) == (0.25, 0.1)
    assert p.provenance.tool_version and p.provenance.created
    assert set(p.scores) == {"induction", "echo"}
    assert (p.sink, p.window) == (4, 256)


def test_yaml_round_trip_is_exact(tiny_profile, tmp_path):
    text = tiny_profile.to_yaml()
    loaded = RazorProfile.from_yaml(text)
    assert loaded == tiny_profile
    assert loaded.to_yaml() == text
    path = tiny_profile.save(tmp_path / "p.yaml")
    assert RazorProfile.load(path) == tiny_profile


def _mutate(data, path, value):
    *parents, last = path
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("sink",), "four", "sink"),
        (("window",), 0, "window"),
        (("bogus",), 1, "bogus"),
        (("provenance", "bogus"), 1, "provenance.bogus"),
        (("provenance", "method"), "magic", "provenance.method"),
        (("provenance", "probe_repeats"), 1, "provenance.probe_repeats"),
        (("model", "num_layers"), "many", "model.num_layers"),
        (("model", "head_size"), _DELETE, "model.head_size"),
        (("retrieval_heads", 0), "all", "retrieval_heads.0"),
        (("retrieval_heads",), [[0]] * 3, "retrieval_heads"),
        (("retrieval_heads", 1), [5], "retrieval_heads layer 1"),
        (("retrieval_heads", 2), [1, 0], "retrieval_heads"),
        (("scores", "echo", 0), [0.5], "scores.echo"),
        (("scores", "echo", 1, 0), "high", "scores.echo.1.0"),
    ],
)
def test_malformed_profile_names_the_bad_field(tiny_profile, path, value, field):
    data = tiny_profile.model_dump(mode="json")
    _mutate(data, path, value)
    with pytest.raises(ProfileError) as info:
        RazorProfile.from_yaml(yaml.safe_dump(data), source="bad.yaml")
    message = str(info.value)
    assert "bad.yaml" in message and field in message, message


# -- re-selection -------------------------------------------------------------------------------


def test_reselect_uses_stored_scores(tiny_profile):
    same = reselect(tiny_profile, 0.25, 0.1)
    assert same.retrieval_heads == tiny_profile.retrieval_heads
    more = reselect(tiny_profile, 0.5, 0.0)
    assert more.num_retrieval_heads == 4
    assert more.retrieval_heads == select_union(tiny_profile.scores, {"induction": 0.5})
    assert more.scores == tiny_profile.scores
    assert (more.provenance.induction_ratio, more.provenance.echo_ratio) == (0.5, 0.0)
    assert more.provenance.seed == 7 and more.provenance.probe_tokens == 48  # probe settings carried over


def test_reselect_refuses_profiles_without_probe_scores(tiny_profile):
    data = tiny_profile.model_dump()
    data["provenance"]["method"] = "duo_attention"
    with pytest.raises(ProfileError, match="duo_attention"):
        reselect(RazorProfile.model_validate(data), 0.14, 0.01)


def test_selector_ratios_are_validated():
    with pytest.raises(ValueError, match="induction_ratio"):
        EchoInductionSelector(induction_ratio=1.5)
    with pytest.raises(ValueError, match="both 0"):
        EchoInductionSelector(induction_ratio=0.0, echo_ratio=0.0)


# -- the command --------------------------------------------------------------------------------


def run_cli(argv, set_argv=True):
    parser = argparse.ArgumentParser(prog="razor-vllm profile")
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    if set_argv:
        args.argv = argv
    return command.run(args)


def test_cli_profiles_tiny_model_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "configs" / "tiny.yaml"
    argv = [
        "--model",
        str(tiny_llama),
        "--out",
        str(out),
        *PROBE_ARGS,
        "--seed",
        "7",
        "--induction-ratio",
        "0.25",
        "--echo-ratio",
        "0.1",
        "--window",
        "64",
        "--quiet",
    ]
    assert run_cli(argv) == 0
    profile = RazorProfile.load(out)
    assert profile.provenance.command == "razor-vllm profile " + shlex.join(argv)
    assert profile.provenance.probe_tokens == 48 and profile.provenance.probe_vocab_range == (100, 160)
    assert (profile.sink, profile.window) == (4, 64)
    api = profile_model(
        tiny_llama, tokens=48, repeats=3, vocab_range=(100, 160), seed=7, induction_ratio=0.25, echo_ratio=0.1
    )
    assert profile.scores == api.scores and profile.retrieval_heads == api.retrieval_heads
    assert capsys.readouterr().out == ""


def test_cli_prints_yaml_and_records_sys_argv(tiny_llama, capsys, monkeypatch):
    argv = ["--model", str(tiny_llama), *PROBE_ARGS, "--quiet"]
    monkeypatch.setattr(sys, "argv", ["razor-vllm", "profile", *argv])
    assert run_cli(argv, set_argv=False) == 0
    profile = RazorProfile.from_yaml(capsys.readouterr().out)
    assert profile.provenance.command == "razor-vllm profile " + shlex.join(argv)
    assert profile.provenance.seed == 0


def test_cli_from_scores_reselects(tiny_profile, tmp_path, capsys):
    src = tiny_profile.save(tmp_path / "src.yaml")
    out = tmp_path / "re.yaml"
    argv = ["--from-scores", str(src), "--induction-ratio", "0.5", "--echo-ratio", "0", "--out", str(out)]
    assert run_cli(argv) == 0
    profile = RazorProfile.load(out)
    assert profile.retrieval_heads == select_union(tiny_profile.scores, {"induction": 0.5})
    assert profile.provenance.command == "razor-vllm profile " + shlex.join(argv)
    assert "4/8 KV heads retrieval" in capsys.readouterr().err


def test_cli_from_scores_can_overwrite_its_input_and_keeps_what_it_does_not_reselect(tiny_profile, tmp_path):
    """How the bundled default profile is regenerated: in place, new ratios and window, a note saying why."""
    stored = tiny_profile.model_copy(update=dict(model_names=["example/Tiny"], compensation=False, sink=2, window=48))
    path = stored.save(tmp_path / "p.yaml")
    note = "chosen on a calibration split: razor-vllm eval --split calibration ..."
    argv = ["--from-scores", str(path), "--induction-ratio", "0.5", "--echo-ratio", "0", "--window", "24"]
    argv += ["--note", note, "--out", str(path)]
    assert run_cli(argv) == 0
    profile = RazorProfile.load(path)
    assert profile.retrieval_heads == select_union(tiny_profile.scores, {"induction": 0.5})
    assert profile.scores == tiny_profile.scores
    assert (profile.sink, profile.window) == (2, 24)  # the stored sink (no --sink given), the new window
    assert profile.model_names == ["example/Tiny"] and profile.compensation is False
    assert profile.provenance.note == note
    # the note is stored once; the command names it
    shown = [command.NOTE_PLACEHOLDER if a == note else a for a in argv]
    assert profile.provenance.command == "razor-vllm profile " + shlex.join(shown)
    assert (profile.provenance.induction_ratio, profile.provenance.seed) == (0.5, 7)
    # a later re-selection is a new decision: the note is not carried over
    again = tmp_path / "again.yaml"
    assert run_cli(["--from-scores", str(path), "--induction-ratio", "0.25", "--out", str(again), "--quiet"]) == 0
    assert RazorProfile.load(again).provenance.note is None


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "--model DIR is required"),
        (["--model", "/nonexistent"], "not a Hugging Face checkpoint"),
        (["--from-scores", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_cli_errors_are_reported(argv, message, capsys):
    assert run_cli(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_vocab_range_outside_vocabulary(tiny_llama, capsys):
    assert run_cli(["--model", str(tiny_llama), "--vocab-low", "500", "--vocab-high", "600", "--quiet"]) == 2
    assert "vocab size 512" in capsys.readouterr().err


# -- streaming scorer: same scores as exact rows, memory independent of the probe length -----------


@pytest.mark.parametrize("block_size,key_block_size", [(16, 7), (50, 64), (33, 1000)])
def test_streaming_scores_equal_exact_rows_on_tiny_gqa_model(tiny_llama, block_size, key_block_size):
    # 4 query heads over 2 KV heads; duplicates inside a repeat (30 ids for 40 tokens) and tiles that
    # straddle the query blocks' diagonals at every offset
    probe = make_probe(tokens=40, repeats=3, vocab_range=(200, 230), seed=1, prefix_id=BOS_ID)
    model = scoring.load_model(tiny_llama, dtype=torch.float64)
    exact = scoring.score_probe(model, probe.input_ids, probe.scored_mask(), block_size=block_size, key_block_size=None)
    streamed = scoring.score_probe(
        model, probe.input_ids, probe.scored_mask(), block_size=block_size, key_block_size=key_block_size
    )
    torch.testing.assert_close(streamed.echo, exact.echo, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(streamed.induction, exact.induction, rtol=1e-12, atol=1e-14)
    assert exact.induction.max() > 3 * exact.induction.min()  # not a comparison of constants


def test_streaming_scores_equal_exact_rows_on_default_model(default_model_dir):
    # SmolLM2-135M (9 query heads over 3 KV heads, 30 layers) in float32, as `razor-vllm profile` runs it
    probe = make_probe(tokens=100, repeats=3, vocab_range=(10000, 12500), seed=0, prefix_id=1)
    model = scoring.load_model(default_model_dir, dtype=torch.float32)
    kwargs = dict(block_size=96)
    exact = scoring.score_probe(model, probe.input_ids, probe.scored_mask(), key_block_size=None, **kwargs)
    streamed = scoring.score_probe(model, probe.input_ids, probe.scored_mask(), key_block_size=80, **kwargs)
    # float32 softmax both ways; the streaming normaliser sums tiles in another order
    torch.testing.assert_close(streamed.echo, exact.echo, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(streamed.induction, exact.induction, rtol=1e-4, atol=1e-7)
    # the stored (6-digit) KV-head scores select the same heads
    n_kv = 3
    ind = [[float(f"{x:.6g}") for x in row] for row in kv_head_scores(exact.induction, n_kv).tolist()]
    ind_s = [[float(f"{x:.6g}") for x in row] for row in kv_head_scores(streamed.induction, n_kv).tolist()]
    assert set(global_top_k(ind, 13)) == set(global_top_k(ind_s, 13))


def _random_layer(seq, heads=4, kv=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (seq,), generator=gen)
    q = torch.randn(1, heads, seq, dim, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(1, kv, seq, dim, generator=gen, dtype=torch.float64) * 2
    return ids, torch.arange(seq) >= seq // 4, q, k


@pytest.mark.parametrize("seq", [300, 1200])
def test_streaming_peak_tile_is_bounded_by_the_blocks_not_the_probe_length(seq):
    """The largest tensor the scorer materialises: heads x block x key block, at any probe length
    (the exact path's grows with it). Counted from the tile shapes, not timed or sampled."""
    ids, scored, q, k = _random_layer(seq)
    streaming = ProbeScorer(ids, scored, num_layers=1, num_heads=4, block_size=64, key_block_size=32)
    streaming.observe(0, q, k, None, 0.3)
    exact = ProbeScorer(ids, scored, num_layers=1, num_heads=4, block_size=64, key_block_size=None)
    exact.observe(0, q, k, None, 0.3)
    assert streaming.max_tile_elements == 4 * 64 * 32
    assert exact.max_tile_elements == max(4 * (b - a) * b for a, b in exact._blocks)  # rows of up to seq keys
    assert exact.max_tile_elements > 4 * 64 * (seq - 100)
    torch.testing.assert_close(streaming.result().echo, exact.result().echo, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(streaming.result().induction, exact.result().induction, rtol=1e-12, atol=1e-15)


def test_streaming_honours_masks_that_hide_whole_tiles():
    # a mask hiding the first 40 keys from most queries: rows whose first tiles are all -inf
    ids, scored, q, k = _random_layer(120, seed=2)
    allowed = torch.ones(120, 120, dtype=torch.bool)
    allowed[60:, :40] = False
    results = []
    for key_block in (None, 16):
        scorer = ProbeScorer(ids, scored, num_layers=1, num_heads=4, block_size=32, key_block_size=key_block)
        scorer.observe(0, q, k, allowed[None, None], 0.5)
        results.append(scorer.result())
    assert torch.isfinite(results[1].echo).all()
    torch.testing.assert_close(results[1].echo, results[0].echo, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(results[1].induction, results[0].induction, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_on_cuda_matches_cpu_and_keeps_everything_on_the_gpu(tiny_llama):
    probe = make_probe(tokens=40, repeats=3, vocab_range=(200, 230), seed=1, prefix_id=BOS_ID)
    cpu = scoring.score_probe(scoring.load_model(tiny_llama, dtype=torch.float32), probe.input_ids, probe.scored_mask())
    gpu_model = scoring.load_model(tiny_llama, dtype="float32", device="cuda")
    assert all(p.is_cuda for p in gpu_model.parameters())
    gpu = scoring.score_probe(gpu_model, probe.input_ids, probe.scored_mask(), block_size=16, key_block_size=16)
    torch.testing.assert_close(gpu.induction, cpu.induction, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpu.echo, cpu.echo, rtol=1e-4, atol=1e-6)


def test_estimate_arithmetic():
    from razor_vllm.profile.estimate import ModelSize, estimate

    llama8b = ModelSize(
        layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False
    )
    assert llama8b.params == 8_030_261_248  # Llama-3-8B's published count
    est = estimate(llama8b, 10_001, torch.bfloat16, block_size=512, key_block_size=1024)
    assert est.weight_bytes == 2 * llama8b.params
    assert est.scorer_bytes == 32 * 512 * 1024 * 8 + 512 * 1024  # logits + exp tiles (fp32) + mask
    # streaming tiles do not grow with the probe; exact rows do
    longer = estimate(llama8b, 40_001, torch.bfloat16, block_size=512, key_block_size=1024)
    assert longer.scorer_bytes == est.scorer_bytes
    exact = estimate(llama8b, 40_001, torch.bfloat16, block_size=512, key_block_size=None)
    assert exact.scorer_bytes == 32 * 512 * 40_001 * 8 + 512 * 40_001
    assert est.seconds is None and "parameters" in est.describe(10_001, "cuda")


def test_cli_rejects_bad_device_and_key_block(tiny_llama, capsys):
    assert run_cli(["--model", str(tiny_llama), "--device", "tpu", "--quiet", *PROBE_ARGS]) == 2
    assert "--device must be" in capsys.readouterr().err
    assert run_cli(["--model", str(tiny_llama), "--key-block-size", "-1", "--quiet"]) == 2
    assert "--key-block-size" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli(["--model", str(tiny_llama), "--device", "cuda", "--quiet", *PROBE_ARGS]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_cli_prints_estimate_and_progress(tiny_llama, capsys):
    assert run_cli(["--model", str(tiny_llama), *PROBE_ARGS, "--device", "cpu", "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "estimate for a 145-token probe on cpu, float32" in err and "peak memory" in err
    assert "probing layers" in err


def test_device_map_auto_loads_through_accelerate_and_scores_the_same(tiny_llama):
    # without a GPU accelerate places every layer on the CPU; the path (hooks, input on the
    # embedding's device, per-layer sums) is the one multi-GPU runs take
    probe = make_probe(tokens=40, repeats=3, vocab_range=(200, 230), seed=1, prefix_id=BOS_ID)
    plain = scoring.score_probe(scoring.load_model(tiny_llama, dtype="float32"), probe.input_ids, probe.scored_mask())
    mapped_model = scoring.load_model(tiny_llama, dtype="float32", device_map="auto")
    assert {p.device.type for p in mapped_model.parameters()} == {"cpu"}
    mapped = scoring.score_probe(mapped_model, probe.input_ids, probe.scored_mask())
    torch.testing.assert_close(mapped.induction, plain.induction, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="--device-map must be 'auto'"):
        scoring.load_model(tiny_llama, device_map="balanced")

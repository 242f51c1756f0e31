"""``razor-vllm bench``: the command line, the analytic KV arithmetic and the report (no engine)."""

from __future__ import annotations

import io
import json
import os

import pytest

from razor_vllm.bench import analytic, report
from razor_vllm.cli import main
from razor_vllm.common import tables
from razor_vllm.common.runinfo import int_list
from razor_vllm.config import resolve_profile


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--contexts",
        "--kv-gib",
        "--kv-bytes",
        "--window",
        "--sink",
        "--out",
        "--plot",
        "--quick",
        "--skip-engine",
    ):
        assert option in out


def test_contexts_parse():
    assert int_list("2k,4096, 8k") == [2048, 4096, 8192]


def test_skip_engine_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--skip-engine", "--dtype", "bfloat16", "--out", str(out), "--format", "plain"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"meta", "analytic"} <= set(data)
    assert "capacity" not in data and "throughput" not in data
    a = data["analytic"]
    assert {"bytes_per_token", "requests", "max_concurrency", "page_bytes", "in_flight_tokens"} <= set(a)
    # SmolLM2-135M: 30 layers x 3 KV heads x (K+V) x 64 x 2 bytes; the shipped profile's 35 retrieval heads.
    assert a["bytes_per_token"]["stock"] == 30 * 3 * 2 * 64 * 2
    assert a["bytes_per_token"]["retrieval_pool"] == 35 * 2 * 64 * 2
    assert [r["context"] for r in a["requests"]] == [2048, 4096, 8192]
    for r in a["requests"]:
        keys = {"stock_bytes", "razor_steady_bytes", "razor_admission_bytes", "ratio_steady", "ratio_admission"}
        assert keys <= set(r)
        # Exact prefill (the default) admits a request with every prompt block of the local pool: its
        # transient peak is the whole prompt, a little above stock's (local pages carry the tails).
        assert r["razor_steady_bytes"] < r["razor_admission_bytes"]
        local_blocks = -(-r["context"] // a["local_block_size"])
        assert r["razor_local_admission_bytes"] == local_blocks * a["page_bytes"]
    assert a["prefill"] == "exact" and a["window_rule"] == "fixed"
    rules = {r["context"]: r for r in a["window_rules"]}
    # The shipped window is 128: the paper's rule already keeps more at 2k, max(128, 2048 / 8) = 256.
    assert (rules[2048]["fixed_window"], rules[2048]["paper_window"]) == (128, 256)
    assert rules[2048]["paper_steady_bytes"] > rules[2048]["fixed_steady_bytes"]
    assert rules[8192]["paper_window"] == 1024 and rules[8192]["paper_steady_bytes"] > rules[8192]["fixed_steady_bytes"]
    ratios = [r["ratio_steady"] for r in a["requests"]]
    assert ratios == sorted(ratios)  # the longer the context, the larger razor's gain
    # ... toward 90 / 35, what the shipped profile's 35 whole heads of 90 allow: 2.31x at 4k in bf16.
    assert 2.3 < ratios[1] < ratios[2] < 90 / 35
    for c in a["max_concurrency"]:
        assert {"kv_bytes", "stock", "razor_vllm_logged", "razor_steady", "ratio_steady", "ratio_vllm_logged"} <= set(c)
        assert int(c["stock"]) == 2  # default KV size: stock holds 2 full requests
        assert c["razor_vllm_logged"] < c["razor_steady"]
    printed = capsys.readouterr().out
    assert "KV bytes per token" in printed and "KV bytes per request" in printed
    assert "by window rule" in printed


def test_compressed_prefill_admission_is_bounded(tmp_path):
    """--prefill compressed: admission charges the window plus a chunk, far below stock."""
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--skip-engine",
                "--dtype",
                "bfloat16",
                "--prefill",
                "compressed",
                "--out",
                str(out),
                "--format",
                "plain",
            ]
        )
        == 0
    )
    a = json.loads(out.read_text())["analytic"]
    assert a["prefill"] == "compressed"
    for r in a["requests"]:
        assert r["razor_steady_bytes"] < r["razor_admission_bytes"] < r["stock_bytes"]
    assert main(["bench", "--skip-engine", "--compression-ratio", "1", "--out", str(out)]) == 2


def test_window_and_kv_options(tmp_path):
    out = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                "--skip-engine",
                "--dtype",
                "float32",
                "--window",
                "128",
                "--sink",
                "8",
                "--contexts",
                "1k,2k",
                "--kv-gib",
                "0.25",
                "--out",
                str(out),
                "--format",
                "markdown",
            ]
        )
        == 0
    )
    a = json.loads(out.read_text())["analytic"]
    assert (a["window"], a["sink"], a["dtype"]) == (128, 8, "float32")
    rules = {r["context"]: r for r in a["window_rules"]}
    # Up to N = C x W the two window rules agree: max(128, 1024 / 8) = 128.
    assert rules[1024]["paper_window"] == 128 == rules[1024]["fixed_window"]
    assert rules[1024]["paper_steady_bytes"] == rules[1024]["fixed_steady_bytes"]
    assert rules[2048]["paper_window"] == 256
    assert {c["kv_bytes"] for c in a["max_concurrency"]} == {1 << 28}
    assert main(["bench", "--skip-engine", "--window", "0", "--out", str(out)]) == 2


def test_analytic_matches_vllm_specs():
    """The admission figures are vLLM's own: RazorLocalSpec / FullAttentionSpec give the same blocks."""
    from types import SimpleNamespace

    import torch

    from razor_vllm.pools import build_specs

    profile = resolve_profile("smollm2-135m-instruct")
    for exact in (False, True):
        geo = analytic.geometry(profile, "bfloat16", exact_prefill=exact)
        retrieval, local = build_specs(geo.layout, 64, torch.bfloat16, geo.sink, geo.window, exact_prefill=exact)
        assert retrieval.page_size_bytes == local.page_size_bytes == geo.page_bytes
        assert geo.local_bytes_per_token == local.page_size_bytes / local.block_size
        for ctx in (1024, 2048, 8192):
            own = -(-ctx // local.block_size)
            cap = local.max_admission_blocks_per_request(512, ctx)
            assert geo.local_admission_blocks(ctx, 512) == (own if exact else min(own, cap))
            config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=ctx), max_in_flight_tokens=512)
            assert local.max_memory_usage_bytes(config) == geo.local_admission_blocks(ctx, 512, ctx) * geo.page_bytes
            assert geo.retrieval_pages(ctx) == -(-ctx // retrieval.block_size)


def _fake_results() -> dict:
    profile = resolve_profile("smollm2-135m-instruct")
    geo = analytic.geometry(profile, "float32")
    res = dict(meta={}, analytic=analytic.analytic_report(geo, [2048], 512, {2048: 200 << 20}))
    side = dict(peak_running=2, saturated=True, num_gpu_blocks=20, vllm_max_concurrency=2.5, preemptions=0)
    res["capacity"] = [
        dict(
            context=2048,
            kv_bytes=200 << 20,
            prompt_tokens=1792,
            max_tokens=256,
            stock=side,
            razor=dict(side, peak_running=6, num_gpu_blocks=147, vllm_max_concurrency=4.1),
            ratio_measured=3.0,
            ratio_vllm_logged=1.64,
            ratio_theory_steady=3.2,
            razor_steady_concurrency=7.0,
        )
    ]
    point = dict(prefill_tok_s=500.0, decode_tok_s=50.0)
    res["throughput"] = [dict(context=1024, batch=8, stock=point, razor=point, ratio_prefill=1.0, ratio_decode=1.0)]
    return res


@pytest.mark.parametrize("fmt", ["plain", "markdown", "rich"])
def test_report_tables(fmt):
    if fmt == "rich":
        pytest.importorskip("rich")
    buf = io.StringIO()
    tables.render(report.tables(_fake_results()), fmt, stream=buf)
    text = buf.getvalue()
    for title in ("KV bytes per token", "Capacity in the same KV memory", "Throughput"):
        assert title in text


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = report.plot(_fake_results(), tmp_path / "bench.png")
    assert png is not None and png.stat().st_size > 0


def test_commands_put_the_logging_level_back(tmp_path, monkeypatch):
    """bench/eval quiet vLLM through VLLM_LOGGING_LEVEL (inherited by its workers) for their own run
    only: an in-process caller, e.g. a later server test, keeps its INFO logs."""
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    seen = []
    monkeypatch.setattr(tables, "render", lambda *a, **k: seen.append(os.environ.get("VLLM_LOGGING_LEVEL")))
    assert main(["bench", "--skip-engine", "--out", str(tmp_path / "b.json"), "--format", "plain"]) == 0
    assert seen == ["ERROR"] and "VLLM_LOGGING_LEVEL" not in os.environ
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert main(["bench", "--skip-engine", "--out", str(tmp_path / "b.json"), "--format", "plain"]) == 0
    assert seen[-1] == "DEBUG" and os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_analytic_counts_stock_over_the_same_ranks_as_razor():
    """Tensor parallelism in the bench: stock's cache and razor's pools over the same ranks; with more
    ranks than KV heads (SmolLM2: 3) vLLM gives every rank a copy of one head, as /razor/status counts."""
    profile = resolve_profile("smollm2-135m-instruct")
    head_token = 2 * 64 * 2  # bfloat16
    for tp, heads in ((1, 3), (3, 3), (6, 6)):
        geo = analytic.geometry(profile, "bfloat16", tp_size=tp)
        a = analytic.analytic_report(geo, [2048], 512, {2048: 1 << 30})
        assert a["retrieval_heads"] + a["local_heads"] == 30 * heads  # every head every rank holds
        assert a["bytes_per_token"]["stock"] == 30 * heads * head_token
        assert a["requests"][0]["stock_bytes"] == 2048 * 30 * heads * head_token

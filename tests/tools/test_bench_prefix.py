"""``razor-vllm bench --prefix-workload`` on a small case through real engines (stock and razor, both
with prefix caching on): the JSON and the table carry every figure, and the document is computed
about once per backend."""

from __future__ import annotations

import json

import pytest

from engine_runs import cli

pytestmark = [pytest.mark.engine, pytest.mark.default_model]


def test_prefix_workload_small(tmp_path, default_model_dir):
    out = tmp_path / "prefix.json"
    doc, questions, q_tokens = 400, 3, 8
    argv = ["bench", "--prefix-workload", "--dtype", "float32", "--window", "64", "--chunk", "256"]
    argv += ["--doc-tokens", str(doc), "--questions", str(questions), "--question-tokens", str(q_tokens)]
    argv += ["--answer-tokens", "4", "--out", str(out), "--format", "plain"]
    code, table = cli(argv)
    assert code == 0
    data = json.loads(out.read_text())
    pw = data["prefix_workload"]
    assert set(pw["phases"]) == {"stock", "razor"} and not any("error" in e for e in pw["engines"].values())
    for backend, phases in pw["phases"].items():
        assert pw["engines"][backend]["enable_prefix_caching"] is True
        concurrent, turns = phases
        assert (concurrent["phase"], turns["phase"]) == ("concurrent", "turns")
        for p in phases:
            assert p["requests"] == questions and p["prompt_tokens"] == questions * (doc + q_tokens)
            assert p["prefill_tokens"] == p["prompt_tokens"] - p["cached_tokens"]
            assert p["output_tokens"] == questions * 4 and p["ttft_max_s"] >= p["ttft_p50_s"] > 0
            assert p["peak_running"] >= 1
        # In turns the document is cached: each question computes at most its tail past the last
        # hit boundary (stock: 128-token blocks, razor: its hash-aligned retrieval block).
        assert turns["cached_tokens"] >= questions * (doc - 256), (backend, turns)
        assert turns["prefill_tokens"] < turns["prompt_tokens"] / 2
    assert [r["phase"] for r in pw["rows"]] == ["concurrent", "turns"]
    assert "Prefix-cache workload" in table and "razor/stock" in table

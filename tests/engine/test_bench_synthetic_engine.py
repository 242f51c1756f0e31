"""``razor-vllm bench --model synthetic:tiny`` through real engine pairs (dummy weights, CPU): the
throughput part's "does this batch fit" rule measured. The bench without engines:
tests/tools/test_bench_synthetic.py."""

from __future__ import annotations

import json

import pytest

from razor_vllm.bench import analytic
from razor_vllm.config import RazorProfile

from engine_runs import cli


def run_bench(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    rc, _ = cli(["bench", *args, "--out", str(out), "--format", "plain"])
    return rc, json.loads(out.read_text()) if out.exists() else {}


@pytest.mark.engine
@pytest.mark.parametrize("interleave", [False, True])
def test_tiny_synthetic_engines_measure_what_fits(tmp_path, interleave):
    """Real engines with dummy weights: a batch that stock's KV cache cannot hold at once is listed
    as skipped for stock and measured for razor, in the same KV bytes; one engine after the other, or
    both up at once with the runs alternating (``--interleave``)."""
    rc, data = run_bench(
        tmp_path,
        *(["--interleave"] if interleave else []),
        "--model",
        "synthetic:tiny",
        "--retrieval-share",
        "0.25",
        "--window",
        "64",
        "--dtype",
        "float32",
        "--skip-capacity",
        "--throughput-contexts",
        "512",
        "--batches",
        "1,6",
        "--decode-tokens",
        "4",
        "--chunk",
        "128",
        "--kv-bytes",
        str(4 << 20),
    )
    assert rc == 0, data
    assert data["meta"]["throughput"]["interleave"] is interleave
    rows = {r["batch"]: r for r in data["throughput"]}
    assert rows[1]["stock"]["decode_tok_s"] > 0 and rows[1]["razor"]["decode_tok_s"] > 0
    assert rows[1]["ratio_decode"] > 0
    assert rows[6]["stock"] is None and rows[6]["ratio_decode"] is None
    assert rows[6]["razor"]["decode_tokens"] >= 6 * 4  # all six decoded together
    skipped = data["throughput_engines"]["stock"]["skipped"]
    assert [(s["context"], s["batch"]) for s in skipped] == [(512, 6)]
    assert data["throughput_engines"]["razor"]["skipped"] == []
    assert data["meta"]["cuda_graphs"] is False  # CPU: always eager
    engines = data["throughput_engines"]
    razor_geo = analytic.geometry(
        RazorProfile.load(data["meta"]["profile"]),
        "float32",
        window=64,
        stock_block_size=engines["stock"]["block_size"],
    )
    assert engines["razor"]["block_size"] == razor_geo.reported_block_size  # the razor check ran

"""``razor-vllm bench --model synthetic:NAME``: model shapes with random weights and a drawn profile,
and the throughput part's "does this batch fit" rule (measured through real engines in
tests/engine/test_bench_synthetic_engine.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from razor_vllm.bench import analytic, synthetic
from razor_vllm.bench.command import _each_backend, _fits, add_arguments
from razor_vllm.cli import main
from razor_vllm.config import RazorProfile


def run_bench(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    rc = main(["bench", *args, "--out", str(out), "--format", "plain"])
    return rc, json.loads(out.read_text()) if out.exists() else {}


def test_llama_8b_shape_and_profile(tmp_path, default_model_dir):
    rc, data = run_bench(
        tmp_path, "--model", "synthetic:llama-3-8b", "--skip-engine", "--dtype", "bfloat16", "--contexts", "8k,32k"
    )
    assert rc == 0
    meta, a = data["meta"], data["analytic"]
    assert meta["synthetic"] == dict(shape="synthetic:llama-3-8b", retrieval_share=0.15, load_format="dummy")
    # Llama-3-8B in bf16: 32 layers x 8 KV heads x (K+V) x 128 x 2 bytes = 128 KiB per token.
    assert a["bytes_per_token"]["stock"] == 32 * 8 * 2 * 128 * 2
    assert (a["window"], a["sink"]) == (1024, 4)
    config = json.loads(
        (synthetic.make_checkpoint("llama-3-8b", tmp_path, default_model_dir) / "config.json").read_text()
    )
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (32, 8, 128)
    assert not list(tmp_path.glob("llama-3-8b/*.safetensors"))  # weights come from load_format=dummy

    profile = RazorProfile.load(meta["model"] + "/razor-profile-share0.15-seed0.yaml")
    assert profile.num_retrieval_heads == round(0.15 * 256) == 38
    assert (profile.model.num_layers, profile.model.num_kv_heads, profile.model.head_size) == (32, 8, 128)
    assert 38 * 2 * 128 * 2 == a["bytes_per_token"]["retrieval_pool"]
    again = synthetic.make_profile(meta["model"], 0.15, 0, 4, 1024, "test")
    other = synthetic.make_profile(meta["model"], 0.15, 1, 4, 1024, "test")
    assert again.retrieval_heads == profile.retrieval_heads != other.retrieval_heads
    # Razor's gain grows with context: at 32k a request holds far less than stock's.
    assert a["requests"][1]["ratio_steady"] > a["requests"][0]["ratio_steady"] > 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "synthetic:llama-9000"], "unknown synthetic shape 'llama-9000'"),
        (["--model", "synthetic:tiny", "--retrieval-share", "1.5"], "--retrieval-share must be in [0, 1]"),
        (["--model", "synthetic:tiny", "--profile", "smollm2-135m-instruct"], "--profile cannot be combined"),
        (["--stock-backend", "FLASH_ATTENTION"], "--stock-backend FLASH_ATTENTION: not one of vLLM's attention"),
        (["--stock-backend", "razor"], "--stock-backend razor: not one of"),
    ],
)
def test_bad_synthetic_options(tmp_path, capsys, args, message):
    rc, _ = run_bench(tmp_path, *args, "--skip-engine")
    assert rc == 2
    assert message in capsys.readouterr().err


def test_fit_rule(tmp_path, default_model_dir):
    model_dir = synthetic.make_checkpoint("llama-3-8b", tmp_path, default_model_dir)
    profile = synthetic.make_profile(model_dir, 0.15, 0, 4, 1024, "test")
    geo = analytic.geometry(profile, "bfloat16", stock_block_size=128)
    gpu = geo.with_stock_block_size(16)  # what an engine with vLLM's GPU block size plans
    assert gpu == analytic.geometry(profile, "bfloat16", stock_block_size=16)
    tokens, chunk = 32768 + 100, 512
    blocks = 2 * gpu.stock_blocks(tokens)
    engine = dict(num_gpu_blocks=blocks, block_size=16)
    stock, razor = _fits(geo, "stock", chunk), _fits(geo, "razor", chunk, vllm_block_size=16)
    assert stock(32768, 2, 100, engine) is None
    assert stock(32768, 3, 100, engine) == f"needs {3 * gpu.stock_blocks(tokens)} blocks, the KV cache has {blocks}"
    # The same memory in razor pages holds several times as many 32k requests: with exact prefill
    # (the default) one request's prompt transient (about stock's own cache for it) plus the others'
    # steady pages; compressed prefill admits within the window and holds more.
    razor_engine = dict(
        num_gpu_blocks=gpu.razor_num_blocks(blocks * gpu.stock_block_bytes), block_size=gpu.reported_block_size
    )  # what a razor engine reports
    assert razor(32768, 6, 100, razor_engine) is None
    assert razor(32768, 8, 100, razor_engine) is not None
    assert razor(32768, 64, 100, razor_engine) is not None
    compressed = analytic.geometry(profile, "bfloat16", stock_block_size=128, exact_prefill=False)
    assert _fits(compressed, "razor", chunk, vllm_block_size=16)(32768, 8, 100, razor_engine) is None
    # An engine laid out from another vLLM block size: no guess, the point runs.
    assert razor(32768, 64, 100, dict(razor_engine, block_size=razor_engine["block_size"] + 1)) is None


@pytest.mark.parametrize("together", [False, True])
def test_a_failing_engine_is_recorded_and_the_other_still_runs(tmp_path, capsys, together):
    """``_each_backend``: the engine that fails is recorded as an error (named in the output) and
    counted; one engine after the other, stock still gets its result; both up at once (--interleave),
    the failure is both's."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--window", "64"])
    args.load_format = None
    calls: list[dict] = []

    def measure(kwargs_by_backend):
        calls.append(kwargs_by_backend)
        if "razor" in kwargs_by_backend:
            raise RuntimeError("razor could not start")
        return {b: dict(points=1) for b in kwargs_by_backend}

    results, failures = _each_backend(
        "throughput", args, tmp_path, "float32", dict(max_model_len=64), measure, None, together
    )
    assert [sorted(c) for c in calls] == ([["razor", "stock"]] if together else [["stock"], ["razor"]])
    assert all(kw["max_model_len"] == 64 for c in calls for kw in c.values())
    assert calls[-1]["razor"]["attention_backend"] == "razor" and "attention_backend" not in calls[0]["stock"]
    assert results["razor"] == dict(error="RuntimeError: razor could not start")
    assert results["stock"] == (results["razor"] if together else dict(points=1))
    assert failures == (2 if together else 1)
    assert "razor could not start" in capsys.readouterr().err

"""`GET /razor/status` and razor's Prometheus gauges on a real `vllm serve` (one server, ~30 s).

The server (shared with tests/serving/test_server.py: the ``razor_server`` fixture, settings in
tests/shared_server.py) runs with ``VLLM_PLUGINS=razor,razor_status`` (endpoint plugins load only when
allowlisted, and the allowlist then filters the general plugins too) and a window override, and
the status is checked against the bundled profile, against the worker's "RAZOR: ..." start-up log
line (the same layout computed in another process), and against /metrics. Blocks in use per pool,
read from the engine core, are followed through one long request and back to 0; and a seeded
request whose prompt is prefilled in chunks (fatal to vLLM 0.32's CPU runner) is answered.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.request
from argparse import Namespace
from types import SimpleNamespace

import pytest

from razor_vllm.serve import harness

from shared_server import MAX_MODEL_LEN, MODEL, WINDOW

pytestmark = [pytest.mark.engine, pytest.mark.default_model]


def profile() -> dict:
    from razor_vllm.config import resolve_profile

    return resolve_profile(MODEL).model_dump()


@pytest.fixture(scope="module")
def server(razor_server):
    return razor_server


@pytest.fixture(scope="module")
def status(server) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(server.url + "/razor/status", timeout=30) as resp:
        code, ctype, body = resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    assert code == 200 and ctype.startswith("application/json"), (code, ctype, body)
    return json.loads(body)


def test_status_matches_profile(status):
    prof = profile()
    assert status["razor"] is True
    assert status["model"] == MODEL
    assert status["profile"]["source"].startswith("bundled profile for LlamaForCausalLM")
    assert status["profile"]["fingerprint"] == prof["model"]
    # The served model's fingerprint equals the profile's wherever the profile pins a field (an
    # unset context_length / rope_scaling matches any checkpoint of the shape: config.py).
    served = status["served_fingerprint"]
    assert {k: served[k] for k, v in prof["model"].items() if v is not None} == {
        k: v for k, v in prof["model"].items() if v is not None
    }
    assert (served["context_length"], served["rope_scaling"]) == (8192, "default")
    heads = status["retrieval_heads"]
    assert heads["per_layer"] == [sorted(h) for h in prof["retrieval_heads"]]
    assert (heads["count"], heads["total"]) == (35, 90)  # the shipped profile (calibrated share)
    assert heads["share"] == pytest.approx(35 / 90)
    assert status["sink"] == prof["sink"] == 4
    assert prof["window"] == 128 and status["window"] == WINDOW == 96  # the --additional-config override shows
    assert status["max_model_len"] == MAX_MODEL_LEN
    assert status["kv_cache_dtype"] == "float32"
    assert status["tensor_parallel_size"] == 1


def test_bytes_per_token_and_ratio(status, server):
    fp = status["served_fingerprint"]
    head_token = 2 * fp["head_size"] * 4  # K and V of one head and token, fp32
    bpt = status["kv_bytes_per_token"]
    assert bpt["stock"] == fp["num_layers"] * fp["num_kv_heads"] * head_token == 46080
    pools = status["pools"]
    retrieval, local = pools["retrieval"], pools["local"]
    assert (retrieval["heads"], local["heads"]) == (35, 55)
    assert 35 <= retrieval["pool_heads"] and 55 <= local["pool_heads"]  # plus padding heads, if any
    assert bpt["retrieval"] == retrieval["pool_heads"] * head_token
    local_slots = local["pool_heads"] * (local["block_size"] + local["tail_slots"]) + local["page_padding_slots"]
    assert bpt["local"] == local_slots * head_token // local["block_size"]
    assert retrieval["page_bytes"] == local["page_bytes"]  # one block pool, equal pages

    # The worker (another process) logged the same pools.
    log = server.log_text()
    line = next(ln for ln in log.splitlines() if "RAZOR: profile" in ln)
    m = re.search(r"(\d+)/(\d+) KV heads retrieval", line)
    assert (int(m.group(1)), int(m.group(2))) == (35, 90), line
    assert f"sink=4 window={WINDOW}" in line, line
    m = re.search(r"retrieval pool (\d+) B/token \(block (\d+)\)", line)
    assert (int(m.group(1)), int(m.group(2))) == (bpt["retrieval"], retrieval["block_size"]), line
    m = re.search(r"local pool (\d+) B/token .*\(block (\d+)\)", line)
    assert (int(m.group(1)), int(m.group(2))) == (bpt["local"], local["block_size"]), line

    # Compression at max_model_len: stock blocks vs razor's retrieval pages + sink and window blocks.
    L, sb = MAX_MODEL_LEN, status["stock_block_size"]
    stock = math.ceil(L / sb) * sb * bpt["stock"]
    lb = local["block_size"]
    local_blocks = max(1, math.ceil(4 / lb)) + math.ceil((WINDOW - 1) / lb) + 1
    razor = (math.ceil(L / retrieval["block_size"]) + local_blocks) * retrieval["page_bytes"]
    # Exact prefill (the default): a request at max_model_len holds every local block while its
    # prompt prefills; admission reserves that peak.
    admission = (math.ceil(L / retrieval["block_size"]) + math.ceil(L / lb)) * retrieval["page_bytes"]
    assert status["kv_bytes_at_max_model_len"] == {"razor": razor, "razor_admission": admission, "stock": stock}
    assert (status["prefill"], status["window_rule"]) == ("exact", "fixed")
    assert status["compression_ratio"] == pytest.approx(stock / razor)
    # fp32, prefix caching on (64-token retrieval blocks): 16 x 128 stock tokens against 32 retrieval
    # pages + 5 local blocks, 2.22x; at most 90 / 35, what 35 whole heads of 90 allow.
    assert 2.2 < status["compression_ratio"] < 90 / 35


def unlabelled(m: dict[str, float], name: str) -> float:
    """The value of a metric exported once, without labels."""
    assert name in m and not any(key.startswith(name + "{") for key in m), sorted(k for k in m if name in k)
    return m[name]


def test_metrics_agree_with_status(server, status):
    m = server.metrics()
    per_token = harness.labelled(m, "razor_kv_bytes_per_token")
    assert per_token == {p: float(v) for p, v in status["kv_bytes_per_token"].items()}, per_token
    assert unlabelled(m, "razor_compression_ratio") == pytest.approx(status["compression_ratio"])
    assert unlabelled(m, "razor_retrieval_heads") == 35.0
    info = {key: value for key, value in m.items() if key.startswith("razor_profile_info{")}
    assert list(info.values()) == [1.0] and m["razor_profile_info"] == 1.0, info
    labels = next(iter(info))
    assert f'source="{status["profile"]["source"]}"' in labels and f'model="{MODEL}"' in labels, labels
    assert "vllm:num_requests_running" in m  # the same registry as vLLM's own metrics


def test_status_route_is_read_only(server):
    code, _ = harness.post_json(server.url + "/razor/status", {})
    assert code == 405


def test_not_razor_answers_false():
    """In-process: the plugin on a server whose backend is not razor (or with no engine) says so."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from razor_vllm.serve.status import RazorStatusPlugin, make_plugin

    plugin = make_plugin()
    assert isinstance(plugin, RazorStatusPlugin) and plugin.name == "razor_status"
    for engine_client in (
        None,
        SimpleNamespace(vllm_config=SimpleNamespace(attention_config=SimpleNamespace(backend=None))),
    ):
        app = FastAPI()
        plugin.attach_router(app)
        asyncio.run(plugin.init_state(engine_client, app.state, Namespace()))
        with TestClient(app) as client:
            resp = client.get("/razor/status")
        assert resp.status_code == 200 and resp.json() == {"razor": False}


# -- blocks in use per pool (read from the engine core) ---------------------------------------------


def usage_now(server) -> tuple[dict, dict[str, float]]:
    """(/razor/status usage section, razor_blocks_in_use samples by pool from /metrics)."""
    _, body = server.get("/razor/status", timeout=30)
    gauges = harness.labelled(server.metrics(), "razor_blocks_in_use")
    return json.loads(body)["usage"], gauges


def assert_idle(server, usage: dict, gauges: dict) -> None:
    assert usage["blocks_in_use"] == {"retrieval": 0, "local": 0} and gauges == {"retrieval": 0, "local": 0}, usage
    assert (usage["requests"], usage["free_blocks"]) == (0, usage["num_blocks"] - 1), usage  # all but the null block


def test_blocks_in_use_per_pool_during_a_long_request_and_when_idle(server, status):
    """Retrieval blocks grow with the sequence, local blocks stay at sink + window; 0 again when idle."""
    assert_idle(server, *usage_now(server))
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 130)  # 1300 tokens, 3 chunks of 512
    with server.client(300) as client:
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=64, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        with stream:
            for _ in zip(range(4), stream):
                pass  # decoding now (the prompt is in the cache); 60 tokens to go
            usage, gauges = usage_now(server)
    # leaving the stream closed the connection: vLLM aborts the request

    retrieval, local = status["pools"]["retrieval"], status["pools"]["local"]
    blocks = usage["blocks_in_use"]
    assert usage["requests"] == 1 and usage["tokens"] >= 1300, usage
    tokens = usage["tokens"]  # computed; the scheduler may already hold a block for the next token
    rb = retrieval["block_size"]
    assert math.ceil(tokens / rb) <= blocks["retrieval"] <= math.ceil((tokens + 1) / rb), usage
    # the local pool keeps the sink block and the blocks spanning the window, not the sequence
    lb = local["block_size"]
    steady_local = max(1, math.ceil(status["sink"] / lb)) + math.ceil((WINDOW - 1) / lb) + 1
    assert steady_local - 1 <= blocks["local"] <= steady_local + 1 < math.ceil(tokens / lb), usage
    # both pools share vLLM's one block pool: together they are all its used blocks
    assert blocks["retrieval"] + blocks["local"] == usage["num_blocks"] - 1 - usage["free_blocks"], usage
    assert usage["kv_bytes"]["razor"] == (blocks["retrieval"] + blocks["local"]) * status["page_bytes_all_ranks"]
    stock_block = status["stock_block_size"]
    stock_bytes = math.ceil(tokens / stock_block) * stock_block * status["kv_bytes_per_token"]["stock"]
    assert usage["kv_bytes"]["stock"] == stock_bytes, usage
    assert usage["saving"] == pytest.approx(stock_bytes / usage["kv_bytes"]["razor"]), usage
    assert usage["saving"] > 2, usage
    # /metrics, scraped just after, asked the engine core again (a decode step or two may lie between)
    assert 0 <= gauges["retrieval"] - blocks["retrieval"] <= 1, (gauges, blocks)
    assert abs(gauges["local"] - blocks["local"]) <= 1, (gauges, blocks)

    harness.wait_idle(server.url, timeout=30)  # until the abort reached the engine core and freed both pools
    assert_idle(server, *usage_now(server))


# -- seeded sampling with a prompt prefilled in chunks (vLLM 0.32's CPU runner would die) -----------


def test_seeded_request_with_a_chunked_prompt_is_answered_and_the_server_keeps_serving(server):
    filler = " ".join(["The quick brown fox jumps over the lazy dog."] * 100)  # > --max-num-batched-tokens
    body = {
        "model": MODEL,
        "prompt": filler + "\nThe capital of France is",
        "max_tokens": 8,
        "temperature": 0.3,
        "seed": 11,
    }
    code, first = harness.post_json(server.url + "/v1/completions", body, timeout=300)
    assert code == 200, first
    assert first["usage"]["prompt_tokens"] > 512, first["usage"]
    text = first["choices"][0]["text"]
    assert "Paris" in text, text
    code, again = harness.post_json(server.url + "/v1/completions", body, timeout=300)
    assert code == 200 and again["choices"][0]["text"] == text  # the seed decides (chunking does not:
    # tests/engine/test_reliability.py)

    code, plain = harness.post_json(
        server.url + "/v1/completions",
        {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
    )
    assert code == 200 and plain["choices"][0]["text"].startswith(" Paris"), plain
    assert server.process.poll() is None

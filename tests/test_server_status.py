"""`GET /razor/status` and razor's Prometheus gauges on a real `vllm serve` (one server, ~30 s).

The server runs with ``VLLM_PLUGINS=razor,razor_status`` (endpoint plugins load only when
allowlisted, and the allowlist then filters the general plugins too) and a window override, and
the status is checked against the bundled profile, against the worker's "RAZOR: ..." start-up log
line (the same layout computed in another process), and against /metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.error
import urllib.request
from argparse import Namespace
from types import SimpleNamespace

import pytest
import yaml

from server_utils import vllm_server

pytestmark = [pytest.mark.engine, pytest.mark.default_model]

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 2048
WINDOW = 128  # overrides the profile's 256

SERVER_ARGS = [
    "--attention-backend", "razor",
    "--dtype", "float32",
    "--max-model-len", str(MAX_MODEL_LEN),
    "--max-num-batched-tokens", "512",
    "--max-num-seqs", "8",
    "--kv-cache-memory-bytes", str(128 << 20),
    "--served-model-name", MODEL,
    "--seed", "0",
    "--enforce-eager",
    "--additional-config", json.dumps({"razor": {"window": WINDOW}}),
]  # fmt: skip

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, str, str]:
    with _OPENER.open(url, timeout=30) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def profile() -> dict:
    from razor_vllm.config import resolve_profile

    return resolve_profile(MODEL).model_dump()


def samples(metrics_text: str, name: str) -> dict[str, float]:
    """{label part ('' when none): value} of every sample of `name`."""
    out = {}
    for line in metrics_text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {"VLLM_PLUGINS": "razor,razor_status"}
    with vllm_server(default_model_dir, SERVER_ARGS, log_path=log_path, timeout=600, env=env) as srv:
        yield srv
        assert srv.process.poll() is None, "the server died during the tests" + srv.log_text()[-4000:]


@pytest.fixture(scope="module")
def status(server) -> dict:
    code, ctype, body = get(server.url + "/razor/status")
    assert code == 200 and ctype.startswith("application/json"), (code, ctype, body)
    return json.loads(body)


def test_status_matches_profile(status):
    prof = profile()
    assert status["razor"] is True
    assert status["model"] == MODEL
    assert status["profile"]["source"].startswith("bundled profile for LlamaForCausalLM")
    assert status["profile"]["fingerprint"] == prof["model"]
    assert status["served_fingerprint"] == prof["model"]
    heads = status["retrieval_heads"]
    assert heads["per_layer"] == [sorted(h) for h in prof["retrieval_heads"]]
    assert (heads["count"], heads["total"]) == (14, 90)
    assert heads["share"] == pytest.approx(14 / 90)
    assert status["sink"] == prof["sink"] == 4
    assert prof["window"] == 256 and status["window"] == WINDOW  # the --additional-config override shows
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
    assert (retrieval["heads"], local["heads"]) == (14, 76)
    assert 14 <= retrieval["pool_heads"] and 76 <= local["pool_heads"]  # plus padding heads, if any
    assert bpt["retrieval"] == retrieval["pool_heads"] * head_token
    assert bpt["local"] == local["pool_heads"] * (local["block_size"] + local["tail_slots"]) * head_token // local[
        "block_size"
    ]
    assert retrieval["page_bytes"] == local["page_bytes"]  # one block pool, equal pages

    # The worker (another process) logged the same pools.
    log = server.log_text()
    line = next(ln for ln in log.splitlines() if "RAZOR: profile" in ln)
    m = re.search(r"(\d+)/(\d+) KV heads retrieval", line)
    assert (int(m.group(1)), int(m.group(2))) == (14, 90), line
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
    assert status["kv_bytes_at_max_model_len"] == {"razor": razor, "stock": stock}
    assert status["compression_ratio"] == pytest.approx(stock / razor)
    assert 3 < status["compression_ratio"] < 90 / 14


def test_metrics_agree_with_status(server, status):
    _, _, text = get(server.url + "/metrics")
    per_token = samples(text, "razor_kv_bytes_per_token")
    assert per_token == {f'{{pool="{p}"}}': float(v) for p, v in status["kv_bytes_per_token"].items()}, per_token
    assert samples(text, "razor_compression_ratio") == {"": pytest.approx(status["compression_ratio"])}
    assert samples(text, "razor_retrieval_heads") == {"": 14.0}
    info = samples(text, "razor_profile_info")
    assert list(info.values()) == [1.0], info
    labels = next(iter(info))
    assert f'source="{status["profile"]["source"]}"' in labels and f'model="{MODEL}"' in labels, labels
    assert "vllm:num_requests_running" in text  # the same registry as vLLM's own metrics


def test_status_route_is_read_only(server):
    req = urllib.request.Request(server.url + "/razor/status", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        _OPENER.open(req, timeout=30)
    assert err.value.code == 405


def test_not_razor_answers_false():
    """In-process: the plugin on a server whose backend is not razor (or with no engine) says so."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from razor_vllm.serve.status import RazorStatusPlugin, make_plugin

    plugin = make_plugin()
    assert isinstance(plugin, RazorStatusPlugin) and plugin.name == "razor_status"
    for engine_client in (None, SimpleNamespace(vllm_config=SimpleNamespace(attention_config=SimpleNamespace(backend=None)))):
        app = FastAPI()
        plugin.attach_router(app)
        asyncio.run(plugin.init_state(engine_client, app.state, Namespace()))
        with TestClient(app) as client:
            resp = client.get("/razor/status")
        assert resp.status_code == 200 and resp.json() == {"razor": False}

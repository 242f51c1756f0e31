"""The load-test command (``python -m loadtest``) end to end (the pieces it checks answers with, without
a server: tests/tools/test_loadtest_parts.py).

The end-to-end test runs the real command: razor then stock ``vllm serve`` on 127.0.0.1, locust for
15 s each with 2 users and tiny outputs (about 2 minutes in all), and reads what it wrote. Near
prompts stay inside razor's window plus sinks (<= 260 tokens), where razor keeps every token and
must answer exactly like stock; far prompts (600-1200 tokens) may lose the key under razor, and this
135M model misses some keys even with stock attention: a wrong answer must be counted as such,
never as an error.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import summary
from loadtest.workload import answer_digits

ROOT = Path(__file__).resolve().parents[2]

CHAT_MAX_TOKENS = 8
PASSKEY_MAX_TOKENS = 10


@pytest.mark.engine
@pytest.mark.default_model
def test_sigterm_stops_the_server_it_started(tmp_path, default_model_dir):
    """No orphan: SIGTERM to the runner while its server starts ends the server's whole process group."""
    import psutil

    cmd = [sys.executable, "-m", "loadtest", "--backends", "razor", "--run-time", "5s", "--out", str(tmp_path)]
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        children: list = []
        while time.monotonic() < deadline and not any("VLLM::EngineCore" in _name(c) for c in children):
            time.sleep(0.5)  # until vllm serve has spawned its engine core
            children = psutil.Process(runner.pid).children(recursive=True)
        assert any("vllm" in " ".join(_cmdline(c)) for c in children), [_cmdline(c) for c in children]
        runner.send_signal(signal.SIGTERM)
        runner.communicate(timeout=120)
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [_cmdline(p) for p in alive]
        assert runner.returncode != 0
    finally:
        if runner.poll() is None:
            runner.kill()


def _name(p) -> str:
    try:
        return p.name() + " " + " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone already
        return ""


def _cmdline(p) -> list:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001
        return []


@pytest.fixture(scope="module")
def loadtest_run(tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("loadtest")
    cmd = [
        sys.executable,
        "-m",
        "loadtest",
        "--users",
        "2",
        "--spawn-rate",
        "2",
        "--run-time",
        "15s",
        "--chat-max-tokens",
        str(CHAT_MAX_TOKENS),
        "--max-model-len",
        "2048",
        "--kv-mib",
        "256",
        "--near-tokens",
        "100-230",
        # Pinned to the window shipped before the calibrated profile (128): near prompts of up to 230
        # tokens plus their answer then fit in sinks + window, where razor must answer like stock.
        "--window",
        "256",
        "--far-tokens",
        "600-1200",
        "--stream-share",
        "0.5",
        "--format",
        "plain",
        "--out",
        str(out),
    ]
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = runner.communicate(timeout=900)  # about 2 minutes on a quiet 2-core machine
    except subprocess.TimeoutExpired:
        runner.terminate()  # SIGTERM: the runner stops its servers (their own process groups) on the way out
        runner.communicate(timeout=120)
        raise
    return subprocess.CompletedProcess(cmd, runner.returncode, stdout, stderr), out


@pytest.mark.engine
@pytest.mark.default_model
def test_loadtest_command_runs_razor_and_stock(loadtest_run):
    proc, out = loadtest_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "summary.json").read_text())
    assert list(results["backends"]) == ["razor", "stock"]
    # The table went to stdout with both backends and the ratio column; the Markdown copy too.
    assert "razor/stock" in proc.stdout and "output tokens/s" in proc.stdout
    assert "| requests/s |" in (out / "summary.md").read_text()

    for backend, r in results["backends"].items():
        assert r["server_alive_after_run"], backend
        razor_args = "--attention-backend" in r["server_args"]
        assert razor_args == (backend == "razor")
        assert bool(r["server"]["razor_status"]["razor"]) == (backend == "razor")  # what the server really ran
        total = r["locust"]["total"]
        assert total["requests"] > 0 and total["requests_per_s"] > 0, (backend, total)
        assert total["p50_ms"] > 0 and total["p95_ms"] >= total["p50_ms"]
        assert total["ttft"]["requests"] > 0 and total["ttft"]["p50_ms"] > 0, (backend, total)
        assert total["failures"] == total["wrong_answers"], (backend, r["locust"]["errors"])
        assert total["output_tokens"] > 0 and total["output_tokens_per_s"] > 0
        idle = r["server"]["idle"]  # the pools return to empty once idle
        assert (idle["running"], idle["waiting"], idle["kv_cache_usage"]) == (0.0, 0.0, 0.0), (backend, idle)
        assert all(v == 0.0 for v in idle.get("razor_blocks_in_use", {}).values()), (backend, idle)
        assert r["server"]["peak_running"] >= 1

        entries = r["locust"]["entries"]
        for name, e in entries.items():
            # Token counts come from each response's usage and respect max_tokens.
            cap = CHAT_MAX_TOKENS if name.startswith("chat") else PASSKEY_MAX_TOKENS
            assert 0 < e["output_tokens"] <= cap * e["responses"], (backend, name, e)
            if name.endswith("stream"):
                assert e["ttft"] and e["ttft"]["requests"] > 0, (backend, name)
        checked = {n: e["checks"] for n, e in entries.items() if n.startswith("passkey")}
        assert sum(c["right"] + c["wrong"] for c in checked.values()) > 0, (backend, entries.keys())
        for c in checked.values():
            for a in c["answers"]:  # a wrong answer really is wrong, a right one really is right
                assert a["right"] == (answer_digits(a["got"] or "") == a["expected"]), a
            assert c["wrong"] == sum(not a["right"] for a in c["answers"])

        # locust's own CSVs are there, with whole requests (POST) and TTFT rows.
        with open(out / f"{backend}_stats.csv") as f:
            rows = list(csv.DictReader(f))
        types = {row["Type"] for row in rows}
        assert {"POST", "TTFT"} <= types, types
        csv_posts = sum(int(row["Request Count"]) for row in rows if row["Type"] == "POST")
        # The CSV is written as locust stops; a request finishing at that moment may miss it.
        assert 0 < csv_posts <= total["requests"], (csv_posts, total["requests"])
        assert (out / f"{backend}_failures.csv").exists() and (out / f"{backend}.html").exists()

    # Near prompts fit in razor's sinks + window, where razor keeps every token: each prompt both
    # servers answered (user i's n-th request is the same prompt in both runs) gets the same answer.
    def near_answers(backend):
        entries = results["backends"][backend]["locust"]["entries"]
        return {
            (a["user"], a["n"]): a
            for name, e in entries.items()
            if name.startswith("passkey near")
            for a in e["checks"]["answers"]
        }

    razor, stock = near_answers("razor"), near_answers("stock")
    common = razor.keys() & stock.keys()
    assert common, (razor, stock)
    for key in common:
        assert razor[key]["expected"] == stock[key]["expected"]  # the same prompt
        assert razor[key]["prompt_tokens"] <= 260
        assert razor[key]["got"] == stock[key]["got"], (razor[key], stock[key])

    tables = summary.tables(results)
    assert [row[0] for row in tables[0].rows][:3] == ["requests completed", "requests/s", "latency p50 (ms)"]

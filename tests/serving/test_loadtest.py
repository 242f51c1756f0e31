"""The load-test command (``python -m loadtest``) end to end, and the pieces it checks answers with.

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

from loadtest import run, soak, summary
from loadtest.workload import answer_digits, default_ranges, parse_token_range, passkey_prompt

ROOT = Path(__file__).resolve().parents[2]

CHAT_MAX_TOKENS = 8
PASSKEY_MAX_TOKENS = 10


# -- the pieces -------------------------------------------------------------------------------------------


def test_passkey_check_wants_exactly_the_key():
    p = passkey_prompt("7481923", tokens=300, depth=0.5)
    assert p.prompt.endswith("The pass key is") and "The pass key is 7481923." in p.prompt
    assert p.check(" 7481923. Remember it")
    assert not p.check(" 748192. Remember it")  # razor's typical near miss on this model (NOTES)
    assert not p.check(" 74819234")
    assert not p.check(" The pass key is")
    assert answer_digits("no digits") is None


def test_passkey_prompt_length_tracks_the_request():
    short, long = passkey_prompt("1", 200, 0.1), passkey_prompt("1", 2000, 0.9)
    assert abs(short.approx_tokens - 200) <= 24 and abs(long.approx_tokens - 2000) <= 24
    assert short.prompt.index("pass key is 1") < len(short.prompt) * 0.25
    assert long.prompt.index("pass key is 1") > len(long.prompt) * 0.85


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="token range"):
        parse_token_range("512-128")
    with pytest.raises(ValueError, match="digits"):
        passkey_prompt("abc", 100, 0.5)
    with pytest.raises(ValueError, match="far past the window"):
        default_ranges(window=256, max_model_len=512)
    assert default_ranges(256, 4096) == ((128, 512), (1024, 4022))
    assert run.parse_duration("1m30s") == 90 and run.parse_duration("45") == 45
    for bad in ("", "2x", "0s"):
        with pytest.raises(Exception, match="duration"):
            run.parse_duration(bad)
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--backends", "razor,vllm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "subset of razor,stock" in result.stderr


def test_soak_catalogue_fits_the_context_and_checks_fail_on_a_wrong_answer():
    assert {i.name for i in soak.catalogue(4096)} >= {"passkey far 2500", "chat 0", "story 2"}
    small = soak.catalogue(1024)
    assert all(int(i.name.split()[-1]) + 100 <= 1024 for i in small if i.name.startswith("passkey"))
    good = {
        "cancel_share": 0.3,
        "expected": {"a": {}},
        "alive_after_soak": True,
        "alive_at_end": True,
        "health": True,
        "after_idle_same_answers": 1,
        "stats": {
            "errors": 0,
            "completed": 5,
            "correct": 5,
            "cancelled_mid_stream": 2,
            "cancelled_before_first_token": 1,
            "cancelled_full_tokens": 90,
        },
        "server": {"generated_for_cancelled": 40},
        "idle": {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0},
    }
    assert all(ok for _, ok in soak.checks(good))
    wrong = {**good, "stats": {**good["stats"], "correct": 4}}
    leaked = {**good, "idle": {**good["idle"], "razor_blocks_in_use": {"local": 2.0}}}
    not_aborted = {**good, "server": {"generated_for_cancelled": 90}}
    for bad in (wrong, leaked, not_aborted):
        assert not all(ok for _, ok in soak.checks(bad))


# -- the real command ------------------------------------------------------------------------------------


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

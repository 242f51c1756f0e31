"""The server harness (razor_vllm/serve/harness.py) without an engine: the wire and metrics readers, the
start-up phases, stopping a whole process group; and the conftest check of the ``engine`` marker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import psutil
import pytest

from razor_vllm.serve import harness
from razor_vllm.serve.harness import StreamError, StreamReader

pytest_plugins = ["pytester"]


def test_stream_reader_assembles_text_and_refuses_broken_streams():
    reader = StreamReader(chat=True)
    lines = [
        b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}',
        b"",
        b'data: {"choices": [{"delta": {"content": "Par"}}]}',
        b'data: {"choices": [{"delta": {"content": "is"}, "finish_reason": "stop"}]}',
        b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}',
        b"data: [DONE]",
    ]
    added = [reader.feed(line) for line in lines]
    reader.finish()
    assert added == ["", None, "Par", "is", "", None]
    assert (reader.text, reader.finish_reason, reader.usage["completion_tokens"]) == ("Paris", "stop", 2)

    cut = StreamReader(chat=False)
    cut.feed(b'data: {"choices": [{"text": " 12"}]}')
    with pytest.raises(StreamError, match="without \\[DONE\\]"):
        cut.finish()
    with pytest.raises(StreamError, match="error event"):
        StreamReader(chat=False).feed(b'data: {"error": {"message": "engine dead", "code": 500}}')


def test_idle_means_every_block_back_in_the_free_pool():
    text = (
        "\n".join(
            [
                "# TYPE vllm:num_requests_running gauge",
                'vllm:num_requests_running{engine="0",model_name="m"} 0.0',
                "# TYPE vllm:num_requests_waiting gauge",
                'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0',
                "# TYPE vllm:kv_cache_usage_perc gauge",
                'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0',
                "# TYPE razor_blocks_in_use gauge",
                'razor_blocks_in_use{pool="retrieval"} 0.0',
                'razor_blocks_in_use{pool="local"} 1.0',
                "# TYPE vllm:request_success counter",
                'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0',
                'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0',
            ]
        )
        + "\n"
    )
    m = harness.parse_metrics(text)
    assert m["vllm:request_success_total"] == 5.0 and m['vllm:request_success_total{finished_reason="stop"}'] == 3.0
    r = harness.reading(m)
    assert r["razor_blocks_in_use"] == {"retrieval": 0.0, "local": 1.0}
    assert not harness.is_idle(r)  # vLLM's usage gauge says 0, but a local-pool block is still held
    assert harness.is_idle(harness.reading(harness.parse_metrics(text.replace("} 1.0", "} 0.0"))))
    assert not harness.is_idle(harness.reading({}))  # no KV gauge at all is not "empty"


def test_streamed_collects_openai_chunks_of_both_apis():
    """The openai client's chunks: chat deltas and completion texts, the finish reason, the usage block."""
    from openai.types.chat import ChatCompletionChunk

    chat = harness.Streamed()
    for delta, finish in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Par"}, None),
        ({"content": "is"}, "stop"),
    ):
        chunk = ChatCompletionChunk.model_validate(
            {
                "id": "c",
                "created": 0,
                "model": "m",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )
        chat.add(chunk)
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    chat.add(
        ChatCompletionChunk.model_validate(
            {"id": "c", "created": 0, "model": "m", "object": "chat.completion.chunk", "choices": [], "usage": usage}
        )
    )
    assert (chat.text, chat.pieces, chat.finish_reason) == ("Paris", ["Par", "is"], "stop")
    assert chat.usage["completion_tokens"] == 2 and len(chat.times) == 2

    # Completion chunks (built by the client without validation: finish_reason None until the last)
    completion = harness.Streamed()
    for text, finish in ((" 74", None), ("81923", "length")):
        completion.add(SimpleNamespace(usage=None, choices=[SimpleNamespace(text=text, finish_reason=finish)]))
    assert (completion.text, completion.finish_reason, completion.usage) == (" 7481923", "length", None)


def test_startup_phase_follows_the_log():
    assert harness.startup_phase("") == "starting vllm serve (importing vLLM)"
    log = "INFO [model.py:733] Resolved architecture: LlamaForCausalLM\n"
    assert harness.startup_phase(log) == "reading the model config"
    log += "(Worker pid=1) INFO [cpu_model_runner.py:87] Warming up model for the compilation...\n"
    assert harness.startup_phase(log).startswith("compiling and warming up")
    log += "(APIServer pid=1) INFO:     Application startup complete.\n"
    assert harness.startup_phase(log) == "answering /health"


def test_cli_args_pairs_options_and_drops_none():
    args = harness.cli_args({"--dtype": "float32", "--seed": 0, "--additional-config": None}, "--enforce-eager")
    assert args == ["--dtype", "float32", "--seed", "0", "--enforce-eager"]


def test_stop_ends_the_whole_process_group():
    """A process and the child it spawned (an engine core, in vLLM's case) both end; nothing is left."""
    sleeper = "import time; time.sleep(600)"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(600)"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (children := psutil.Process(leader.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children, "the child never started"
    harness.stop(leader, timeout=10)
    assert leader.poll() is not None
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


def test_a_dead_server_is_reported_with_its_log(tmp_path):
    """vllm serve exiting before /health answers: a RuntimeError that carries the tail of its log."""
    process = subprocess.Popen(
        [sys.executable, "-c", "print('boom: no such model'); raise SystemExit(3)"],
        stdout=open(tmp_path / "log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = harness.Server(
        url=f"http://{harness.HOST}:{harness.free_port()}", port=0, log_path=tmp_path / "log", process=process
    )
    said = []
    with pytest.raises(RuntimeError, match="exited with code 3") as err:
        harness.wait_healthy(server, timeout=60, progress=said.append)
    assert "boom: no such model" in str(err.value)
    harness.stop(process)


# -- the engine marker's check (tests/conftest.py) --------------------------------------------------------

FAKE_ENGINE = textwrap.dedent(
    """
    import subprocess, sys
    import pytest

    # A child process titled as vLLM titles its engine core, alive for 3 s (no real engine: seconds, not minutes).
    CHILD = "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(3)"

    def test_unmarked():
        subprocess.run([sys.executable, "-c", CHILD], check=True)

    @pytest.mark.engine
    def test_marked():
        subprocess.run([sys.executable, "-c", CHILD], check=True)

    # An engine a marked test's fixture started and keeps (the shared server) is not the next test's.
    @pytest.fixture(scope="module")
    def kept_engine():
        child = subprocess.Popen([sys.executable, "-c", CHILD.replace("sleep(3)", "sleep(30)")])
        yield child
        child.kill()

    @pytest.mark.engine
    def test_marked_keeps_an_engine(kept_engine):
        import time

        time.sleep(1)  # titled by now

    def test_no_engine():
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1)"], check=True)
    """
)


def test_conftest_fails_a_test_that_starts_an_engine_without_the_marker(pytester, request, unwatched_engine_titles):
    tests = request.config.rootpath / "tests"
    pytester.makeconftest((tests / "conftest.py").read_text())
    pytester.makepyfile(shared_server=(tests / "shared_server.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    engine: starts an engine\n")
    pytester.makepyfile(test_fake=FAKE_ENGINE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_fake.py::test_unmarked - Failed: this test started a vLLM engine*"])

    # make test-fast (-m "not engine") deselects the marked one and still catches the unmarked one
    fast = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not engine")
    fast.assert_outcomes(passed=1, failed=1, deselected=2)


# -- two workers, one module each (tests/conftest.py's scheduler) ----------------------------------------

MODULE_TESTS = textwrap.dedent(
    """
    import pytest

    @pytest.mark.parametrize("i", range(6))
    def test_one(i):
        pass
    """
)


def test_each_module_runs_on_one_worker(pytester, request):
    """``-n 2 --dist loadscope`` (``make test``): every test of a module on the same worker, so a module's
    fixtures and engine runs are made once (xdist's own ``--dist loadgroup`` marks group nothing under
    pytest 9.2, pytest-dev/pytest-xdist#1386)."""
    tests = request.config.rootpath / "tests"
    pytester.makeconftest((tests / "conftest.py").read_text())
    pytester.makepyfile(shared_server=(tests / "shared_server.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    engine: starts an engine\n")
    pytester.makepyfile(test_a=MODULE_TESTS, test_b=MODULE_TESTS, test_c=MODULE_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope", "-v")
    result.assert_outcomes(passed=18)
    workers: dict[str, set[str]] = {}
    for line in result.outlines:
        parts = line.split()
        if parts and parts[0] in ("[gw0]", "[gw1]") and "PASSED" in parts:  # "[gw1] [ 38%] PASSED test_b.py::..."
            module = next(p.split("::")[0] for p in parts if "::" in p)
            workers.setdefault(module, set()).add(parts[0])
    assert sorted(workers) == ["test_a.py", "test_b.py", "test_c.py"], result.outlines
    assert all(len(w) == 1 for w in workers.values()), workers
    assert set().union(*workers.values()) == {"[gw0]", "[gw1]"}  # and both workers had work

"""Shared fixtures (the prepared default model, the shared razor server) and the ``engine`` marker's check.

Every test that starts a vLLM engine (``LLM(...)``, ``vllm serve``, a command that runs either) carries
``@pytest.mark.engine``, so that ``make test-fast`` (``-m "not engine"``) starts none. The check: while a
test without the marker sets up and runs, a thread watches this process's descendants, and the test fails
if one of them is a vLLM engine or server process (vLLM titles them ``VLLM::EngineCore``, ``VLLM::Worker``,
``VLLM::APIServer``; ``vllm serve`` before it renames itself). A test that asks for the ``razor_server``
fixture without the marker is refused at collection. Not seen: an engine run inside the test process itself
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which no test here does.
"""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from razor_vllm.model import prepare_default_model
from razor_vllm.serve import harness

import shared_server


@pytest.fixture(scope="session")
def default_model_dir():
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted once, then cached)."""
    return prepare_default_model(progress=False)


# -- the shared razor server ----------------------------------------------------------------------------

SERVER_FIXTURE = "razor_server"
_shared = {"stack": None, "users": 0}


@pytest.fixture(scope="session")
def razor_server(default_model_dir, tmp_path_factory):
    """One ``vllm serve`` with razor (settings: shared_server.py) for every serving test of the session.

    Stopped after the last test that uses it (not at the end of the session: later engine tests get the
    memory and cores back), and each of those tests fails if the server died during it.
    """
    stack = contextlib.ExitStack()
    _shared["stack"] = stack
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    server = stack.enter_context(
        harness.vllm_server(
            default_model_dir, shared_server.SERVER_ARGS, log_path=log_path, env=shared_server.SERVER_ENV
        )
    )
    yield server
    stack.close()


@pytest.fixture(autouse=True)
def _razor_server_survives(request):
    yield
    if SERVER_FIXTURE in request.fixturenames:
        server = request.getfixturevalue(SERVER_FIXTURE)
        assert server.alive(), "the shared server died during this test" + server.log_tail()


# -- the engine marker ------------------------------------------------------------------------------------

ENGINE_TITLES = ("VLLM::",)
_WATCH = pytest.StashKey["EngineWatch"]()


class EngineWatch(threading.Thread):
    """Polls this process's descendants; remembers the first that is a vLLM engine or server and was
    not one when the test started (the shared server a marked test started earlier may still run
    while another module's tests run on the same worker: its processes are not this test's)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.seen: str | None = None
        self._done = threading.Event()
        self._before = {pid for pid, _ in self._engines()}

    @staticmethod
    def _engines():
        """(pid, command line) of every descendant that is a vLLM engine or server now."""
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmdline = " ".join(child.cmdline()).strip()
                    if cmdline.startswith(ENGINE_TITLES) or ("vllm" in cmdline and " serve " in cmdline):
                        yield child.pid, cmdline

    def run(self) -> None:
        while self.seen is None and not self._done.wait(self.interval):
            for pid, cmdline in self._engines():
                if pid not in self._before:
                    self.seen = f"pid {pid}: {cmdline[:200]}"
                    break

    def stop(self) -> str | None:
        self._done.set()
        self.join(timeout=5)
        return self.seen


@pytest.fixture
def unwatched_engine_titles(request):
    """Only for the test of this check, which starts processes titled as engines (not engines) on purpose."""
    watch = request.node.stash.get(_WATCH, None)
    if watch is not None:
        watch.stop()
        watch.seen = None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURE in getattr(item, "fixturenames", ()):
            if item.get_closest_marker("engine") is None:
                raise pytest.UsageError(f"{item.nodeid} uses the {SERVER_FIXTURE} fixture without @pytest.mark.engine")
            if item.nodeid.split("::")[0] not in shared_server.TEST_MODULES:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the {SERVER_FIXTURE} fixture: add its module to shared_server.TEST_MODULES "
                    "(the modules that run on the worker that starts the server)"
                )


# -- two workers (pytest-xdist: ``-n 2 --dist loadscope``, as ``make test`` runs) ------------------------


def pytest_configure(config):
    """Under xdist, each worker computes on one thread, and its engines and servers on a core of their
    own: vLLM's CPU worker otherwise binds every engine of the machine to the same cores, and two
    workers whose torch and OpenMP pools each want every core spin against each other (the
    in-process engines, the HF references and the kernel tests ran 2-7x slower under two workers
    than alone). ``OMP_NUM_THREADS`` reaches what the worker spawns (the engine process, Triton
    interpreter checks); vLLM's own workers set theirs from the binding. A test that sets the
    binding itself (TP, DP) wins, and a test may still ask for more threads (the C++ threads test)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    if not worker.startswith("gw"):
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpus[int(worker[2:]) % len(cpus)])


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist runs everything in one process
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with one work unit per test module (its module-scoped engine runs and
    fixtures are made once), and one for all the modules that use the shared server (started once).
    Grouping by ``xdist_group`` marks (``--dist loadgroup``) relies on rewriting node ids, which
    pytest 9.2 no longer honours (pytest-dev/pytest-xdist#1386): the tests would spread freely and
    every module fixture run once per worker."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return SERVER_FIXTURE if module in shared_server.TEST_MODULES else module

    # Units in collection order (tests/engine/ first: the few long engine modules start first and the
    # many short unit tests fill in at the end) instead of xdist's default, most tests first, which
    # started the kernel and unit modules first and left the longest engine module for the tail.
    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    _shared["users"] = sum(SERVER_FIXTURE in getattr(item, "fixturenames", ()) for item in session.items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("engine") is None:
        watch = EngineWatch()
        item.stash[_WATCH] = watch
        watch.start()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    watch = item.stash.get(_WATCH, None)
    if watch is not None and (seen := watch.stop()):
        pytest.fail(f"this test started a vLLM engine or server ({seen}) but has no @pytest.mark.engine marker")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        watch = item.stash.get(_WATCH, None)
        if watch is not None:
            watch.stop()
        if SERVER_FIXTURE in getattr(item, "fixturenames", ()):
            _shared["users"] -= 1
            if _shared["users"] <= 0 and _shared["stack"] is not None:
                _shared["stack"].close()  # the last test that needs the shared server is done

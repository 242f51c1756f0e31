"""Start `vllm serve` as a subprocess on a free loopback port and always stop it (its whole process group).

    with vllm_server(model_dir, ["--attention-backend", "razor"], log_path=tmp / "server.log") as server:
        urllib.request.urlopen(server.url + "/health")

Only ever binds and talks to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

HOST = "127.0.0.1"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def wait_healthy(url: str, process: subprocess.Popen, timeout: float, log_path: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited with code {process.returncode} before becoming healthy" + _log_tail(log_path)
            )
        if is_healthy(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f}s" + _log_tail(log_path))


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop the server and the engine processes it started (its own process group): TERM, then KILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    # The engine core may outlive the API process for a moment; make sure nothing of the group is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def serve_command(model: str, args: Sequence[str], port: int) -> list[str]:
    vllm = Path(sys.executable).with_name("vllm")
    return [str(vllm), "serve", str(model), "--host", HOST, "--port", str(port), *args]


@contextlib.contextmanager
def vllm_server(
    model, args: Sequence[str] = (), log_path: Optional[Path] = None, port: Optional[int] = None,
    timeout: float = 600, env: Optional[dict] = None,
) -> Iterator[Server]:
    """Run `vllm serve MODEL --host 127.0.0.1 --port PORT *args`; yield once /health answers 200."""
    port = port or free_port()
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{HOST}:{port}"
    cmd = serve_command(str(model), args, port)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # INFO logs: tests read razor's start-up lines from the server log.
            env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})}
        )
        try:
            wait_healthy(url, process, timeout, log_path)
            yield Server(url=url, port=port, log_path=log_path, process=process)
        finally:
            stop(process)


def _log_tail(log_path: Optional[Path], lines: int = 40) -> str:
    if log_path is None or not Path(log_path).exists():
        return ""
    tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_path} ---\n" + "\n".join(tail)

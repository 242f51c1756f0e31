"""Start ``vllm serve`` on 127.0.0.1, wait for /health, read /metrics, and always stop it.

The server runs in its own session (process group), so stopping it with ``os.killpg`` also ends the
engine-core process it spawned: no orphan servers after an error or Ctrl-C. HTTP goes through
urllib without a proxy handler, so loopback traffic never follows an environment proxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

HOST = "127.0.0.1"
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    log_path: Path
    process: subprocess.Popen

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def resolve_model(model: str) -> tuple[str, str]:
    """(checkpoint dir, served model name); ``default`` prepares the embedded SmolLM2-135M-Instruct."""
    if model == "default":
        from razor_vllm.model import prepare_default_model

        return str(prepare_default_model(progress=True)), DEFAULT_SERVED_NAME
    path = Path(model)
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: --model {model}: not a Hugging Face checkpoint dir (no config.json)")
    return str(path), path.name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def healthy(url: str) -> bool:
    try:
        return get(url + "/health", timeout=2.0)[0] == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics, parsed by :func:`parse_metrics`."""
    status, text = get(url + "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Every Prometheus sample summed over label sets: ``{"vllm:num_requests_running": 3.0, ...}``.

    vLLM labels its samples by model and engine index (one engine here), so those are summed away;
    a sample with other labels is also listed per label set as ``name{label="value",...}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
            extra = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
            if extra:
                key = sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}"
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


POOL_GAUGE = "razor_blocks_in_use"  # per razor pool, when the status plugin exports it


def reading(m: dict[str, float]) -> dict[str, Any]:
    """Requests running/waiting, vLLM's KV usage (0..1) and, when exported, razor's blocks per pool."""
    out: dict[str, Any] = {
        "running": m.get("vllm:num_requests_running", 0.0),
        "waiting": m.get("vllm:num_requests_waiting", 0.0),
        "kv_cache_usage": m.get("vllm:kv_cache_usage_perc", float("nan")),
    }
    pools = {key.split('"')[1]: value for key, value in m.items() if key.startswith(POOL_GAUGE + "{pool=")}
    if pools:
        out["razor_blocks_in_use"] = pools
    return out


def is_idle(r: dict[str, Any]) -> bool:
    """Nothing running or waiting and every KV block free (both razor pools empty, when reported)."""
    pools_empty = all(v == 0.0 for v in (r.get("razor_blocks_in_use") or {}).values())
    return r["running"] == 0.0 and r["waiting"] == 0.0 and r["kv_cache_usage"] == 0.0 and pools_empty


def wait_idle(url: str, timeout: float = 60.0, poll: float = 0.5) -> dict[str, Any]:
    """Poll /metrics until :func:`is_idle` or the timeout; return the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        r = reading(metrics(url))
        if is_idle(r) or time.monotonic() > deadline:
            return r
        time.sleep(poll)


class MetricsSampler(threading.Thread):
    """Reads /metrics once a second: peak running/waiting requests, KV usage and razor blocks per pool."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.peaks: dict[str, Any] = {"peak_running": 0.0, "peak_waiting": 0.0, "peak_kv_usage": 0.0}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                r = reading(metrics(self.url))
            except Exception:  # noqa: BLE001 - a missed sample is not worth stopping the run
                continue
            self.samples += 1
            for key, name in (("peak_running", "running"), ("peak_waiting", "waiting"),
                              ("peak_kv_usage", "kv_cache_usage")):  # fmt: skip
                self.peaks[key] = max(self.peaks[key], r[name])
            for pool, blocks in (r.get("razor_blocks_in_use") or {}).items():
                peak = self.peaks.setdefault("peak_razor_blocks_in_use", {})
                peak[pool] = max(peak.get(pool, 0.0), blocks)

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(timeout=10)
        return dict(self.peaks, samples=self.samples)


def serve_command(model: str, args: Sequence[str], port: int) -> list[str]:
    vllm = Path(sys.executable).with_name("vllm")
    return [str(vllm), "serve", model, "--host", HOST, "--port", str(port), *args]


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """TERM the process group, wait, then KILL whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def vllm_server(
    model: str, args: Sequence[str], log_path: Optional[Path] = None, timeout: float = 600.0,
    env: Optional[dict] = None,
) -> Iterator[Server]:
    """Run ``vllm serve MODEL --host 127.0.0.1 --port PORT *args``; yield once /health answers 200.

    The server logs at INFO (razor's start-up lines are read from it) to ``log_path`` (default: a
    fresh temporary file).
    """
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = serve_command(str(model), args, port)
    log_path = Path(log_path or Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})},
        )  # fmt: skip
        try:
            _wait_healthy(url, process, timeout, log_path)
            yield Server(url=url, port=port, log_path=log_path, process=process)
        finally:
            stop(process)


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {process.returncode} before /health answered"
                               + log_tail(log_path))  # fmt: skip
        if healthy(url):
            return
        time.sleep(0.5)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s" + log_tail(log_path))


def log_tail(log_path: Path, lines: int = 40) -> str:
    if not Path(log_path).exists():
        return ""
    tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_path} ---\n" + "\n".join(tail)

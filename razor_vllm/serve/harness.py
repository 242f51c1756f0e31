"""Run ``vllm serve`` as a child process and talk to it: the one harness of the demo, the tests and loadtest/.

- :func:`vllm_server` (a context manager) starts ``vllm serve MODEL --host 127.0.0.1 --port PORT ...`` in its
  own session, waits until ``/health`` answers (reporting the start-up phase read from the server's log, with
  the elapsed time, when given a ``progress`` callback) and always stops it: :func:`stop` signals the whole
  process group, so the engine-core and worker processes the server spawned go too (no orphans after an error
  or Ctrl-C).
- :func:`metrics` reads ``/metrics`` with prometheus_client's text parser; :func:`reading`, :func:`is_idle` and
  :func:`wait_idle` say whether every request finished and every KV block (of both razor pools, when the status
  plugin exports them) is free again; :class:`MetricsSampler` keeps the peaks during a run.
- :meth:`Server.client` / :func:`openai_client` give an ``openai.OpenAI`` client and :func:`stream` streams one
  request through it (text, finish reason, usage, chunk arrival times).
- :class:`StreamReader` reads the server-sent events of a streamed answer for callers that must see the wire
  themselves (locust's HTTP client, the raw-HTTP tests); everyone else streams with the openai client.

All traffic goes to 127.0.0.1 and never through an environment proxy (urllib without a proxy handler, httpx
with ``trust_env`` off).
"""

from __future__ import annotations

import contextlib
import json
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

HOST = "127.0.0.1"
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Progress = Callable[[str], None]


# -- starting and stopping -----------------------------------------------------------------------------


@dataclass
class Server:
    """A running ``vllm serve``: where it listens, its log, its process (the leader of its process group)."""

    url: str  # http://127.0.0.1:PORT
    port: int
    log_path: Path
    process: subprocess.Popen
    startup_s: float = 0.0  # from the start of the process to the first healthy answer

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def client(self, timeout: float = 120.0):
        return openai_client(self.url, timeout)

    def metrics(self) -> dict[str, float]:
        return metrics(self.url)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        return get(self.url + path, timeout)


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


def cli_args(options: dict[str, Any], *flags: str) -> list[str]:
    """``{"--dtype": "float32", ...}, "--enforce-eager"`` -> ``["--dtype", "float32", ..., "--enforce-eager"]``.

    An option whose value is None is left out; values are passed through ``str``.
    """
    pairs = [(name, str(value)) for name, value in options.items() if value is not None]
    return [part for pair in pairs for part in pair] + list(flags)


def serve_command(model: str, args: Sequence[str], port: int) -> list[str]:
    """``vllm serve`` of this interpreter's environment (the console script next to ``sys.executable``)."""
    vllm = Path(sys.executable).with_name("vllm")
    return [str(vllm), "serve", str(model), "--host", HOST, "--port", str(port), *args]


@contextlib.contextmanager
def vllm_server(
    model: str,
    args: Sequence[str],
    log_path: Optional[Path] = None,
    timeout: float = 600.0,
    env: Optional[dict] = None,
    progress: Optional[Progress] = None,
    port: Optional[int] = None,
) -> Iterator[Server]:
    """Run ``vllm serve MODEL --host 127.0.0.1 --port PORT *args``; yield once /health answers 200; stop it.

    The server logs at INFO (razor's start-up lines are read from it, and so is the progress) to
    ``log_path`` (default: a fresh temporary file). ``port``: default a free one. Raises RuntimeError, with
    the log's tail, when the server exits or is not healthy within ``timeout`` seconds.
    """
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    cmd = serve_command(str(model), args, port)
    log_path = Path(log_path or Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})},
        )
        try:
            server = Server(url=url, port=port, log_path=log_path, process=process)
            wait_healthy(server, timeout, progress)
            server.startup_s = time.monotonic() - t0
            yield server
        finally:
            stop(process)


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


# What a starting server is doing, from the first line of its log that shows each phase (vLLM 0.32's
# messages; an unknown log just stays in the first phase, the progress still counts the seconds).
PHASES = [
    ("Resolved architecture", "reading the model config"),
    ("Initializing a V1 LLM engine", "starting the engine process"),
    ("Starting to load model", "loading the weights"),
    ("RAZOR: profile", "laying out razor's KV pools"),
    ("Warming up model", "compiling and warming up the model (the longest part of a first start)"),
    ("init engine (profile, create kv cache, warmup model) took", "starting the HTTP server"),
    ("Application startup complete", "answering /health"),
]


def startup_phase(log_text: str) -> str:
    """The latest start-up phase whose marker appears in the log ("starting vllm serve" before any)."""
    phase = "starting vllm serve (importing vLLM)"
    for marker, name in PHASES:
        if marker in log_text:
            phase = name
    return phase


def wait_healthy(server: Server, timeout: float, progress: Optional[Progress] = None, every: float = 15.0) -> None:
    """Poll /health until 200; ``progress`` gets a line at each new phase and every ``every`` s within one."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    said, said_at = None, t0
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited with code {server.process.returncode} before /health answered"
                + log_tail(server.log_path)
            )
        if healthy(server.url):
            if progress:
                progress(f"server ready after {time.monotonic() - t0:.0f} s")
            return
        if progress:
            phase = startup_phase(server.log_text())
            now = time.monotonic()
            if phase != said or now - said_at >= every:
                progress(f"[{now - t0:5.0f} s] server: {phase}")
                said, said_at = phase, now
        time.sleep(0.5)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s" + log_tail(server.log_path))


def log_tail(log_path: Path, lines: int = 40) -> str:
    if not Path(log_path).exists():
        return ""
    tail = Path(log_path).read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_path} ---\n" + "\n".join(tail)


# -- plain HTTP ---------------------------------------------------------------------------------------------


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET, for error statuses too."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def post_json(url: str, body: Any = None, raw: Optional[bytes] = None, timeout: float = 120.0) -> tuple[int, dict]:
    """POST a JSON body (or raw bytes); return (status, parsed JSON body), for error statuses too."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        payload = err.read()
        try:
            return err.code, json.loads(payload)
        except ValueError:
            return err.code, {"raw": payload.decode(errors="replace")}


def healthy(url: str) -> bool:
    try:
        return get(url + "/health", timeout=2.0)[0] == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


# -- /metrics -----------------------------------------------------------------------------------------------


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics, parsed by :func:`parse_metrics`."""
    status, text = get(url + "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """Every Prometheus sample summed over label sets: ``{"vllm:num_requests_running": 3.0, ...}``.

    vLLM labels its samples by model and engine index (one engine here), so those are summed away;
    a sample with other labels is also listed per label set as ``name{label="value",...}`` (labels sorted).
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


def labelled(m: dict[str, float], name: str) -> dict[str, float]:
    """``{label value: sample}`` of a metric with one label of its own, e.g. razor_blocks_in_use by pool."""
    prefix = name + "{"
    return {key.split('"')[1]: value for key, value in m.items() if key.startswith(prefix) and key.count('"') == 2}


POOL_GAUGE = "razor_blocks_in_use"  # per razor pool, when the status plugin exports it


def reading(m: dict[str, float]) -> dict[str, Any]:
    """Requests running/waiting, vLLM's KV usage (0..1) and, when exported, razor's blocks per pool."""
    out: dict[str, Any] = {
        "running": m.get("vllm:num_requests_running", 0.0),
        "waiting": m.get("vllm:num_requests_waiting", 0.0),
        "kv_cache_usage": m.get("vllm:kv_cache_usage_perc", float("nan")),
    }
    pools = labelled(m, POOL_GAUGE)
    if pools:
        out["razor_blocks_in_use"] = pools
    return out


def is_idle(r: dict[str, Any]) -> bool:
    """Nothing running or waiting and every KV block free (both razor pools empty, when reported)."""
    pools_empty = all(v == 0.0 for v in (r.get("razor_blocks_in_use") or {}).values())
    return r["running"] == 0.0 and r["waiting"] == 0.0 and r["kv_cache_usage"] == 0.0 and pools_empty


def wait_idle(url: str, timeout: float = 60.0, poll: float = 0.25) -> dict[str, Any]:
    """Poll /metrics until :func:`is_idle` or the timeout; return the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        r = reading(metrics(url))
        if is_idle(r) or time.monotonic() > deadline:
            return r
        time.sleep(poll)


class MetricsSampler(threading.Thread):
    """Reads /metrics every ``interval`` s: peak running/waiting requests, KV usage and razor blocks per pool."""

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
            for key, name in (
                ("peak_running", "running"),
                ("peak_waiting", "waiting"),
                ("peak_kv_usage", "kv_cache_usage"),
            ):
                self.peaks[key] = max(self.peaks[key], r[name])
            for pool, blocks in (r.get("razor_blocks_in_use") or {}).items():
                peak = self.peaks.setdefault("peak_razor_blocks_in_use", {})
                peak[pool] = max(peak.get(pool, 0.0), blocks)

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(timeout=10)
        return dict(self.peaks, samples=self.samples)


# -- the openai client ------------------------------------------------------------------------------------


def openai_client(url: str, timeout: float = 120.0):
    """``openai.OpenAI`` on the server's /v1, no retries (a failure is a finding), no environment proxy."""
    import httpx
    import openai

    return openai.OpenAI(
        base_url=url + "/v1",
        api_key="EMPTY",
        http_client=httpx.Client(trust_env=False, timeout=timeout),
        max_retries=0,
    )


def async_openai_client(url: str, timeout: float = 600.0, max_connections: int = 100):
    """``openai.AsyncOpenAI`` on the server's /v1 for many concurrent streams (the soak)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="EMPTY",
        http_client=httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(timeout), limits=limits),
        max_retries=0,
    )


@dataclass
class Streamed:
    """What a streamed answer carried: the text (and its pieces with arrival times), finish reason, usage."""

    pieces: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() of each non-empty piece
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, chunk: Any) -> str:
        """Take one chunk (completion or chat) of the openai client; return the text it added."""
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage.model_dump()
        added = ""
        for choice in chunk.choices or []:
            delta = getattr(choice, "delta", None)
            piece = (delta.content if delta is not None else choice.text) or ""
            if piece:
                added += piece
                self.pieces.append(piece)
                self.times.append(time.monotonic())
            self.finish_reason = choice.finish_reason or self.finish_reason
        return added


def stream(client, model: str, prompt: Optional[str] = None, messages: Optional[list] = None, **params) -> Streamed:
    """Stream one completion (``prompt``) or chat (``messages``) request to the end through the openai client.

    Usage is asked for (``stream_options.include_usage``); extra vLLM parameters go in ``extra_body``.
    An error event inside the stream raises ``openai.APIError``.
    """
    kwargs = dict(model=model, stream=True, stream_options={"include_usage": True}, **params)
    if messages is not None:
        chunks = client.chat.completions.create(messages=messages, **kwargs)
    else:
        chunks = client.completions.create(prompt=prompt, **kwargs)
    out = Streamed()
    with chunks:
        for chunk in chunks:
            out.add(chunk)
    return out


# -- the wire format, for callers that read the raw stream --------------------------------------------------

STREAM_OPTIONS = {"stream": True, "stream_options": {"include_usage": True}}


class StreamError(RuntimeError):
    """The stream carried an error event or ended without ``[DONE]``."""


@dataclass
class StreamReader:
    """Server-sent events of an OpenAI streamed answer, one line at a time (:meth:`feed`).

    Keeps every event (``events``, with ``times``: when each arrived), the generated text, the finish
    reason and the usage block (sent last when the request asks ``stream_options.include_usage``), and
    raises on an error event, which vLLM sends inside a 200 stream when the engine fails mid-request.
    """

    chat: bool  # chat completions put text in choices[0].delta.content, completions in choices[0].text
    pieces: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    done: bool = False

    def feed(self, line: bytes | str) -> Optional[str]:
        """Take one line of the body; return the text it added ("" or None when none)."""
        if isinstance(line, bytes):
            line = line.decode()
        line = line.strip()
        if not line.startswith("data:"):
            return None
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:
            raise StreamError(f"error event: {str(event['error'])[:300]}")
        self.events.append(event)
        self.times.append(time.monotonic())
        self.usage = event.get("usage") or self.usage
        added = []
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if piece:
                added.append(piece)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.pieces.extend(added)
        return "".join(added)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def finish(self) -> None:
        """Call at the end of the body: a stream without [DONE] was cut short."""
        if not self.done:
            raise StreamError("stream ended without [DONE]")

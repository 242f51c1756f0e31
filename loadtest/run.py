"""``python -m loadtest``: locust against ``vllm serve`` with razor, then stock, on 127.0.0.1; one table.

    python -m loadtest [--users 8] [--spawn-rate 2] [--run-time 2m] [--backends razor,stock]
                       [--model default] [--kv-mib 256] [--max-model-len 4096] [--out out/loadtest]

For each backend in turn: start ``vllm serve`` (razor: ``--attention-backend razor``; stock: vLLM's
own CPU/GPU attention) on a free loopback port, wait for /health, send two warm-up requests, run
``locust --headless -u N -r R -t T`` with ``loadtest/locustfile.py`` while sampling /metrics once a
second, wait until the server is idle (the KV-usage gauge must come back to 0), stop the server (its
whole process group). Then print razor and stock side by side and write, into ``--out``:
``{backend}_stats.csv`` / ``_failures.csv`` / ``_exceptions.csv`` / ``_stats_history.csv``
(locust), ``{backend}.html`` (locust's report), ``{backend}_extra.json`` (tokens, passkey checks),
``{backend}_server.log``, ``{backend}_locust.log``, ``summary.json`` and ``summary.md``.

Both backends get the same engine settings and KV bytes; prefix caching is off for both (razor
cannot use it, and the passkey prompts share their filler, which would hand stock cache hits that
real documents do not give). Exit status 1 when a server died, locust produced no results or no
completed request, a request failed for any reason other than a wrong passkey answer, or the KV cache
(and, where the status plugin reports them, razor's pools) was not empty once idle; 2 for bad options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from loadtest import summary
from loadtest.workload import CHAT_QUESTIONS, default_ranges, parse_token_range
from razor_vllm.common import runinfo, tables
from razor_vllm.serve import harness as srv

PROG = "python -m loadtest"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
BACKENDS = ("razor", "stock")
DEFAULT_WINDOW = 128  # the bundled default profile's window; only used to size the passkey prompts


def parse_duration(text: str) -> int:
    """Seconds from locust's time spans: ``90``, ``90s``, ``2m``, ``1m30s``, ``1h``."""
    match = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text)
    if not text.strip() or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 2m or 1m30s, got {text!r}")
    h, m, s = (int(g or 0) for g in match.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"duration must be at least 1 s, got {text!r}")
    return seconds


def _backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(BACKENDS)}, got {text!r}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _token_range(text: str) -> str:
    try:
        parse_token_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument("--users", type=_positive, default=8, help="concurrent locust users (default: 8)")
    load.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second (default: 2)")
    load.add_argument(
        "--run-time",
        type=parse_duration,
        default="2m",
        metavar="T",
        help="locust run time per backend: 90s, 2m, 1m30s (default: 2m)",
    )
    load.add_argument(
        "--backends",
        type=_backends,
        default=list(BACKENDS),
        metavar="razor,stock",
        help="which servers to test, in this order (default: razor,stock)",
    )
    load.add_argument("--chat-max-tokens", type=_positive, default=64, help="max_tokens of chat requests")
    load.add_argument(
        "--near-tokens",
        type=_token_range,
        metavar="LOW-HIGH",
        help="passkey prompt lengths near the window (default: W/2-2W)",
    )
    load.add_argument(
        "--far-tokens",
        type=_token_range,
        metavar="LOW-HIGH",
        help="passkey prompt lengths far past the window (default: 4W to max_model_len - 74)",
    )
    load.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests (default: 0.5)")
    load.add_argument("--seed", type=int, default=0, help="seed of the users' prompt sequences (default: 0)")

    engine = parser.add_argument_group("server (the same for both backends)")
    engine.add_argument(
        "--model", default="default", help="checkpoint dir ('default': the embedded SmolLM2-135M-Instruct)"
    )
    engine.add_argument(
        "--kv-mib",
        type=_positive,
        default=256,
        help="KV cache size, MiB (default: 256; stock then holds about 5.8k tokens in fp32)",
    )
    engine.add_argument("--max-model-len", type=_positive, default=4096, help="default: 4096")
    engine.add_argument("--max-num-seqs", type=_positive, default=64, help="default: 64")
    engine.add_argument(
        "--max-num-batched-tokens", type=_positive, default=512, help="chunked-prefill budget per step (default: 512)"
    )
    engine.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="default: float32 (bf16 is several times slower on CPUs without bf16 instructions)",
    )
    engine.add_argument("--window", type=_positive, help="razor window W (default: the profile's, 128)")
    engine.add_argument("--sink", type=int, help="razor sink tokens (default: the profile's)")
    engine.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for /health")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default="out/loadtest", help="output directory (default: out/loadtest)")
    out.add_argument(
        "--format",
        default="auto",
        choices=tables.FORMATS,
        help="table style (default: rich when installed)",
    )


# -- one backend -----------------------------------------------------------------------------------------


def server_args(args: argparse.Namespace, backend: str, served_name: str) -> list[str]:
    razor = {k: v for k, v in (("window", args.window), ("sink", args.sink)) if v is not None}
    options = {
        "--attention-backend": "razor" if backend == "razor" else None,
        "--additional-config": json.dumps({"razor": razor}) if backend == "razor" and razor else None,
        "--dtype": args.dtype,
        "--max-model-len": args.max_model_len,
        "--max-num-batched-tokens": args.max_num_batched_tokens,
        "--max-num-seqs": args.max_num_seqs,
        "--kv-cache-memory-bytes": args.kv_mib << 20,
        "--served-model-name": served_name,
        "--seed": 0,
    }
    # --enforce-eager: no torch.compile, minutes off each start on a CPU (README, notes on the CPU build).
    return srv.cli_args(options, "--no-enable-prefix-caching", "--enforce-eager")


def warm_up(url: str, served_name: str) -> None:
    """One chat and one completion request before timing (first requests pay one-off set-up)."""
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": CHAT_QUESTIONS[0]}], "max_tokens": 4}),
        ("/v1/completions", {"prompt": "The grass is green. " * 40, "max_tokens": 4}),
    ):
        status, reply = srv.post_json(url + path, {"model": served_name, **body}, timeout=300)
        if status != 200:
            raise RuntimeError(f"warm-up request to {path} answered {status}: {reply}")


def locust_command(
    args: argparse.Namespace, url: str, prefix: Path, served_name: str, near: str, far: str
) -> list[str]:
    options = {
        "-f": LOCUSTFILE,
        "-u": args.users,
        "-r": args.spawn_rate,
        "-t": f"{args.run_time}s",
        "--host": url,
        "--csv": prefix,
        "--html": f"{prefix}.html",
        "--loglevel": "WARNING",
        "--exit-code-on-error": 0,
        # the workload's own options (loadtest/locustfile.py)
        "--model-name": served_name,
        "--chat-max-tokens": args.chat_max_tokens,
        "--near-tokens": near,
        "--far-tokens": far,
        "--stream-share": args.stream_share,
        "--workload-seed": args.seed,
        "--extra-out": f"{prefix}_extra.json",
    }
    flags = ("--headless", "--csv-full-history", "--only-summary")
    return [sys.executable, "-m", "locust", *srv.cli_args(options, *flags)]


def run_locust(cmd: list[str], log_path: Path, timeout: float) -> int:
    """Run locust in its own process group; on any exit path nothing of it is left running."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LOCUSTFILE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n{PROG}: locust still running after {timeout:.0f} s; stopped\n")
            return -1
        finally:
            srv.stop(process, timeout=15)


def run_backend(
    args: argparse.Namespace, backend: str, model: str, served_name: str, out: Path, near: str, far: str
) -> dict[str, Any]:
    prefix = out / backend
    result: dict[str, Any] = {"server_args": server_args(args, backend, served_name)}
    t0 = time.monotonic()
    with srv.vllm_server(
        model,
        result["server_args"],
        out / f"{backend}_server.log",
        timeout=args.server_timeout,
        env={"VLLM_PLUGINS": "razor,razor_status"},
    ) as server:
        result["startup_s"] = round(time.monotonic() - t0, 1)
        say(f"{backend}: server up at {server.url} in {result['startup_s']} s; warming up")
        warm_up(server.url, served_name)
        before = srv.metrics(server.url)
        sampler = srv.MetricsSampler(server.url)
        sampler.start()
        cmd = locust_command(args, server.url, prefix, served_name, near, far)
        say(f"{backend}: locust {args.users} users, {args.run_time} s")
        t_locust = time.monotonic()
        try:
            result["locust_exit_code"] = run_locust(cmd, out / f"{backend}_locust.log", timeout=args.run_time + 300)
        finally:
            peaks = sampler.stop()
        result["locust_wall_s"] = round(time.monotonic() - t_locust, 1)
        result["locust_command"] = shlex.join(cmd)
        result["server_alive_after_run"] = server.alive()
        if server.alive():
            idle = srv.wait_idle(server.url, timeout=60)
            after = srv.metrics(server.url)
            status = srv.get(server.url + "/razor/status")
            result["server"] = {
                **peaks,
                "idle": idle,
                "preemptions": _delta(before, after, "vllm:num_preemptions_total"),
                "generation_tokens": _delta(before, after, "vllm:generation_tokens_total"),
                "finished": {
                    reason: _delta(before, after, f'vllm:request_success_total{{finished_reason="{reason}"}}')
                    for reason in ("stop", "length", "error")
                },  # vLLM does not count aborts here
                "razor_status": _status_digest(json.loads(status[1])) if status[0] == 200 else None,
            }
        else:
            result["server"] = {**peaks, "error": "the server died during the run" + server.log_tail()}
    extra_path = Path(f"{prefix}_extra.json")
    result["locust"] = json.loads(extra_path.read_text()) if extra_path.exists() else None
    return result


def _status_digest(status: dict[str, Any]) -> dict[str, Any]:
    """The part of GET /razor/status worth keeping with the results ({"razor": false} for stock)."""
    keep = ("razor", "window", "sink", "kv_bytes_per_token", "compression_ratio", "max_model_len", "usage")
    digest = {k: status[k] for k in keep if k in status}
    if "retrieval_heads" in status:
        digest["retrieval_heads"] = {k: status["retrieval_heads"][k] for k in ("count", "total")}
    return digest


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> Optional[float]:
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def problems(results: dict[str, Any]) -> list[str]:
    """What makes the run a failure (wrong passkey answers are a measurement, not a failure)."""
    found = []
    for backend, r in results["backends"].items():
        if r.get("error"):
            found.append(f"{backend}: {r['error']}")
            continue
        if not r.get("server_alive_after_run"):
            found.append(f"{backend}: the server died during the run")
        if not r.get("locust"):
            found.append(f"{backend}: locust wrote no results (exit code {r.get('locust_exit_code')})")
            continue
        total = r["locust"]["total"]
        if total["requests"] == 0:
            found.append(f"{backend}: no request completed in the run time (see {backend}_locust.log)")
        errors = total["failures"] - total["wrong_answers"]
        if errors:
            found.append(f"{backend}: {errors} requests failed (see {backend}_failures.csv)")
        idle = (r.get("server") or {}).get("idle")
        if not idle or not srv.is_idle(idle):
            found.append(f"{backend}: not idle with empty KV pools after the run: {idle} (leaked blocks?)")
    return found


# -- the command ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("locust") is None:
        print(
            f"{PROG}: error: locust is not installed (pip install 'razor-vllm[load]' or pip install locust)",
            file=sys.stderr,
        )
        return 2
    if not 0.0 <= args.stream_share <= 1.0:
        print(f"{PROG}: error: --stream-share must be in [0, 1]", file=sys.stderr)
        return 2
    model, served_name = srv.resolve_model(args.model)
    try:
        near_default, far_default = default_ranges(args.window or DEFAULT_WINDOW, args.max_model_len)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    near = args.near_tokens or "-".join(map(str, near_default))
    far = args.far_tokens or "-".join(map(str, far_default))
    if parse_token_range(far)[1] + 16 > args.max_model_len:
        print(f"{PROG}: error: --far-tokens {far} does not fit --max-model-len {args.max_model_len}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": _meta(args, model, served_name, near, far), "backends": {}}
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM unwinds like Ctrl-C: servers are stopped
    try:
        for backend in args.backends:
            try:
                results["backends"][backend] = run_backend(args, backend, model, served_name, out, near, far)
            except RuntimeError as exc:  # the server did not start, or died before answering
                results["backends"][backend] = {"error": str(exc)}
                print(f"{PROG}: {backend}: {exc}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    results["meta"]["finished"] = runinfo.now()
    results["meta"]["machine"]["load_average_end"] = runinfo.loadavg()
    json_path, md_path = summary.write(results, out, args.format)
    say(f"wrote {json_path}, {md_path} and locust's CSVs in {out}/")
    found = problems(results)
    for line in found:
        print(f"{PROG}: {line}", file=sys.stderr)
    return 1 if found else 0


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _meta(args: argparse.Namespace, model: str, served_name: str, near: str, far: str) -> dict[str, Any]:
    argv = getattr(args, "argv", None)
    return {
        "command": shlex.join([*PROG.split(), *(sys.argv[1:] if argv is None else argv)]),
        "started": runinfo.now(),
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "run_time": f"{args.run_time} s",
        "backends": args.backends,
        "model": model,
        "model_name": served_name,
        "max_model_len": args.max_model_len,
        "kv_bytes": args.kv_mib << 20,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "dtype": args.dtype,
        "window": args.window,
        "sink": args.sink,
        "workload": {
            "chat_max_tokens": args.chat_max_tokens,
            "near_tokens": near,
            "far_tokens": far,
            "stream_share": args.stream_share,
            "seed": args.seed,
        },
        "machine": dict(runinfo.machine(), load_average_start=runinfo.loadavg()),
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runinfo.command_main(PROG, __doc__, add_arguments, run, argv)

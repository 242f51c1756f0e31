"""``python -m loadtest.soak``: many concurrent streams with cancellations against razor; every answer checked.

    python -m loadtest.soak [--streams 100] [--duration 3m] [--cancel-share 0.3] [--kv-mib 1024]
                            [--max-model-len 4096] [--out out/soak] [--url http://127.0.0.1:PORT]

1. Start ``vllm serve --attention-backend razor`` on 127.0.0.1 (or use ``--url``, loopback only).
2. Reference: send every prompt of a fixed catalogue once, alone, greedy (temperature 0): short
   chats, stories that decode past the window (``ignore_eos``), passkey prompts near and far past
   the window. Its answers are the expected texts.
3. Soak: ``--streams`` clients stream catalogue prompts in a loop for ``--duration``. A share
   (``--cancel-share``) hang up mid-request: most after a random number of text chunks, some at a
   random moment before the first token (while queued or prefilling). Every request that runs to
   the end must reproduce its expected text and finish reason exactly.
4. Idle: wait until vLLM reports no running or waiting request and a KV usage of exactly 0 (every
   block of both razor pools back in the free pool), check the server is alive and /health answers,
   and send the whole catalogue again, alone: it must still give the reference answers.

Exit status 1 when any check fails. Prints a table and writes ``soak.json`` (+ the server log) to
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from loadtest.run import parse_duration, say
from loadtest.workload import CHAT_QUESTIONS, PASSKEY_MAX_TOKENS, passkey_prompt
from razor_vllm.common import runinfo, tables
from razor_vllm.serve import harness as srv

PROG = "python -m loadtest.soak"
STORY_OPENINGS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The spaceship landed quietly on the red planet. The captain opened the hatch and",
    "In the heart of the city there was a tiny bookshop that nobody ever seemed to visit, until",
]


@dataclass(frozen=True)
class Item:
    """One catalogue prompt: the request body (without model/stream), chat or completion, how often drawn."""

    name: str
    body: dict
    chat: bool
    weight: int


def catalogue(max_model_len: int) -> list[Item]:
    """Fixed prompts: greedy, so each has one right answer; lengths straddle and pass the window."""
    items = [
        Item(f"chat {i}", {"messages": [{"role": "user", "content": q}], "max_tokens": 48, "temperature": 0}, True, 3)
        for i, q in enumerate(CHAT_QUESTIONS[:6])
    ]
    items += [
        Item(
            f"story {i}", {"prompt": opening, "max_tokens": 64 + 32 * i, "temperature": 0, "ignore_eos": True}, False, 2
        )
        for i, opening in enumerate(STORY_OPENINGS)
    ]
    keys = ["7481923", "3318842", "9051176", "2604417", "5536120", "8820391"]
    lengths = [150, 240, 400, 900, 1500, 2500]
    for key, tokens in zip(keys, lengths):
        if tokens + 100 > max_model_len:
            continue
        kind = "near" if tokens <= 512 else "far"
        p = passkey_prompt(key, tokens, depth=0.3)
        # The 240-token prompt decodes 48 tokens: its window slides during decode.
        max_tokens, extra = (48, {"ignore_eos": True}) if tokens == 240 else (PASSKEY_MAX_TOKENS, {})
        items.append(
            Item(
                f"passkey {kind} {tokens}",
                {"prompt": p.prompt, "max_tokens": max_tokens, "temperature": 0, **extra},
                False,
                2 if kind == "near" else 1,
            )
        )
    return items


@dataclass
class Answer:
    text: str
    finish_reason: Optional[str]
    completion_tokens: Optional[int]


VLLM_EXTRAS = ("ignore_eos",)  # request fields vLLM adds to the OpenAI API: sent as the client's extra_body


async def stream_once(
    client, model: str, item: Item, cancel_after_chunks: Optional[int] = None, cancel_after_s: Optional[float] = None
) -> tuple[str, Answer]:
    """Stream one request through the openai client; return (outcome, what arrived).

    The outcome is completed, cancelled or ``error: ...``. Leaving the stream's ``async with`` (after
    ``cancel_after_chunks`` text chunks, or when ``cancel_after_s`` runs out) closes the connection
    mid-stream, which is how a client hangs up. A stream that ends without a finish reason was cut short.
    """
    params = {k: v for k, v in item.body.items() if k not in VLLM_EXTRAS}
    extra = {k: v for k, v in item.body.items() if k in VLLM_EXTRAS}
    got = srv.Streamed()

    async def consume() -> str:
        create = client.chat.completions.create if item.chat else client.completions.create
        stream = await create(
            model=model, stream=True, stream_options={"include_usage": True}, extra_body=extra or None, **params
        )
        async with stream:
            async for chunk in stream:
                if got.add(chunk) and cancel_after_chunks is not None and len(got.pieces) >= cancel_after_chunks:
                    return "cancelled"
        return "completed" if got.finish_reason else "error: the stream ended without a finish reason"

    try:
        if cancel_after_s is not None:
            try:
                outcome = await asyncio.wait_for(consume(), timeout=cancel_after_s)
            except asyncio.TimeoutError:
                outcome = "cancelled"
        else:
            outcome = await consume()
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        outcome = f"error: {type(exc).__name__}: {exc}"
    answer = Answer(got.text, got.finish_reason, (got.usage or {}).get("completion_tokens"))
    return outcome, answer


async def one_by_one(url: str, model: str, items: list[Item]) -> dict[str, Answer]:
    """Each prompt alone (nothing else in flight): the expected answers."""
    answers = {}
    async with srv.async_openai_client(url, timeout=600, max_connections=4) as client:
        for item in items:
            outcome, answer = await stream_once(client, model, item)
            if outcome != "completed":
                raise RuntimeError(f"reference request {item.name!r}: {outcome}")
            answers[item.name] = answer
    return answers


@dataclass
class SoakStats:
    started: int = 0
    completed: int = 0
    correct: int = 0
    cancelled_mid_stream: int = 0
    cancelled_before_first_token: int = 0
    errors: int = 0
    output_tokens: int = 0  # of completed requests (their usage)
    cancelled_full_tokens: int = 0  # what the cancelled requests would have generated (their reference answers)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


async def soak(
    url: str,
    model: str,
    items: list[Item],
    expected: dict[str, Answer],
    streams: int,
    duration: float,
    cancel_share: float,
    seed: int,
    drain_timeout: float,
) -> tuple[SoakStats, list[dict], list[str]]:
    stats = SoakStats()
    mismatches: list[dict] = []
    errors: list[str] = []
    weights = [item.weight for item in items]
    deadline = time.monotonic() + duration

    async def worker(index: int, client) -> None:
        rng = random.Random(f"{seed}:{index}")
        while time.monotonic() < deadline:
            item = rng.choices(items, weights)[0]
            want = expected[item.name]
            chunks = want.completion_tokens or 1  # about one text chunk per token
            cancel_chunks = cancel_s = None
            roll = rng.random()
            if roll < cancel_share * 0.75:
                cancel_chunks = rng.randint(1, max(1, chunks - 1))
            elif roll < cancel_share:
                cancel_s = rng.uniform(0.05, 3.0)
            stats.started += 1
            outcome, answer = await stream_once(client, model, item, cancel_chunks, cancel_s)
            if outcome == "cancelled":
                stats.cancelled_full_tokens += want.completion_tokens or 0
                if answer.text:
                    stats.cancelled_mid_stream += 1
                else:
                    stats.cancelled_before_first_token += 1
                continue
            if outcome != "completed":
                stats.errors += 1
                if len(errors) < 20:
                    errors.append(f"{item.name}: {outcome}")
                continue
            stats.completed += 1
            stats.output_tokens += answer.completion_tokens or 0
            if (answer.text, answer.finish_reason) == (want.text, want.finish_reason):
                stats.correct += 1
            elif len(mismatches) < 20:
                mismatches.append(
                    {
                        "prompt": item.name,
                        "expected": want.text,
                        "got": answer.text,
                        "expected_finish": want.finish_reason,
                        "got_finish": answer.finish_reason,
                    }
                )

    async with srv.async_openai_client(url, timeout=900, max_connections=streams + 8) as client:
        tasks = [asyncio.create_task(worker(i, client)) for i in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=duration + drain_timeout)
        for task in pending:  # still running long after the deadline: count as errors, hang up
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            stats.errors += len(pending)
            errors.append(f"{len(pending)} streams still running {drain_timeout:.0f} s after the deadline")
    return stats, mismatches, errors


# -- the command ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=100, help="concurrent client streams (default: 100)")
    parser.add_argument("--duration", type=parse_duration, default="3m", help="soak time: 90s, 3m (default: 3m)")
    parser.add_argument(
        "--cancel-share", type=float, default=0.3, help="share of requests the client hangs up on (default: 0.3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600,
        help="seconds after the deadline for running requests to finish (default: 600)",
    )
    parser.add_argument("--url", help="an already running server on 127.0.0.1 (default: start one)")
    parser.add_argument("--model", default="default", help="checkpoint dir ('default': SmolLM2-135M-Instruct)")
    parser.add_argument("--kv-mib", type=int, default=1024, help="KV cache size, MiB (default: 1024)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--window", type=int, help="razor window W (default: the profile's)")
    parser.add_argument("--out", default="out/soak", help="output directory (default: out/soak)")
    parser.add_argument("--format", default="auto", choices=tables.FORMATS)


def server_args(args: argparse.Namespace, served_name: str) -> list[str]:
    options = {
        "--attention-backend": "razor",
        "--additional-config": json.dumps({"razor": {"window": args.window}}) if args.window else None,
        "--dtype": "float32",
        "--seed": 0,
        "--max-model-len": args.max_model_len,
        "--max-num-seqs": args.max_num_seqs,
        "--max-num-batched-tokens": args.max_num_batched_tokens,
        "--kv-cache-memory-bytes": args.kv_mib << 20,
        "--served-model-name": served_name,
    }
    return srv.cli_args(options, "--enforce-eager")


def run_soak(args: argparse.Namespace, url: str, model: str, alive) -> dict[str, Any]:
    """Reference, soak, idle checks against the server at ``url``; ``alive()`` says if it still runs."""
    items = catalogue(args.max_model_len)
    say(f"reference answers for {len(items)} prompts, one at a time")
    t0 = time.monotonic()
    expected = asyncio.run(one_by_one(url, model, items))
    result: dict[str, Any] = {
        "cancel_share": args.cancel_share,
        "reference_s": round(time.monotonic() - t0, 1),
        "expected": {k: a.__dict__ for k, a in expected.items()},
    }
    before = srv.metrics(url)
    sampler = srv.MetricsSampler(url)
    sampler.start()
    say(f"soak: {args.streams} streams for {args.duration} s, {args.cancel_share:.0%} cancelled")
    t0 = time.monotonic()
    try:
        stats, mismatches, errors = asyncio.run(
            soak(
                url,
                model,
                items,
                expected,
                args.streams,
                args.duration,
                args.cancel_share,
                args.seed,
                args.drain_timeout,
            )
        )
    finally:
        peaks = sampler.stop()
    result["soak_s"] = round(time.monotonic() - t0, 1)
    result.update(stats=stats.as_dict(), mismatches=mismatches, errors=errors, server=peaks)
    say(f"soak done in {result['soak_s']} s: {stats.as_dict()}; waiting for idle")
    result["alive_after_soak"] = alive()
    if not result["alive_after_soak"]:
        return result
    result["idle"] = srv.wait_idle(url, timeout=120)
    after = srv.metrics(url)
    generated = after.get("vllm:generation_tokens_total", 0) - before.get("vllm:generation_tokens_total", 0)
    result["server"].update(
        {
            # Tokens the engine generated for requests the client hung up on: far below their full
            # answers when the disconnects abort them (vLLM does not count aborts in request_success).
            "generated_for_cancelled": generated - stats.output_tokens,
            "preemptions": after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0),
            "finished": {
                r: after.get(f'vllm:request_success_total{{finished_reason="{r}"}}', 0)
                - before.get(f'vllm:request_success_total{{finished_reason="{r}"}}', 0)
                for r in ("stop", "length", "error")
            },
        }
    )
    result["health"] = srv.healthy(url)
    again = asyncio.run(one_by_one(url, model, items))
    result["after_idle_same_answers"] = sum(again[k].__dict__ == expected[k].__dict__ for k in expected)
    result["after_idle_differs"] = [k for k in expected if again[k].__dict__ != expected[k].__dict__]
    status = srv.get(url + "/razor/status")
    result["razor_status"] = json.loads(status[1]) if status[0] == 200 else None
    result["alive_at_end"] = alive()
    return result


def checks(result: dict[str, Any]) -> list[tuple[str, bool]]:
    stats = result.get("stats", {})
    server = result.get("server", {})
    idle = result.get("idle") or {}
    n = len(result.get("expected", {}))
    cancelled = stats.get("cancelled_mid_stream", 0) + stats.get("cancelled_before_first_token", 0)
    aborted = cancelled == 0 or server.get("generated_for_cancelled", float("inf")) < stats["cancelled_full_tokens"]
    return [
        (
            "server alive after the soak and at the end",
            bool(result.get("alive_after_soak") and result.get("alive_at_end")),
        ),
        ("no request failed", stats.get("errors", 1) == 0),
        ("requests completed", stats.get("completed", 0) > 0),
        ("every completed request gave the expected text", stats.get("completed", -1) == stats.get("correct")),
        ("requests cancelled mid-stream", stats.get("cancelled_mid_stream", 0) > 0 or not result.get("cancel_share")),
        ("cancelled requests were aborted (fewer tokens generated for them than their full answers)", aborted),
        ("idle: no running/waiting request, KV usage 0, razor pools empty", bool(idle) and srv.is_idle(idle)),
        ("/health answers 200", bool(result.get("health"))),
        (
            f"after the soak every prompt alone still gives its reference answer ({n})",
            result.get("after_idle_same_answers") == n and n > 0,
        ),
    ]


def report_tables(args: argparse.Namespace, result: dict[str, Any]):
    stats, server = result.get("stats", {}), result.get("server", {})
    finished = server.get("finished", {})
    figures = [
        ("streams x duration", f"{args.streams} x {args.duration} s (+ drain: soak took {result.get('soak_s')} s)"),
        ("requests started", stats.get("started")),
        ("completed / correct", f"{stats.get('completed')} / {stats.get('correct')}"),
        (
            "cancelled mid-stream / before the first token",
            f"{stats.get('cancelled_mid_stream')} / {stats.get('cancelled_before_first_token')}",
        ),
        ("errors", stats.get("errors")),
        ("output tokens of completed requests", stats.get("output_tokens")),
        (
            "server: finished stop / length / error",
            " / ".join(str(int(finished.get(r, 0))) for r in ("stop", "length", "error")) if finished else "-",
        ),
        (
            "tokens generated for cancelled requests / their full answers",
            f"{server.get('generated_for_cancelled', '-')} / {stats.get('cancelled_full_tokens')}",
        ),
        (
            "server: peak running / waiting",
            f"{server.get('peak_running', 0):.0f} / {server.get('peak_waiting', 0):.0f}",
        ),
        ("server: peak KV usage", f"{100 * server.get('peak_kv_usage', 0):.1f}%"),
        ("server: preemptions", server.get("preemptions")),
        ("idle after", json.dumps(result.get("idle"))),
    ]
    return [
        tables.Table("Soak (razor)", ["", "value"], [[k, str(v)] for k, v in figures]),
        tables.Table("Checks", ["check", "result"], [[name, "ok" if ok else "FAILED"] for name, ok in checks(result)]),
    ]


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.cancel_share < 1.0 or args.streams < 1:
        print(f"{PROG}: error: need --streams >= 1 and 0 <= --cancel-share < 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": shlex.join([*PROG.split(), *getattr(args, "argv", sys.argv[1:])]),
        "started": runinfo.now(),
        "load_average_start": runinfo.loadavg(),
    }
    if args.url:
        if not args.url.startswith(f"http://{srv.HOST}:"):
            print(f"{PROG}: error: --url must be http://{srv.HOST}:PORT (loopback only)", file=sys.stderr)
            return 2
        models = json.loads(srv.get(args.url + "/v1/models")[1])["data"]
        result = run_soak(args, args.url, models[0]["id"], alive=lambda: srv.healthy(args.url))
    else:
        model, served_name = srv.resolve_model(args.model)
        with srv.vllm_server(
            model, server_args(args, served_name), out / "server.log", env={"VLLM_PLUGINS": "razor,razor_status"}
        ) as server:
            say(f"razor server up at {server.url}")
            result = run_soak(args, server.url, served_name, alive=server.alive)
    runinfo.finish_meta(meta)
    result = {"meta": meta, **result, "checks": dict(checks(result))}
    tables.render(report_tables(args, result), args.format)
    path = tables.write_json(result, out / "soak.json")
    say(f"wrote {path}")
    return 0 if all(result["checks"].values()) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runinfo.command_main(PROG, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Locust users for a vLLM OpenAI server: short chat, and passkey retrieval near and far past the razor window.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 2m \\
        --csv out/run [--chat-max-tokens 64] [--near-tokens 128-512] [--far-tokens 1024-3900] \\
        [--stream-share 0.5] [--extra-out out/run_extra.json]

``python -m loadtest`` runs this file against razor and stock servers it starts itself.

The mix: ``ChatUser`` (weight 3) asks short questions through /v1/chat/completions;
``RetrievalUser`` (weight 1) sends completion-style passkey prompts: near the window, near, far
past it, and again. Each request streams with probability ``--stream-share``. Locust entries are named
``chat``, ``chat stream``, ``passkey near``, ``passkey far stream``, ...: type POST is the whole
request (for a stream, until ``[DONE]``), type TTFT the time to the first generated text of a stream.
A wrong passkey answer is a failure ("wrong passkey answer"), as is any HTTP error, an error event in
a stream, a stream without ``[DONE]`` or a missing finish reason.

Locust's CSVs have no token counts, and its Aggregated row mixes TTFT with whole requests, so at
exit this file writes ``--extra-out`` (JSON): the run's duration, output and prompt tokens per
entry, every passkey answer with its check, and totals over the POST entries alone.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

from locust import HttpUser, between, events, task
from locust.stats import StatsEntry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `loadtest` importable when run by path

from loadtest.workload import (  # noqa: E402
    CHAT_QUESTIONS,
    PASSKEY_MAX_TOKENS,
    parse_token_range,
    random_passkey,
)
from razor_vllm.serve.harness import STREAM_OPTIONS, StreamReader  # noqa: E402

WRONG_ANSWER = "wrong passkey answer"

_user_ids: dict[str, itertools.count] = defaultdict(itertools.count)  # per user class
_run: dict[str, Any] = {"model": None, "start": None, "stop": None}
_tokens: dict[str, dict[str, int]] = defaultdict(lambda: {"responses": 0, "output_tokens": 0, "prompt_tokens": 0})
_checks: dict[str, dict[str, Any]] = defaultdict(lambda: {"right": 0, "wrong": 0, "answers": []})


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("razor-vllm workload")
    group.add_argument("--model-name", default="", help="model to ask for (default: the first of GET /v1/models)")
    group.add_argument("--chat-max-tokens", type=int, default=64, help="max_tokens of a chat request")
    group.add_argument("--near-tokens", default="128-512", help="passkey prompt length near the window, LOW-HIGH")
    group.add_argument("--far-tokens", default="1024-3900", help="passkey prompt length far past the window")
    group.add_argument("--stream-share", type=float, default=0.5, help="share of requests that stream (0..1)")
    group.add_argument("--workload-seed", type=int, default=0, help="seed of each user's prompt sequence")
    group.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    group.add_argument("--extra-out", default="", help="write token counts, passkey checks and totals here (JSON)")


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    opts = environment.parsed_options
    for text in (opts.near_tokens, opts.far_tokens):
        parse_token_range(text)  # a bad range stops the run here, with the message
    if not 0.0 <= opts.stream_share <= 1.0:
        raise ValueError(f"--stream-share must be in [0, 1], got {opts.stream_share}")
    _run["model"] = opts.model_name or _first_model(environment.host)
    _run["start"] = time.time()


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    _run["stop"] = time.time()


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    out = getattr(environment.parsed_options, "extra_out", "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(extra_report(environment.stats), indent=2) + "\n")


def _first_model(host: str) -> str:
    import requests

    with requests.Session() as session:
        session.trust_env = False  # loopback: never through an environment proxy
        models = session.get(host.rstrip("/") + "/v1/models", timeout=30).json()["data"]
    return models[0]["id"]


# -- users ---------------------------------------------------------------------------------------------


class _OpenAIUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        self.client.trust_env = False  # loopback: never through an environment proxy
        opts = self.environment.parsed_options
        # Every choice a user makes (prompt, near or far, stream or not) comes from its own seeded
        # generator: user i of a class sends the same sequence in every run, razor's and stock's.
        self.user_id = next(_user_ids[type(self).__name__])
        self.rng = random.Random(f"{opts.workload_seed}:{type(self).__name__}:{self.user_id}")
        self.sent = 0

    def _request(
        self,
        path: str,
        name: str,
        body: dict,
        chat: bool,
        check: Optional[Callable[[str], bool]] = None,
        expected: str = "",
    ) -> None:
        opts = self.environment.parsed_options
        self.sent += 1
        stream = self.rng.random() < opts.stream_share
        if stream:
            name += " stream"
            body = {**body, **STREAM_OPTIONS}
        body = {"model": _run["model"], **body}
        start = time.perf_counter()
        with self.client.post(
            path, json=body, name=name, stream=stream, catch_response=True, timeout=opts.request_timeout
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.error or resp.text[:200]}")
                return
            try:
                if stream:
                    text, finish, usage, size = self._read_stream(resp, name, start, chat)
                    resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
                    resp.request_meta["response_length"] = size
                else:
                    payload = resp.json()
                    choice = payload["choices"][0]
                    text = choice["message"]["content"] if chat else choice["text"]
                    finish, usage = choice.get("finish_reason"), payload.get("usage")
            except Exception as exc:  # noqa: BLE001 - any malformed answer is a failure of this request
                resp.failure(f"bad response: {type(exc).__name__}: {exc}")
                return
            self._judge(resp, name, text, finish, usage, check, expected)

    def _judge(
        self,
        resp,
        name: str,
        text: Optional[str],
        finish: Optional[str],
        usage: Optional[dict],
        check: Optional[Callable[[str], bool]],
        expected: str,
    ) -> None:
        """Count the tokens; mark the request failed unless it finished, has usage and (if checkable) is right."""
        if usage:
            counts = _tokens[name]
            counts["responses"] += 1
            counts["output_tokens"] += int(usage.get("completion_tokens") or 0)
            counts["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        if finish not in ("stop", "length"):
            resp.failure(f"finish_reason {finish!r}")
        elif usage is None:
            resp.failure("no usage in the response")
        elif check is None:
            resp.success()
        else:
            right = check(text or "")
            result = _checks[name]
            result["right" if right else "wrong"] += 1
            # Which request of which user: the same (user, n) is the same prompt in every run.
            result["answers"].append(
                {
                    "user": self.user_id,
                    "n": self.sent,
                    "expected": expected,
                    "got": text,
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "right": right,
                }
            )
            if right:
                resp.success()
            else:
                resp.failure(WRONG_ANSWER)

    def _read_stream(self, resp, name: str, start: float, chat: bool) -> tuple[str, Optional[str], Optional[dict], int]:
        """Read server-sent events to [DONE]; report TTFT (first generated text) as its own entry."""
        reader = StreamReader(chat=chat)
        size = 0
        for line in resp.iter_lines():
            size += len(line) + 1
            if reader.feed(line) and len(reader.pieces) == 1:
                self.environment.events.request.fire(
                    request_type="TTFT",
                    name=name,
                    response_time=(time.perf_counter() - start) * 1000,
                    response_length=0,
                    exception=None,
                    context={},
                )
            if reader.done:
                break
        reader.finish()
        return reader.text, reader.finish_reason, reader.usage, size


class ChatUser(_OpenAIUser):
    """Short chat turns with a person's think time between them."""

    weight = 3
    wait_time = between(0.5, 2.0)

    @task
    def chat(self) -> None:
        question = self.rng.choice(CHAT_QUESTIONS)
        body = {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": self.environment.parsed_options.chat_max_tokens,
            "temperature": 0.2,
            "top_p": 0.9,
        }  # the model card's sampling; free text, not checked
        self._request("/v1/chat/completions", "chat", body, chat=True)


class RetrievalUser(_OpenAIUser):
    """Questions about a long document: a passkey hidden in filler, greedy, answer checked."""

    weight = 1
    wait_time = between(1.0, 3.0)

    @task
    def passkey(self) -> None:
        """Near the window, near, far past it, near, near, far, ... (lengths and keys drawn at random)."""
        opts = self.environment.parsed_options
        near = self.sent % 3 != 2  # self.sent: requests this user sent so far
        passkey = random_passkey(self.rng, parse_token_range(opts.near_tokens if near else opts.far_tokens))
        body = {"prompt": passkey.prompt, "max_tokens": PASSKEY_MAX_TOKENS, "temperature": 0}
        self._request(
            "/v1/completions",
            "passkey near" if near else "passkey far",
            body,
            chat=False,
            check=passkey.check,
            expected=passkey.key,
        )


# -- the extra report --------------------------------------------------------------------------------


def _summary(entry: StatsEntry) -> dict[str, Any]:
    has = entry.num_requests > 0
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "p50_ms": entry.get_response_time_percentile(0.5) if has else None,
        "p95_ms": entry.get_response_time_percentile(0.95) if has else None,
        "avg_ms": entry.avg_response_time if has else None,
        "max_ms": entry.max_response_time if has else None,
    }


def _merged(stats, method: str, names: Optional[set[str]] = None) -> StatsEntry:
    merged = StatsEntry(stats, f"all {method}", method)
    for entry in stats.entries.values():
        if entry.method == method and (names is None or entry.name in names):
            merged.extend(entry)
    return merged


def extra_report(stats) -> dict[str, Any]:
    """Duration, per-entry figures with tokens and checks, and totals over whole requests (POST)."""
    duration = (_run["stop"] or time.time()) - (_run["start"] or time.time())
    entries: dict[str, dict[str, Any]] = {}
    for entry in sorted(stats.entries.values(), key=lambda e: e.name):
        if entry.method != "POST":
            continue
        row = _summary(entry)
        ttft = stats.entries.get((entry.name, "TTFT"))
        row["ttft"] = _summary(ttft) if ttft is not None else None
        row.update(_tokens.get(entry.name, {"responses": 0, "output_tokens": 0, "prompt_tokens": 0}))
        row["checks"] = _checks.get(entry.name)
        entries[entry.name] = row
    total = _summary(_merged(stats, "POST"))
    total["ttft"] = _summary(_merged(stats, "TTFT"))
    total["output_tokens"] = sum(t["output_tokens"] for t in _tokens.values())
    total["prompt_tokens"] = sum(t["prompt_tokens"] for t in _tokens.values())
    total["wrong_answers"] = sum(c["wrong"] for c in _checks.values())
    total["checked_answers"] = sum(c["right"] + c["wrong"] for c in _checks.values())
    total["requests_per_s"] = total["requests"] / duration if duration > 0 else None
    total["output_tokens_per_s"] = total["output_tokens"] / duration if duration > 0 else None
    errors = [{"name": e.name, "error": str(e.error), "occurrences": e.occurrences} for e in stats.errors.values()]
    return {"model": _run["model"], "duration_s": duration, "total": total, "entries": entries, "errors": errors}

"""The side-by-side tables of a load-test run (razor vs stock) and the files they are written to.

Input: the runner's results, one entry per backend holding the locustfile's extra report
(``locust``) and what the runner read from the server (``server``). Output: tables in the format of
``razor-vllm bench`` (rich, plain or Markdown, :mod:`razor_vllm.common.tables`), ``summary.json``
and ``summary.md``. Ratios are razor / stock from the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from razor_vllm.common.tables import Table, number, render, to_markdown

ENTRY_ORDER = ["chat", "chat stream", "passkey near", "passkey near stream", "passkey far", "passkey far stream"]


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _get(d: Optional[dict], *path: str) -> Any:
    for key in path:
        if d is None:
            return None
        d = d.get(key)
    return d


def _checks(locust: dict, word: str) -> tuple[int, int]:
    """(right, checked) over the passkey entries whose name contains ``word``."""
    right = checked = 0
    for name, entry in (locust.get("entries") or {}).items():
        if word in name and entry.get("checks"):
            right += entry["checks"]["right"]
            checked += entry["checks"]["right"] + entry["checks"]["wrong"]
    return right, checked


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100.0 * v


# The main table: (label, value getter, digits, whether razor/stock is worth a ratio).
HEADLINE: list[tuple[str, Callable[[dict], Optional[float]], int, bool]] = [
    ("requests completed", lambda b: _get(b, "locust", "total", "requests"), 0, True),
    ("requests/s", lambda b: _get(b, "locust", "total", "requests_per_s"), 3, True),
    ("latency p50 (ms)", lambda b: _get(b, "locust", "total", "p50_ms"), 0, True),
    ("latency p95 (ms)", lambda b: _get(b, "locust", "total", "p95_ms"), 0, True),
    ("TTFT p50 (ms, streams)", lambda b: _get(b, "locust", "total", "ttft", "p50_ms"), 0, True),
    ("TTFT p95 (ms, streams)", lambda b: _get(b, "locust", "total", "ttft", "p95_ms"), 0, True),
    ("output tokens/s", lambda b: _get(b, "locust", "total", "output_tokens_per_s"), 1, True),
    ("failures", lambda b: _get(b, "locust", "total", "failures"), 0, False),
    ("  of which wrong passkey answers", lambda b: _get(b, "locust", "total", "wrong_answers"), 0, False),
    ("peak running requests (server)", lambda b: _get(b, "server", "peak_running"), 0, True),
    ("peak waiting requests (server)", lambda b: _get(b, "server", "peak_waiting"), 0, False),
    ("peak KV cache usage (%)", lambda b: _pct(_get(b, "server", "peak_kv_usage")), 1, True),
    ("KV cache usage when idle after (%)", lambda b: _pct(_get(b, "server", "idle", "kv_cache_usage")), 1, False),
    ("preemptions", lambda b: _get(b, "server", "preemptions"), 0, False),
]


def tables(results: dict[str, Any]) -> list[Table]:
    backends: dict[str, dict] = results["backends"]
    names = list(backends)
    pair = "razor" in backends and "stock" in backends
    meta = results["meta"]
    columns = ["", *names] + (["razor/stock"] if pair else [])
    rows = []
    for label, getter, digits, ratio_ok in HEADLINE:
        values = [getter(backends[n]) for n in names]
        row = [label, *(number(v, digits) for v in values)]
        if pair:
            row.append(_ratio(getter(backends["razor"]), getter(backends["stock"])) if ratio_ok else "")
        rows.append(row)
    for label, word in (("passkey right near the window", "near"), ("passkey right far past the window", "far")):
        cells = []
        for n in names:
            right, checked = _checks(backends[n].get("locust") or {}, word)
            cells.append(f"{right}/{checked}" if checked else "-")
        rows.append([label, *cells] + ([""] if pair else []))
    title = (
        f"Load test: {meta['users']} users, spawn {meta['spawn_rate']}/s, {meta['run_time']} per backend "
        f"(locust, 127.0.0.1)"
    )
    note = (
        f"model {meta['model_name']}, max_model_len {meta['max_model_len']}, "
        f"KV {meta['kv_bytes'] / 2**20:.0f} MiB, "
        f"{meta['dtype']}; latency = whole request (streams: to [DONE]); failures include wrong passkey answers"
    )
    out = [Table(title, columns, rows, note=note)]

    entry_rows = []
    for entry in _entry_names(backends):
        cells: dict[str, list[str]] = {k: [] for k in ("n", "p50", "p95", "ttft", "prompt", "tok", "fail")}
        for n in names:
            e = _get(backends[n], "locust", "entries", entry) or {}
            cells["n"].append(number(e.get("requests")))
            cells["p50"].append(number(e.get("p50_ms")))
            cells["p95"].append(number(e.get("p95_ms")))
            cells["ttft"].append(number(_get(e, "ttft", "p50_ms")))
            responses = e.get("responses") or 0
            cells["prompt"].append(number(e["prompt_tokens"] / responses) if responses else "-")
            cells["tok"].append(number(e["output_tokens"] / responses, 1) if responses else "-")
            cells["fail"].append(number(e.get("failures")))
        entry_rows.append([entry] + ["/".join(cells[k]) for k in cells])
    out.append(
        Table(
            f"Per request type ({' / '.join(names)})",
            [
                "request",
                "completed",
                "p50 ms",
                "p95 ms",
                "TTFT p50 ms",
                "prompt tokens (mean)",
                "output tokens (mean)",
                "failures",
            ],
            entry_rows,
        )
    )
    return out


def _entry_names(backends: dict[str, dict]) -> list[str]:
    seen = {name for b in backends.values() for name in (_get(b, "locust", "entries") or {})}
    return [n for n in ENTRY_ORDER if n in seen] + sorted(seen - set(ENTRY_ORDER))


def write(results: dict[str, Any], out_dir: Path, fmt: str = "auto") -> tuple[Path, Path]:
    """Print the tables and write summary.json and summary.md into ``out_dir``."""
    tabs = tables(results)
    render(tabs, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "summary.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md_path = out_dir / "summary.md"
    md_path.write_text(f"```\n{results['meta']['command']}\n```\n\n" + "\n\n".join(to_markdown(t) for t in tabs) + "\n")
    return json_path, md_path

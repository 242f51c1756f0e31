"""The tables and the optional plot of ``razor-vllm bench``.

Rendering (rich, plain text, Markdown) and the JSON file: :mod:`razor_vllm.common.tables`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from razor_vllm.common.tables import Table, number

MIB = 1 << 20


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / MIB:.2f}"


def _x(v: Optional[float], digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}x"


NO_FIT = "no fit"


def _tok_s(point: dict[str, Any], key: str, digits: int = 0) -> str:
    return number(point[key], digits) if point else NO_FIT


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def tables(results: dict[str, Any]) -> list[Table]:
    out = []
    a = results["analytic"]
    bpt = a["bytes_per_token"]
    out.append(
        Table(
            "KV bytes per token",
            ["cache", "heads (pool incl. padding)", "block (tokens)", "bytes/token", "tokens kept per request"],
            [
                [
                    "stock",
                    # every KV head every rank holds (replicas when ranks outnumber KV heads)
                    f"{a['retrieval_heads'] + a['local_heads']}",
                    str(a["stock_block_size"]),
                    number(bpt["stock"]),
                    "all",
                ],
                [
                    "razor retrieval pool",
                    f"{a['retrieval_heads']} ({a['retrieval_pool_heads']})",
                    str(a["retrieval_block_size"]),
                    number(bpt["retrieval_pool"]),
                    "all",
                ],
                [
                    "razor local pool",
                    f"{a['local_heads']} ({a['local_pool_heads']})",
                    str(a["local_block_size"]),
                    number(bpt["local_pool"]),
                    f"sink {a['sink']} + window {a['window']} (+ compensation)",
                ],
            ],
            note=f"dtype {a['dtype']}; one razor page = {a['page_bytes']:,} B in either pool",
        )
    )
    tp = a.get("tensor_parallel")
    if tp and tp["tp_size"] > 1:
        rows = [[str(r["rank"]), str(r["profile"]), str(r["promoted"]), str(r["local"])] for r in tp["per_rank"]]
        tb = tp["retrieval_bytes_per_token"]
        out.append(
            Table(
                f"Tensor parallel {tp['tp_size']}: retrieval heads per rank ({tp['mode']})",
                ["rank", "profile heads", "promoted", "local heads"],
                rows,
                note=f"every rank sizes its pools for the heaviest; retrieval pool bytes/token over all ranks: "
                f"{number(tb['pools'])} vs {number(tb['unbalanced'])} if each rank held only its own profile heads "
                f"(+{100 * tp['cost']:.0f}%)",
            )
        )
    out.append(
        Table(
            "KV bytes per request (MiB)",
            ["context", "stock", "razor steady", "razor admission", "stock/razor steady", "stock/razor admission"],
            [
                [
                    _ctx(r["context"]),
                    _mib(r["stock_bytes"]),
                    _mib(r["razor_steady_bytes"]),
                    _mib(r["razor_admission_bytes"]),
                    _x(r["ratio_steady"]),
                    _x(r["ratio_admission"]),
                ]
                for r in a["requests"]
            ],
            note=(
                "admission = what vLLM reserves before admitting: with exact prefill every prompt block, "
                "held until the prompt is done (the transient)"
                if a.get("prefill", "exact") == "exact"
                else "admission = what vLLM reserves before admitting: the local pool is charged for the window "
                f"plus {a['in_flight_tokens']} in-flight tokens (max_num_batched_tokens)"
            )
            + f"; prefill {a.get('prefill', 'exact')}, window rule {a.get('window_rule', 'fixed')}",
        )
    )
    if a.get("window_rules"):
        out.append(
            Table(
                "KV bytes per request after the prompt, by window rule (MiB)",
                [
                    "context",
                    "stock",
                    "fixed window",
                    "razor fixed",
                    f"paper window (C={a['paper_ratio']:g})",
                    "razor paper",
                ],
                [
                    [
                        _ctx(r["context"]),
                        _mib(r["stock_bytes"]),
                        str(r["fixed_window"]),
                        _mib(r["fixed_steady_bytes"]),
                        str(r["paper_window"]),
                        _mib(r["paper_steady_bytes"]),
                    ]
                    for r in a["window_rules"]
                ],
                note="fixed: every request keeps `window` recent tokens; paper: max(window, ceil(N / C)) for an "
                "N-token prompt",
            )
        )
    out.append(
        Table(
            "Maximum concurrency, analytic (requests of `context` tokens in the KV size below)",
            ["context", "KV MiB", "stock", "razor vLLM-logged", "razor steady", "ratio steady", "ratio logged"],
            [
                [
                    _ctx(c["context"]),
                    _mib(c["kv_bytes"]),
                    number(c["stock"], 2),
                    number(c["razor_vllm_logged"], 2),
                    number(c["razor_steady"], 2),
                    _x(c["ratio_steady"]),
                    _x(c["ratio_vllm_logged"]),
                ]
                for c in a["max_concurrency"]
            ],
        )
    )
    if results.get("capacity"):
        rows = []
        for c in results["capacity"]:
            s, r = c["stock"], c["razor"]
            peak_r = str(r["peak_running"]) + ("" if r["saturated"] else "+")
            peak_s = str(s["peak_running"]) + ("" if s["saturated"] else "+")
            rows.append(
                [
                    _ctx(c["context"]),
                    _mib(c["kv_bytes"]),
                    f"{c['prompt_tokens']}+{c['max_tokens']}",
                    f"{s['num_gpu_blocks']}/{r['num_gpu_blocks']}",
                    number(s["vllm_max_concurrency"], 2),
                    number(r["vllm_max_concurrency"], 2),
                    peak_s,
                    peak_r,
                    _x(c["ratio_measured"]),
                    _x(c["ratio_vllm_logged"]),
                    _x(c["ratio_theory_steady"]),
                    f"{s['preemptions']}/{r['preemptions']}",
                ]
            )
        out.append(
            Table(
                "Capacity in the same KV memory (vLLM engine, scheduler stats)",
                [
                    "context",
                    "KV MiB",
                    "prompt+gen",
                    "blocks stock/razor",
                    "vLLM max conc. stock",
                    "razor",
                    "peak running stock",
                    "razor",
                    "measured ratio",
                    "vLLM-logged ratio",
                    "steady-state theory",
                    "preempt. s/r",
                ],
                rows,
                note="peak running = most requests vLLM ran at once; '+' = not saturated (all submitted ran)",
            )
        )
    if results.get("throughput"):
        rows = []
        for t in results["throughput"]:
            s, r = t["stock"] or {}, t["razor"] or {}
            rows.append(
                [
                    _ctx(t["context"]),
                    str(t["batch"]),
                    _tok_s(s, "prefill_tok_s"),
                    _tok_s(r, "prefill_tok_s"),
                    _x(t["ratio_prefill"]),
                    _tok_s(s, "decode_tok_s", 1),
                    _tok_s(r, "decode_tok_s", 1),
                    _x(t["ratio_decode"]),
                ]
            )
        out.append(
            Table(
                "Throughput (tokens/s)",
                [
                    "context",
                    "batch",
                    "prefill stock",
                    "prefill razor",
                    "razor/stock",
                    "decode stock",
                    "decode razor",
                    "razor/stock",
                ],
                rows,
                note=f"'{NO_FIT}': the batch cannot be in flight at once in that engine's KV cache (not run)",
            )
        )
    if results.get("prefix_workload"):
        out.append(prefix_workload_table(results["prefix_workload"]))
    return out


def prefix_workload_table(pw: dict[str, Any]) -> Table:
    """``bench --prefix-workload``: stock and razor side by side per phase (bench/prefix.py)."""
    w = pw["workload"]
    rows = []
    for row in pw["rows"]:
        for backend in ("stock", "razor"):
            p = row[backend]
            if p is None:
                rows.append([row["phase"], backend, "failed", "", "", "", "", "", ""])
                continue
            rows.append(
                [
                    row["phase"],
                    backend,
                    str(p["requests"]),
                    number(p["ttft_p50_s"], 2),
                    number(p["ttft_max_s"], 2),
                    f"{number(p['prefill_tokens'])} / {number(p['prompt_tokens'])}",
                    str(p["peak_running"]),
                    number(p["output_tok_s"], 1),
                    str(p["preemptions"]),
                ]
            )
        rows.append(
            [
                row["phase"],
                "razor/stock",
                "",
                _x(row["ratio_ttft_p50"]),
                "",
                _x(row["ratio_prefill_tokens"]),
                _x(row["ratio_peak_running"]),
                _x(row["ratio_output_tok_s"]),
                "",
            ]
        )
    return Table(
        f"Prefix-cache workload: a {w['doc_tokens']:,}-token document, {w['questions']} questions per phase "
        f"({w['question_tokens']} tokens, {w['answer_tokens']} generated), KV {_mib(w['kv_cache_bytes'])} MiB",
        [
            "phase",
            "backend",
            "requests",
            "TTFT p50 (s)",
            "TTFT max (s)",
            "prefill tokens computed / prompt",
            "peak running",
            "output tok/s",
            "preempt.",
        ],
        rows,
        note="both with prefix caching on; concurrent: all questions at once, document not cached yet; "
        "turns: one after another, document cached",
    )


def plot(results: dict[str, Any], path: Path) -> Optional[Path]:
    """Bytes per request, capacity and throughput ratios in one PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = 1 + bool(results.get("capacity")) + bool(results.get("throughput"))
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    a = results["analytic"]
    ctx = [r["context"] for r in a["requests"]]
    ax = axes.pop(0)
    ax.plot(ctx, [r["stock_bytes"] / MIB for r in a["requests"]], "o-", label="stock")
    ax.plot(ctx, [r["razor_admission_bytes"] / MIB for r in a["requests"]], "s--", label="razor (admission)")
    ax.plot(ctx, [r["razor_steady_bytes"] / MIB for r in a["requests"]], "s-", label="razor (steady)")
    ax.set(xlabel="context (tokens)", ylabel="KV MiB per request", title=f"KV per request ({a['dtype']})")
    ax.legend()
    ax.grid(alpha=0.3)
    if results.get("capacity"):
        ax = axes.pop(0)
        caps = results["capacity"]
        xs = range(len(caps))
        w = 0.2
        ax.bar([x - 1.5 * w for x in xs], [c["stock"]["peak_running"] for c in caps], w, label="stock peak")
        ax.bar([x - 0.5 * w for x in xs], [c["razor"]["peak_running"] for c in caps], w, label="razor peak")
        ax.bar(
            [x + 0.5 * w for x in xs],
            [c["razor"]["vllm_max_concurrency"] or 0 for c in caps],
            w,
            label="razor vLLM-logged",
        )
        ax.bar([x + 1.5 * w for x in xs], [c["razor_steady_concurrency"] for c in caps], w, label="razor steady theory")
        ax.set_xticks(list(xs), [_ctx(c["context"]) for c in caps])
        ax.set(xlabel="context", ylabel="requests at once", title="Capacity in the same KV memory")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    if results.get("throughput"):
        ax = axes.pop(0)
        tps = [t for t in results["throughput"] if t["ratio_decode"] is not None]
        labels = [f"{_ctx(t['context'])} x{t['batch']}" for t in tps]
        xs = range(len(tps))
        ax.bar([x - 0.2 for x in xs], [t["ratio_prefill"] for t in tps], 0.4, label="prefill")
        ax.bar([x + 0.2 for x in xs], [t["ratio_decode"] for t in tps], 0.4, label="decode")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels)
        ax.set(xlabel="context x batch", ylabel="razor / stock tokens/s", title="Throughput ratio")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

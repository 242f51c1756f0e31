"""Tables and plots of ``razor-vllm eval`` results (the JSON written by the command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from razor_vllm.common.tables import Table
from razor_vllm.eval.metrics import interval_by, mean_by, pareto_front, prefix_credit


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _ci(cell: tuple[float, float, float, int] | None) -> str:
    """ "mean [low, high]" in percent: the Wilson 95% interval of a cell's accuracy."""
    if cell is None:
        return "-"
    mean, low, high, _ = cell
    return f"{100 * mean:.0f} [{100 * low:.0f}-{100 * high:.0f}]"


def labels(results: dict[str, Any]) -> list[str]:
    return [v["label"] for v in results["meta"]["variants"]]


def tables(results: dict[str, Any]) -> list[Table]:
    names = labels(results)
    budgets = results["budgets"]
    out = []
    contexts = sorted({int(c) for b in budgets.values() for c in b})
    out.append(
        Table(
            "KV budget (share of the full cache's KV entries per request)",
            ["variant", "retrieval heads"] + [_ctx(c) for c in contexts],
            [
                [v["label"], f"{v['retrieval_heads']}/{v['total_heads']}"]
                + [_pct(budgets[v["label"]].get(str(c))) + "%" for c in contexts]
                for v in results["meta"]["variants"]
            ],
            note="head-tokens kept: retrieval heads everything, local heads sink + window + 1 compensation token",
        )
    )
    rows = results["tasks"]
    if rows:
        acc = interval_by(rows, ("variant", "task", "context"), "score")
        total = interval_by(rows, ("variant", "context"), "score")
        tasks = sorted({r["task"] for r in rows}, key=[r["task"] for r in rows].index)
        task_contexts = sorted({r["context"] for r in rows})
        body = [[t, _ctx(c)] + [_ci(acc.get((n, t, c))) for n in names] for t in tasks for c in task_contexts]
        body += [["all tasks", _ctx(c)] + [_ci(total.get((n, c))) for n in names] for c in task_contexts]
        per_cell = min(cell[3] for cell in acc.values())
        out.append(
            Table(
                "Task accuracy (%, Wilson 95% interval)",
                ["task", "context"] + names,
                body,
                note=f"at least {per_cell} prompts per cell, greedy; score = share of answers found",
            )
        )
        out.append(budget_table(results))
        if all("output" in r for r in rows):
            # Older result files have no stored partial credit; it follows from the stored output.
            rows = [r if "partial" in r else dict(r, partial=prefix_credit(r["answers"], r["output"])) for r in rows]
            part = mean_by(rows, ("variant", "task", "context"), "partial")
            body = [[t, _ctx(c)] + [_pct(part.get((n, t, c))) for n in names] for t in tasks for c in task_contexts]
            out.append(
                Table(
                    "Partial credit (%)",
                    ["task", "context"] + names,
                    body,
                    note="leading characters of each answer reproduced (e.g. 6 of 7 digits: 85.7)",
                )
            )
    fid = results["fidelity"]
    if fid:
        keys = ("variant", "context")
        kl, top1 = mean_by(fid, keys, "kl"), mean_by(fid, keys, "top1")
        nll, nll_full = mean_by(fid, keys, "nll"), mean_by(fid, keys, "nll_full")
        prefix, match = mean_by(fid, keys, "greedy_prefix"), mean_by(fid, keys, "greedy_match")
        body = []
        for n in names:
            for c in sorted({r["context"] for r in fid}):
                if (n, c) not in kl:
                    continue
                body.append(
                    [
                        n,
                        _ctx(c),
                        f"{kl[n, c]:.4f}",
                        _pct(top1[n, c]),
                        f"{nll[n, c] - nll_full[n, c]:+.4f}",
                        "-" if (n, c) not in prefix else f"{prefix[n, c]:.1f}",
                        _pct(match.get((n, c))),
                    ]
                )
        out.append(
            Table(
                "Fidelity to the full cache on Moby-Dick (teacher-forced decode)",
                [
                    "variant",
                    "prefix",
                    "KL (nats/token)",
                    "top-1 agree %",
                    "ΔNLL vs full",
                    "greedy prefix",
                    "greedy match %",
                ],
                body,
                note="KL(full || variant) of the next-token distribution, mean over positions and slices",
            )
        )
    return out


MATCH_POINTS = 2.0  # "razor matches full": within this many accuracy points over all task prompts


def budget_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every variant's KV budget at the longest task context and its accuracy over all task prompts (Wilson
    interval), with the gap to full in points; sorted by budget."""
    rows = results["tasks"]
    longest = max(r["context"] for r in rows)
    acc = interval_by(rows, ("variant",), "score")
    full = acc.get(("full",))
    made = []
    for v in results["meta"]["variants"]:
        cell = acc.get((v["label"],))
        if cell is None:
            continue
        gap = None if full is None else 100 * (cell[0] - full[0])
        made.append(
            dict(
                label=v["label"],
                prefill="-" if v["mode"] == "full" else v.get("prefill", "exact"),
                budget=results["budgets"][v["label"]][str(longest)],
                accuracy=cell,
                gap=gap,
                matches=gap is not None and gap >= -MATCH_POINTS,
            )
        )
    return sorted(made, key=lambda r: (r["budget"], r["label"]))


def smallest_matching(results: dict[str, Any]) -> dict[str, Any] | None:
    """The variant with the smallest KV budget whose accuracy is within ``MATCH_POINTS`` of full's (None:
    no variant but full is)."""
    return next((r for r in budget_rows(results) if r["matches"] and r["label"] != "full"), None)


def budget_table(results: dict[str, Any]) -> Table:
    rows = budget_rows(results)
    longest = max(r["context"] for r in results["tasks"])
    best = smallest_matching(results)
    verdict = (
        f"smallest KV budget within {MATCH_POINTS:g} points of full: {best['label']} at {_pct(best['budget'])}%"
        if best
        else f"no variant is within {MATCH_POINTS:g} points of full"
    )
    return Table(
        f"Accuracy against the KV budget (all task prompts; budget at {_ctx(longest)})",
        ["variant", "prefill", "KV budget", "accuracy % [95%]", "vs full (points)"],
        [
            [
                r["label"],
                r["prefill"],
                _pct(r["budget"]) + "%",
                _ci(r["accuracy"]),
                "-" if r["gap"] is None or r["label"] == "full" else f"{r['gap']:+.1f}",
            ]
            for r in rows
        ],
        note=verdict,
    )


def heatmap_data(results: dict[str, Any]) -> dict[str, dict[tuple[float, int], float]]:
    """Per variant: (depth, context) -> mean score over the tasks that place a needle at a depth."""
    rows = [r for r in results["tasks"] if r["depth"] is not None]
    depth_grid = results["meta"]["grid"]["depths"]
    snapped = [dict(r, depth=min(depth_grid, key=lambda d: abs(d - r["depth"]))) for r in rows]
    cells = mean_by(snapped, ("variant", "depth", "context"), "score")
    data: dict[str, dict[tuple[float, int], float]] = {}
    for (variant, depth, context), value in cells.items():
        data.setdefault(variant, {})[(depth, context)] = value
    return data


def plots(results: dict[str, Any], directory: Path) -> list[Path]:
    """heatmap.png (needle depth x length per variant) and budget.png (accuracy and fidelity vs KV budget)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    names = labels(results)
    data = heatmap_data(results)
    if data:
        depths = sorted({d for cells in data.values() for d, _ in cells})
        contexts = sorted({c for cells in data.values() for _, c in cells})
        shown = [n for n in names if n in data]
        fig, axes = plt.subplots(
            1,
            len(shown),
            figsize=(2.2 + 1.1 * len(contexts) * len(shown), 0.6 * len(depths) + 2),
            squeeze=False,
            sharey=True,
        )
        for ax, name in zip(axes[0], shown):
            grid = [[data[name].get((d, c), float("nan")) for c in contexts] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(contexts)), [_ctx(c) for c in contexts])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v == v:
                        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
            ax.set(title=name, xlabel="context (tokens)")
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy")
        path = directory / "heatmap.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    panels = [p for p in ("tasks", "fidelity") if results[p]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        budgets = results["budgets"]
        colours = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per variant in both panels
        for ax, panel in zip(axes[0], panels):
            value = "score" if panel == "tasks" else "top1"
            means = mean_by(results[panel], ("variant", "context"), value)
            cis = interval_by(results[panel], ("variant", "context"), value) if panel == "tasks" else {}
            if panel == "fidelity":  # the reference agrees with itself
                full = [v["label"] for v in results["meta"]["variants"] if v["mode"] == "full"]
                means.update({(label, c): 1.0 for label in full for _, c in list(means)})
            for name in names:
                pts = sorted((budgets[name][str(c)], v, c) for (n, c), v in means.items() if n == name)
                if not pts:
                    continue
                xs, ys = [100 * b for b, _, _ in pts], [100 * v for _, v, _ in pts]
                if cis:  # Wilson 95% intervals as error bars
                    low = [100 * (v - cis[name, c][1]) for _, v, c in pts]
                    high = [100 * (cis[name, c][2] - v) for _, v, c in pts]
                    ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, label=name, color=colours[name])
                else:
                    ax.plot(xs, ys, "o-", label=name, color=colours[name])
            ax.set(
                xlabel="KV budget (% of full cache)",
                xlim=(0, 105),
                ylabel="task accuracy (%)" if panel == "tasks" else "top-1 agreement with full (%)",
                title="Accuracy vs KV budget" if panel == "tasks" else "Fidelity vs KV budget",
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle("each point: one context length (longer context = smaller budget)", fontsize=9)
        path = directory / "budget.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    pareto = pareto_plot(results, directory)
    if pareto is not None:
        written.append(pareto)
    return written


def pareto_data(results: dict[str, Any]) -> dict[str, list[tuple[float, float, str]]]:
    """Per prefill mode: (KV budget at the longest task context, accuracy there, label) of every razor
    variant (a retrieval-share x window sweep gives the cloud), for the accuracy-vs-budget front."""
    rows = results["tasks"]
    if not rows:
        return {}
    longest = max(r["context"] for r in rows)
    acc = mean_by([r for r in rows if r["context"] == longest], ("variant",), "score")
    data: dict[str, list[tuple[float, float, str]]] = {}
    for v in results["meta"]["variants"]:
        if v["mode"] in ("razor", "random", "streaming") and (v["label"],) in acc:
            budget = results["budgets"][v["label"]][str(longest)]
            data.setdefault(v.get("prefill", "exact"), []).append((budget, acc[(v["label"],)], v["label"]))
    return data


def pareto_plot(results: dict[str, Any], directory: Path) -> Path | None:
    """pareto.png: accuracy vs KV budget of every razor variant, one panel per prefill mode, the
    Pareto front drawn through the variants no other beats (smaller budget and higher accuracy)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = pareto_data(results)
    if not data:
        return None
    full = mean_by(results["tasks"], ("variant",), "score").get(("full",))
    fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.5), squeeze=False, sharey=True)
    for ax, (mode, points) in zip(axes[0], sorted(data.items())):
        ax.scatter([100 * b for b, _, _ in points], [100 * a for _, a, _ in points], color="C0", s=18)
        for b, a, label in points:
            ax.annotate(label.removeprefix("razor "), (100 * b, 100 * a), fontsize=6, alpha=0.7)
        front = pareto_front(points)
        ax.plot([100 * b for b, _, _ in front], [100 * a for _, a, _ in front], "-", color="C3", label="Pareto front")
        if full is not None:
            ax.axhline(100 * full, color="k", ls="--", lw=1, label="full cache")
        ax.set(title=f"{mode} prefill", xlabel="KV budget at the longest context (% of full)", xlim=(0, 105))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("task accuracy (%)")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pareto.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

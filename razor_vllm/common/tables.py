"""Result tables (rich, plain text or Markdown) and the JSON file: the output of every command that reports
figures (``razor-vllm bench``, ``razor-vllm eval``, ``python -m loadtest``, ``python -m loadtest.soak``)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def number(v: Optional[float], digits: int = 0) -> str:
    """A table cell: thousands separators, "-" for a missing or NaN value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


FORMATS = ("auto", "rich", "plain", "markdown")  # what ``render`` draws; the commands' --format choices


def render(tabs: Sequence[Table], fmt: str = "auto", stream: Optional[TextIO] = None) -> None:
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "rich" if _has_rich() else "plain"
    for table in tabs:
        if fmt == "rich":
            _render_rich(table, stream)
        elif fmt == "markdown":
            stream.write(to_markdown(table) + "\n\n")
        else:
            stream.write(to_plain(table) + "\n\n")
    stream.flush()


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _render_rich(table: Table, stream: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    t = RichTable(title=table.title, caption=table.note or None)
    for i, col in enumerate(table.columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in table.rows:
        t.add_row(*row)
    console = Console(file=stream)
    if not console.is_terminal:
        console = Console(file=stream, width=200)  # not a terminal: do not wrap at 80 columns
    console.print(t)
    console.print()


def to_plain(table: Table) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(table.columns, *table.rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    parts = [table.title, line(table.columns), "  ".join("-" * w for w in widths)]
    parts += [line(r) for r in table.rows]
    if table.note:
        parts.append(f"({table.note})")
    return "\n".join(parts)


def to_markdown(table: Table) -> str:
    parts = [
        f"**{table.title}**",
        "",
        "| " + " | ".join(table.columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.columns))) + "|",
    ]
    parts += ["| " + " | ".join(r) + " |" for r in table.rows]
    if table.note:
        parts += ["", f"_{table.note}_"]
    return "\n".join(parts)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return path

"""The Markdown tables the benchmark scripts print and write to their report.md."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["markdown_table", "write_report"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """A title line, a blank line and a table; every column after the first is right-aligned (numbers)."""
    lines = [title, ""] if title else []
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(headers) - 1)) + " |")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, table: str, results: object) -> None:
    """Print `table` and write it to OUT/report.md, with `results` as JSON in OUT/results.json."""
    import json

    print(table)
    (out / "report.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))

"""Markdown tables and number formatting shared by every section of a run's report."""

from __future__ import annotations


def fmt(value, digits: int = 3) -> str:
    """A number as the report prints it: thousands separated, `digits` decimals, "–" for None."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]

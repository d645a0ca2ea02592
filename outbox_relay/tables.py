"""Plain-text tables for the command-line status reports."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str = ""
) -> str:
    """Columns separated by two spaces, aligned by ``align``: ``l`` or ``r`` each.

    By default the first column is left-aligned and the rest right-aligned,
    since numbers read best right-aligned and names left-aligned. Trailing
    spaces are dropped so a wide last column does not pad every line.
    """
    align = align or "l" + "r" * (len(header) - 1)
    widths = [
        max(len(row[index]) for row in [header, *rows]) for index in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        aligned = [
            cell.ljust(width) if align[index] == "l" else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(aligned).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def format_seconds(seconds: float | None) -> str:
    """A duration for people: ``0.042s``, ``3.4s``, ``2m05s``, ``1h02m03s``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds:.3f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"

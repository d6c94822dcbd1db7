"""Formatting and report-access helpers shared by the report page modules (report_html, report_plots,
report_reproduce).

Every helper tolerates missing or oddly typed values: reports come from older versions and from
jobs without some steps. The names keep their leading underscore: they serve these modules only.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Iterable

_DASH = "\u2014"


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any, kind: str = "") -> str:
    """A report value as escaped display text: counts, bytes, rates, milliseconds."""
    number = _num(value)
    if number is None:
        return _DASH if value is None or value == "" else _e(value)
    if kind == "int":
        return f"{int(number):,}"
    if kind == "bytes":
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(number) >= scale:
                return f"{number / scale:.2f} {unit}"
        return f"{int(number)} B"
    if kind == "pct":
        return f"{number:.2%}"
    if kind == "ms":
        return f"{number:.2f} ms"
    if kind == "si":
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(number) >= scale:
                return f"{number / scale:.2f} {unit}"
        return f"{number:g}"
    return f"{number:.4g}"


def _change(before: Any, after: Any, kind: str) -> str:
    a, b = _num(before), _num(after)
    if a is None or b is None:
        return ""
    if kind in ("pct", "rate"):
        return f"{(b - a) * 100:+.2f} pp" if kind == "pct" else f"{b - a:+.4f}"
    if a == 0:
        return ""
    return f"\u00d7{b / a:.3g}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = (), marked: Iterable[int] = ()) -> str:
    """A table of already-escaped cells; the ``numeric`` columns are right-aligned, the ``marked`` rows highlighted."""
    right, highlight = set(numeric), set(marked)
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        ('<tr class="marked">' if r in highlight else "<tr>")
        + "".join(f'<td class="n">{c}</td>' if i in right else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for r, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dl(pairs: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs if v not in ("", None)) + "</dl>"


def _steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for step in _l(report.get("steps")) if isinstance(step, dict)]


def _step_label(step: dict[str, Any]) -> str:
    return f"{step.get('index', '?')}: {step.get('kind', 'step')}"


def _bench_rows(step: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in _l(_d(step.get("details")).get("results")) if isinstance(r, dict)]


def _benchmarks(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in _steps(report) if s.get("kind") == "benchmark"]


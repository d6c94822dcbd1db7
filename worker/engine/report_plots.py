"""The report page's inline SVG plots: latency against size, accuracy per step, per-layer sparsity."""

from __future__ import annotations

import math
from typing import Any

from worker.engine.report_format import _bench_rows, _benchmarks, _d, _e, _num, _step_label, _steps

MAX_SPARSITY_BARS = 40


def _ticks(high: float, count: int = 5) -> list[float]:
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(high / step)) + 1)]


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
            f'font-family="system-ui,sans-serif" font-size="12">{body}</svg>')


def latency_points(report: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None, list[str]]:
    """(points {label, size, p50}, batch size, notes): the original and each model state a benchmark timed."""
    benchmarks = _benchmarks(report)
    if not benchmarks:
        return [], None, []
    sizes = [{r.get("batch_size") for r in _bench_rows(s)} for s in benchmarks]
    shared = set.intersection(*sizes) - {None}
    batch = 1 if 1 in shared else min(shared) if shared else None
    if batch is None:
        return [], None, ["the benchmark steps share no batch size"]

    def p50(step: dict[str, Any], who: str) -> float | None:
        row = next((r for r in _bench_rows(step) if r.get("batch_size") == batch), {})
        return _num(_d(row.get(who)).get("p50_ms"))

    states = [{"label": "original", "size": _num(_d(report.get("original")).get("size_bytes")), "p50": p50(benchmarks[0], "original")}]
    for step in _steps(report):
        if step.get("kind") == "benchmark":
            states[-1]["p50"] = p50(step, "model") if states[-1]["label"] != "original" else states[-1]["p50"]
            continue
        states.append({"label": _step_label(step), "size": _num(_d(step.get("after")).get("size_bytes")), "p50": None})
    points = [s for s in states if s["size"] is not None and s["p50"] is not None]
    missing = [s["label"] for s in states if s not in points]
    notes = [f"not timed: {', '.join(missing)} (no benchmark step after it)"] if missing else []
    return points, batch, notes


def latency_plot(report: dict[str, Any]) -> str:
    points, batch, notes = latency_points(report)
    if not points:
        return "<p class=\"muted\">No timings: add a <code>benchmark</code> step.</p>" + "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    width, height, left, right, top, bottom = 520, 320, 60, 20, 16, 46
    mib = [p["size"] / 2**20 for p in points]
    x_ticks, y_ticks = _ticks(max(mib) * 1.08), _ticks(max(p["p50"] for p in points) * 1.12)
    sx = lambda v: left + v / x_ticks[-1] * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - v / y_ticks[-1] * (height - top - bottom)  # noqa: E731
    body = [_axes(width, height, left, right, top, bottom, x_ticks, y_ticks, sx, sy, "size (MiB)", f"p50 latency, batch {batch} (ms)")]
    path = " ".join(f"{sx(m):.1f},{sy(p['p50']):.1f}" for m, p in zip(mib, points))
    body.append(f'<polyline points="{path}" fill="none" stroke="#8c959f" stroke-dasharray="4 3"/>')
    for i, (m, p) in enumerate(zip(mib, points)):
        x, y = sx(m), sy(p["p50"])
        color = "#59636e" if i == 0 else "#0969da"
        anchor, dx = ("end", -8) if x > width * 0.7 else ("start", 8)
        dy = -8 if i % 2 == 0 else 16
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"><title>{_e(p["label"])}: {p["p50"]:.2f} ms, {m:.2f} MiB</title></circle>')
        body.append(f'<text x="{x + dx:.1f}" y="{y + dy:.1f}" text-anchor="{anchor}">{_e(p["label"])} ({p["p50"]:.1f} ms)</text>')
    return _svg(width, height, "".join(body), "latency versus size") + "".join(f'<p class="note">{_e(n)}</p>' for n in notes)


def _axes(width: int, height: int, left: int, right: int, top: int, bottom: int, x_ticks: list[float] | None,
          y_ticks: list[float], sx: Any, sy: Any, x_label: str, y_label: str, y_format: str = "{:g}") -> str:
    parts = []
    for t in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eaeef2"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" fill="#59636e">{y_format.format(t)}</text>')
    for t in x_ticks or []:
        parts.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle" fill="#59636e">{t:g}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#59636e"/>'
                 f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#59636e"/>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">{_e(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
    return "".join(parts)


def accuracy_plot(report: dict[str, Any]) -> str:
    states = [("original", _d(report.get("original")))]
    states += [(_step_label(s), _d(s.get("after"))) for s in _steps(report) if s.get("kind") != "benchmark"]
    if all(_num(m.get("top1")) is None for _, m in states):
        return '<p class="muted">No accuracy: the job had no labelled evaluation data. Attach a dataset with labels to see top-1 / top-5 per step.</p>'
    width, height, left, right, top, bottom = 520, 320, 50, 14, 40, 46
    y_ticks = [0, 25, 50, 75, 100]
    sy = lambda v: height - bottom - v / 100 * (height - top - bottom)  # noqa: E731
    body = [_axes(width, height, left, right, top, bottom, None, y_ticks, None, sy, "model after step", "accuracy (%)", "{:g}%")]
    slot = (width - left - right) / len(states)
    bar = min(36.0, slot * 0.38)
    for i, (label, metrics) in enumerate(states):
        centre = left + slot * (i + 0.5)
        for j, (key, color) in enumerate((("top1", "#0969da"), ("top5", "#9ecbff"))):
            value = _num(metrics.get(key))
            if value is None:
                continue
            x, y = centre - bar + j * bar, sy(value * 100)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{sy(0) - y:.1f}" fill="{color}">'
                        f"<title>{_e(label)} {key}: {value:.2%}</title></rect>")
            body.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="10">{value * 100:.0f}</text>')
        short = label if len(label) <= 16 else label[:15] + "\u2026"
        body.append(f'<text x="{centre:.1f}" y="{height - bottom + 16}" text-anchor="middle">{_e(short)}</text>')
    body.append(f'<rect x="{width - 150}" y="6" width="10" height="10" fill="#0969da"/><text x="{width - 136}" y="15">top-1</text>'
                f'<rect x="{width - 90}" y="6" width="10" height="10" fill="#9ecbff"/><text x="{width - 76}" y="15">top-5</text>')
    return _svg(width, height, "".join(body), "accuracy per step")


def sparsity_plot(report: dict[str, Any]) -> str:
    layers = {str(k): _num(v) for k, v in _d(_d(report.get("final")).get("layer_sparsity")).items()}
    layers = {k: v for k, v in layers.items() if v is not None}
    if not layers:
        return '<p class="muted">No per-layer sparsity in this report.</p>'
    ranked = sorted(layers.items(), key=lambda item: -item[1])[:MAX_SPARSITY_BARS]  # stable: model order among equals
    width, left, right, top, row = 1040, 290, 60, 24, 18
    height = top + row * len(ranked) + 10
    scale = lambda v: left + v * (width - left - right)  # noqa: E731
    body = []
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        body.append(f'<line x1="{scale(t):.1f}" x2="{scale(t):.1f}" y1="{top - 4}" y2="{height - 8}" stroke="#eaeef2"/>'
                    f'<text x="{scale(t):.1f}" y="{top - 8}" text-anchor="middle" fill="#59636e">{t:.0%}</text>')
    for i, (name, value) in enumerate(ranked):
        y = top + i * row
        short = name if len(name) <= 42 else "\u2026" + name[-41:]
        body.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end"><title>{_e(name)}</title>{_e(short)}</text>')
        body.append(f'<rect x="{left}" y="{y + 3}" width="{max(0.0, scale(value) - left):.1f}" height="{row - 5}" fill="#8250df">'
                    f"<title>{_e(name)}: {value:.2%}</title></rect>")
        body.append(f'<text x="{scale(value) + 5:.1f}" y="{y + 13}" fill="#59636e">{value:.1%}</text>')
    note = f'<p class="note">the {len(ranked)} sparsest of {len(layers)} conv / linear layers</p>' if len(layers) > len(ranked) else ""
    return _svg(width, height, "".join(body), "per-layer sparsity") + note


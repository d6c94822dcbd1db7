"""report.json as one self-contained HTML page: tables, verdicts and inline SVG plots.

Standard library only, no scripts, fonts or network: the page opens from a file or an e-mail
attachment. Every string taken from the report is escaped (layer names and messages come from
the user), and every key may be missing (older reports, jobs without a benchmark step).
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any, Callable, Iterable

MAX_SPARSITY_BARS = 40
VERDICT_CLASSES = {"faster": "v-faster", "smaller only": "v-smaller", "no gain": "v-none"}
VERDICT_ICONS = {"faster": "\u25b2", "smaller only": "\u25c6", "no gain": "\u25a0"}
_DASH = "\u2014"

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f6f7f9;color:#1f2328;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:24px 20px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#59636e;margin:0 0 16px}.muted{color:#59636e}.note{color:#59636e;font-size:13px;margin:4px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(250px,1fr));gap:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 14px}
.card h3{margin:0 0 6px}.card dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:2px 12px}
.card dt{color:#59636e}.card dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;min-width:50%}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.verdict{display:flex;gap:12px;align-items:flex-start;border-radius:8px;padding:10px 14px;margin:8px 0;border:1px solid}
.pill{display:inline-block;border-radius:999px;padding:2px 12px;font-weight:700;white-space:nowrap}
.v-faster{background:#dafbe1;border-color:#4ac26b}.v-faster .pill{background:#1a7f37;color:#fff}
.v-smaller{background:#fff8c5;border-color:#d4a72c}.v-smaller .pill{background:#9a6700;color:#fff}
.v-none{background:#ffebe9;border-color:#ff8182}.v-none .pill{background:#cf222e;color:#fff}
.v-unknown{background:#fff;border-color:#d0d7de}.v-unknown .pill{background:#59636e;color:#fff}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.steps{display:flex;flex-direction:column;gap:10px}.steps .card table{min-width:560px}.card pre{max-height:320px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px}
figure.wide{margin-top:12px}figcaption{font-weight:600;margin-bottom:4px}svg{display:block;width:100%;height:auto}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px;overflow-x:auto;white-space:pre}
details{margin:4px 0 10px}summary{cursor:pointer;color:#0969da}
footer{margin-top:36px;color:#59636e;font-size:12px}
"""


# -- small helpers -------------------------------------------------------------------------------

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


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = ()) -> str:
    """A table of already-escaped cells; the ``numeric`` columns are right-aligned."""
    right = set(numeric)
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in right else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
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


# -- sections ------------------------------------------------------------------------------------

def _summary(report: dict[str, Any]) -> str:
    model, data, env, spec = (_d(report.get(k)) for k in ("model", "dataset", "environment", "spec"))
    kwargs = model.get("arch_kwargs")
    model_card = _dl([
        ("architecture", _e(model.get("architecture") or "(exported program)")),
        ("format", _e(model.get("format", _DASH))),
        ("arch_kwargs", f"<code>{_e(json.dumps(kwargs))}</code>" if kwargs else ""),
        ("parameters", _fmt(model.get("params"), "int")),
        ("input shape", _e(model.get("input_shape", _DASH))),
        ("outputs", _fmt(model.get("num_outputs"), "int")),
    ])
    classes = _l(data.get("classes"))
    more = " \u2026" if len(classes) > 12 else ""
    data_card = _dl([
        ("samples", _fmt(data.get("samples"), "int")),
        ("classes", f"{len(classes)}: {_e(', '.join(map(str, classes[:12])))}{more}" if classes else ""),
        ("input shape", _e(data.get("input_shape", _DASH))),
        ("train / eval", f"{_fmt(data.get('train_samples'), 'int')} / {_fmt(data.get('eval_samples'), 'int')}"),
    ]) if data else '<p class="muted">No dataset: accuracy and fidelity were not measured.</p>'
    env_card = _dl([
        ("device", _e(env.get("device", _DASH))),
        ("torch", _e(env.get("torch", _DASH))),
        ("python", _e(env.get("python", ""))),
        ("threads", _fmt(env.get("threads"), "int")),
        ("CPU", f"{_e(env.get('cpu', _DASH))}" + (f" ({_fmt(env.get('cpu_count'), 'int')} cores)" if env.get("cpu_count") else "")),
        ("GPU", _e(env.get("gpu") or "none") + (f" (CUDA {_e(env['cuda'])})" if env.get("cuda") else "")),
    ])
    kinds = " \u2192 ".join(_e(s.get("kind", "?")) for s in _steps(report)) or _DASH
    job_card = _dl([
        ("steps", kinds),
        ("device asked", _e(spec.get("device", ""))),
        ("seed", _e(spec.get("seed", ""))),
        ("duration", f"{_fmt(report.get('duration_s'))} s" if _num(report.get("duration_s")) is not None else ""),
        ("schema", _e(report.get("schema_version", "?"))),
    ])
    cards = [("Model", model_card), ("Dataset", data_card), ("Environment", env_card), ("Job", job_card)]
    return '<div class="cards">' + "".join(f'<div class="card"><h3>{t}</h3>{c}</div>' for t, c in cards) + "</div>"


def _verdicts(report: dict[str, Any]) -> str:
    verdicts = _d(report.get("verdicts"))
    if not verdicts:
        return '<p class="muted">No verdict in this report (no model artifact was written, or the report predates verdicts).</p>'
    parts = []
    for name, entry in verdicts.items():
        entry = _d(entry)
        verdict = str(entry.get("verdict", "unknown"))
        css = VERDICT_CLASSES.get(verdict, "v-unknown")
        icon = VERDICT_ICONS.get(verdict, "?")
        parts.append(
            f'<div class="verdict {css}"><span class="pill">{icon} {_e(verdict)}</span>'
            f"<div><code>{_e(name)}</code><br>{_e(entry.get('reason', ''))}</div></div>"
        )
    return "".join(parts)


def _targets(report: dict[str, Any]) -> str:
    targets = _d(report.get("targets"))
    if not targets:
        return ""
    met = targets.get("met")
    overall = '<span class="ok">all met</span>' if met else '<span class="bad">missed</span>'
    rows = [
        [
            f"<code>{_e(c.get('name', '?'))}</code>", _fmt(c.get("target")), _fmt(c.get("measured")),
            '<span class="ok">\u2714 met</span>' if c.get("met") else '<span class="bad">\u2718 missed</span>',
            _e(c.get("reason", "")),
        ]
        for c in map(_d, _l(targets.get("checks")))
    ]
    return f"<h2>Targets: {overall}</h2>" + _table(["target", "goal", "measured", "result", "how"], rows, (1, 2))


METRIC_ROWS = (  # key, label, kind for _fmt, kind for _change
    ("params", "parameters", "int", "ratio"),
    ("nonzero_params", "nonzero parameters", "int", "ratio"),
    ("sparsity", "sparsity", "pct", "pct"),
    ("macs", "MACs (batch 1)", "si", "ratio"),
    ("size_bytes", "size", "bytes", "ratio"),
    ("compressed_size_bytes", "compressed size (zlib)", "bytes", "ratio"),
    ("sparse_size_bytes_estimate", "sparse storage estimate", "bytes", "ratio"),
    ("top1", "top-1 accuracy", "pct", "pct"),
    ("top5", "top-5 accuracy", "pct", "pct"),
    ("top1_agreement", "top-1 agreement with original", "pct", "pct"),
    ("output_cosine", "output cosine vs original", "", "rate"),
    ("output_kl", "output KL vs original", "", "rate"),
)
_NOTES = ("macs_note", "accuracy_note", "fidelity_note")


def _metrics_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = []
    for key, label, kind, change in METRIC_ROWS:
        if key not in before and key not in after:
            continue
        rows.append([_e(label), _fmt(before.get(key), kind), _fmt(after.get(key), kind), _change(before.get(key), after.get(key), change)])
    notes = {after.get(k) or before.get(k) for k in _NOTES} - {None, ""}
    return _table(["metric", "before", "after", "change"], rows, (1, 2, 3)) + "".join(f'<p class="note">{_e(n)}</p>' for n in sorted(map(str, notes)))


def _steps_section(report: dict[str, Any]) -> str:
    parts = []
    for step in _steps(report):
        spec = {k: v for k, v in _d(step.get("spec")).items() if k != "kind" and v not in (None, [], {})}
        duration = _num(step.get("duration_s"))
        took = f" \u00b7 took {duration:.2f} s" if duration is not None else ""
        body = [f'<p class="note">settings: <code>{_e(json.dumps(spec, default=str)) if spec else "defaults"}</code>{took}</p>']
        if step.get("kind") == "benchmark":  # timing does not change the model: its table is under Benchmark
            body.append('<p class="note">The model is unchanged by this step; its timings are under Benchmark.</p>')
        else:
            body.append(_metrics_table(_d(step.get("before")), _d(step.get("after"))))
            details = _d(step.get("details"))
            notes = [details.get("note")] + _l(details.get("notes"))
            body += [f'<p class="note">{_e(n)}</p>' for n in notes if n]
            if step.get("details"):
                text = json.dumps(step["details"], indent=1, default=str)
                body.append(f"<details><summary>details of this step</summary><pre>{_e(text)}</pre></details>")
        parts.append(f'<div class="card"><h3>Step {_e(_step_label(step))}</h3>{"".join(body)}</div>')
    return f'<div class="steps">{"".join(parts)}</div>' if parts else '<p class="muted">No steps recorded.</p>'


def _benchmark_section(report: dict[str, Any]) -> str:
    benchmarks = _benchmarks(report)
    if not benchmarks:
        return '<p class="muted">Speed was not measured: add a <code>benchmark</code> step to the job.</p>'
    parts = []
    for step in benchmarks:
        details = _d(step.get("details"))
        rows = []
        for row in _bench_rows(step):
            model, original = _d(row.get("model")), _d(row.get("original"))
            significant = row.get("speedup_significant")
            slower = row.get("slowdown_significant")
            verdict = ('<span class="ok">yes, faster</span>' if significant else '<span class="bad">yes, slower</span>' if slower
                       else '<span class="muted">no (within noise)</span>' if significant is not None else _DASH)
            speedup = _num(row.get("speedup_vs_original"))
            rows.append([
                _fmt(row.get("batch_size"), "int"),
                f"{_fmt(model.get('p50_ms'), 'ms')}<br><span class=muted>{_fmt(original.get('p50_ms'), 'ms')}</span>",
                f"{_fmt(model.get('p95_ms'), 'ms')}<br><span class=muted>{_fmt(original.get('p95_ms'), 'ms')}</span>",
                f"{_fmt(model.get('mean_ms'), 'ms')}<br><span class=muted>{_fmt(original.get('mean_ms'), 'ms')}</span>",
                f"{_fmt(model.get('throughput_per_s'))}/s<br><span class=muted>{_fmt(original.get('throughput_per_s'))}/s</span>",
                f"\u00d7{speedup:.3g}" if speedup is not None else _DASH,
                verdict,
            ])
        parts.append(f"<h3>Step {_e(_step_label(step))}</h3>")
        parts.append(_table(["batch", "p50 latency", "p95 latency", "mean latency", "throughput", "speedup (p50)", "significant"], rows, range(6)))
        parts.append(
            f'<p class="note">first line: this model; second line, grey: the original, timed alternately with it. '
            f"device {_e(details.get('device', _DASH))}, threads {_e(details.get('threads') or 'default')}, "
            f"{_e(details.get('warmup', '?'))} warm-up + {_e(details.get('repetitions', '?'))} timed runs per batch size.</p>"
        )
        if details.get("note"):
            parts.append(f'<p class="note">{_e(details["note"])}</p>')
    return "".join(parts)


def _exports(report: dict[str, Any]) -> str:
    export = _d(report.get("export"))
    rows = []
    for name, status in export.items():
        status = _d(status)
        ok = status.get("ok")
        check = status.get("verified")
        state = ('<span class="ok">written</span>' if ok else '<span class="bad">skipped</span>')
        verified = "yes" if check is True else "no" if check is False else _DASH
        info = status.get("reason") or status.get("note") or ""
        if status.get("mode"):
            info = f"{status['mode']}; {info}" if info else status["mode"]
        diff = _num(status.get("max_abs_diff"))
        rows.append([_e(name), state, _e(verified), f"{diff:.2e}" if diff is not None else _DASH, _e(info)])
    artifacts = [
        [f"<code>{_e(a.get('name', '?'))}</code>", _e(a.get("kind", "")), _e(a.get("format", "")), _e(a.get("description", ""))]
        for a in map(_d, _l(report.get("artifacts")))
    ]
    html = _table(["export", "result", "reloaded and checked", "max abs diff", "mode / reason"], rows) if rows else ""
    html += _table(["artifact", "kind", "format", "description"], artifacts) if artifacts else ""
    return html or '<p class="muted">No export information.</p>'


# -- plots ---------------------------------------------------------------------------------------

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


def _latency_plot(report: dict[str, Any]) -> str:
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


def _accuracy_plot(report: dict[str, Any]) -> str:
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


def _sparsity_plot(report: dict[str, Any]) -> str:
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


# -- reproduction --------------------------------------------------------------------------------

_LOAD_SAFETENSORS = '''structure = json.load(open("structure.json"))
model = torchvision.models.get_model(structure["architecture"], weights=None, **structure["arch_kwargs"])
modules = dict(model.named_modules())
for name, record in structure["layers"].items():  # structured pruning resized some layers
    for attr, value in record.items():
        if attr != "type" and attr in modules[name].__dict__:
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
for key, shape in structure["tensors"].items():
    owner, _, attr = key.rpartition(".")
    module = modules[owner]
    table = module._parameters if attr in module._parameters else module._buffers
    if table.get(attr) is not None and list(table[attr].shape) != shape:
        fresh = torch.zeros(shape, dtype=table[attr].dtype)
        table[attr] = torch.nn.Parameter(fresh) if table is module._parameters else fresh
dtype = getattr(torch, structure.get("input_dtype", "float32"))
model = model.to(dtype)
model.load_state_dict(load_file("model.safetensors"))'''


def reproduce_snippet(report: dict[str, Any]) -> str:
    """Standalone Python (torch, torchvision, safetensors; no ModelPress) that loads the result and times it."""
    names = {_d(a).get("name") for a in _l(report.get("artifacts"))}
    architecture = _d(report.get("model")).get("architecture")
    bench = _d(_benchmarks(report)[-1].get("details")) if _benchmarks(report) else {}
    batch_sizes = [r.get("batch_size") for r in _bench_rows(_benchmarks(report)[-1])] if bench else [1]
    shape = _d(report.get("model")).get("input_shape") or [3, 224, 224]
    device = "cuda" if str(bench.get("device") or _d(report.get("environment")).get("device", "cpu")).startswith("cuda") else "cpu"
    imports = ["import statistics", "import time", "", "import torch"]
    if "model.safetensors" in names and architecture:
        imports[:0] = ["import json"]
        imports += ["import torchvision", "from safetensors.torch import load_file"]
        load = _LOAD_SAFETENSORS
    elif "model.torchscript.pt" in names:
        load = 'model = torch.jit.load("model.torchscript.pt", map_location="cpu")  # int8 models run on the CPU\ndtype = torch.float32'
    elif "model.pt2" in names:
        load = 'model = torch.export.load("model.pt2").module()\ndtype = torch.float32'
    else:
        return "# This job wrote no model artifact that can be loaded and timed."
    settings = (f"INPUT_SHAPE = {json.dumps([int(v) for v in shape if _num(v) is not None])}\n"
                f"BATCH_SIZES = {json.dumps([int(b) for b in batch_sizes if _num(b) is not None] or [1])}\n"
                f"WARMUP, REPETITIONS = {int(_num(bench.get('warmup')) or 5)}, {int(_num(bench.get('repetitions')) or 30)}\n"
                f"DEVICE = {device!r}\n")
    threads = _num(bench.get("threads"))
    if threads is not None:
        settings += f"torch.set_num_threads({int(threads)})\n"
    timing = '''model = model.eval().to(DEVICE)
sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
with torch.no_grad():
    for batch_size in BATCH_SIZES:
        x = torch.randn(batch_size, *INPUT_SHAPE).to(DEVICE, dtype)
        for _ in range(WARMUP):
            model(x)
        sync()
        times = []
        for _ in range(REPETITIONS):
            began = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - began) * 1000)
        times.sort()
        p50, p95 = times[round(0.5 * (len(times) - 1))], times[round(0.95 * (len(times) - 1))]
        print(f"batch {batch_size}: p50 {p50:.2f} ms, p95 {p95:.2f} ms, "
              f"{batch_size * 1000 / statistics.fmean(times):.1f} samples/s")'''
    return "\n".join(imports) + "\n\n" + settings + "\n" + load + "\n\n" + timing + "\n"


def _reproduce(report: dict[str, Any]) -> str:
    env = _d(report.get("environment"))
    parts = []
    for step in _benchmarks(report):
        details = _d(step.get("details"))
        sizes = ", ".join(_e(r.get("batch_size")) for r in _bench_rows(step))
        parts.append(
            f"<li>step {_e(_step_label(step))}: device {_e(details.get('device', env.get('device', _DASH)))}, "
            f"threads {_e(details.get('threads') or env.get('threads') or 'default')}, batch sizes {sizes or _DASH}, "
            f"{_e(details.get('warmup', '?'))} warm-up and {_e(details.get('repetitions', '?'))} timed forwards per batch size</li>"
        )
    how = ("<p>Each timed forward runs on one input repeated to the batch size, under <code>torch.no_grad()</code>; "
           "the compressed model and the original alternate run by run so that drift affects both alike "
           "(wall clock on the CPU, CUDA events on a GPU). The speedup is the original's p50 over the model's p50; "
           "it counts as significant only when at least 3 in 4 neighbouring pairs of timings show a speedup of 1.1x or more.</p>")
    measured = f"<ul>{''.join(parts)}</ul>" if parts else '<p class="muted">No benchmark step: nothing was timed.</p>'
    command = report.get("reproduce")
    if isinstance(command, dict):
        command = command.get("command")
    if command:
        code = f"<pre><code>{_e(command)}</code></pre>"
    else:
        code = ("<p>Download the model artifacts next to this file and run (needs torch, torchvision and safetensors; "
                "not ModelPress):</p>" + f"<pre><code>{_e(reproduce_snippet(report))}</code></pre>")
    return "<h3>How it was measured</h3>" + how + measured + "<h3>Timing it yourself</h3>" + code


# -- the page ------------------------------------------------------------------------------------

def render_html(report: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    report = _d(report)
    model = _d(report.get("model"))
    name = model.get("architecture") or model.get("format") or "model"
    kinds = ", ".join(str(s.get("kind", "?")) for s in _steps(report)) or "no steps"

    def part(render: Callable[[dict[str, Any]], str]) -> str:
        """One section; a section that fails to render says so instead of costing the whole page."""
        try:
            return render(report)
        except Exception as exc:  # a report shape this code did not foresee: keep the rest of the page
            return f'<p class="bad">This part could not be drawn from the report ({_e(type(exc).__name__)}: {_e(exc)}).</p>'

    def figure(title: str, render: Callable[[dict[str, Any]], str]) -> str:
        return f"<figure><figcaption>{title}</figcaption>{part(render)}</figure>"

    sections = [
        f"<h1>ModelPress report: {_e(name)}</h1><p class=\"sub\">{_e(kinds)}</p>",
        part(_summary),
        "<h2>Verdict</h2>" + part(_verdicts),
        part(_targets),
        "<h2>Plots</h2><div class=\"plots\">" + figure("Latency vs size", _latency_plot)
        + figure("Accuracy per step", _accuracy_plot) + "</div>"
        + figure("Per-layer sparsity of the result", _sparsity_plot).replace("<figure>", '<figure class="wide">', 1),
        "<h2>Steps</h2>" + part(_steps_section),
        "<h2>Benchmark</h2>" + part(_benchmark_section),
        "<h2>Exports and artifacts</h2>" + part(_exports),
        "<h2>Reproduce</h2>" + part(_reproduce),
        f"<footer>Generated from report.json (schema {_e(report.get('schema_version', '?'))}) by ModelPress.</footer>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>ModelPress report: {_e(name)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )

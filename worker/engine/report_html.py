"""report.json as one self-contained HTML page: tables, verdicts and inline SVG plots.

Standard library only, no scripts, fonts or network: the page opens from a file or an e-mail
attachment. Every string taken from the report is escaped (layer names and messages come from
the user), and every key may be missing (older reports, jobs without a benchmark step).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from worker.engine.report_format import (
    _DASH, _bench_rows, _benchmarks, _change, _d, _dl, _e, _fmt, _l, _num, _step_label, _steps, _table,
)
from worker.engine.report_plots import accuracy_plot, latency_plot, sparsity_plot
from worker.engine.report_reproduce import reproduce_section, reproduce_snippet

__all__ = ["render_html", "reproduce_snippet"]

VERDICT_CLASSES = {"faster": "v-faster", "smaller only": "v-smaller", "no gain": "v-none"}
VERDICT_ICONS = {"faster": "\u25b2", "smaller only": "\u25c6", "no gain": "\u25a0"}

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
tr.marked td{background:#dafbe1;font-weight:600}
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
            if step.get("kind") == "quantize" and "runtime_candidates" in details:
                body.append(_runtime_choice(details))
            if step.get("details"):
                text = json.dumps(step["details"], indent=1, default=str)
                body.append(f"<details><summary>details of this step</summary><pre>{_e(text)}</pre></details>")
        parts.append(f'<div class="card"><h3>Step {_e(_step_label(step))}</h3>{"".join(body)}</div>')
    return f'<div class="steps">{"".join(parts)}</div>' if parts else '<p class="muted">No steps recorded.</p>'


def _runtime_choice(details: dict[str, Any]) -> str:
    """Static int8: the runtimes timed side by side and the one kept (highlighted); unavailable ones say why."""
    rows, chosen_rows = [], []
    for i, candidate in enumerate(c for c in _l(details.get("runtime_candidates")) if isinstance(c, dict)):
        chosen, fits, reason = candidate.get("chosen") is True, candidate.get("meets_fidelity"), candidate.get("reason")
        speedup = _num(candidate.get("speedup_vs_fp32"))
        if candidate.get("available") is False:
            result = f'<span class="muted">unavailable: {_e(reason or "no reason given")}</span>'
        else:
            result = ('<span class="ok">\u2714 chosen</span>' if chosen else "not chosen") + (f": {_e(reason)}" if reason else "")
        if chosen:
            chosen_rows.append(i)
        rows.append([
            f"<code>{_e(candidate.get('runtime', '?'))}</code>",
            _fmt(candidate.get("p50_ms"), "ms"),
            _fmt(candidate.get("fp32_p50_ms"), "ms"),
            f"\u00d7{speedup:.3g}" if speedup is not None else _DASH,
            _fmt(candidate.get("cosine")),
            _fmt(candidate.get("top1_agreement"), "pct"),
            '<span class="ok">yes</span>' if fits is True else '<span class="bad">no</span>' if fits is False else _DASH,
            result,
        ])
    runtime = details.get("runtime")
    note = details.get("runtime_choice_note")
    html = (f'<p class="note">int8 runtime: <code>{_e(runtime) if runtime else _DASH}</code>'
            + (f". {_e(note)}" if note else "") + "</p>")
    headers = ["runtime", "p50 latency", "fp32 p50", "speedup vs fp32", "output cosine", "top-1 agreement", "meets fidelity", "result"]
    return html + (_table(headers, rows, range(1, 6), chosen_rows) if rows else "")


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
        "<h2>Plots</h2><div class=\"plots\">" + figure("Latency vs size", latency_plot)
        + figure("Accuracy per step", accuracy_plot) + "</div>"
        + figure("Per-layer sparsity of the result", sparsity_plot).replace("<figure>", '<figure class="wide">', 1),
        "<h2>Steps</h2>" + part(_steps_section),
        "<h2>Benchmark</h2>" + part(_benchmark_section),
        "<h2>Exports and artifacts</h2>" + part(_exports),
        "<h2>Reproduce</h2>" + part(reproduce_section),
        f"<footer>Generated from report.json (schema {_e(report.get('schema_version', '?'))}) by ModelPress.</footer>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>ModelPress report: {_e(name)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )

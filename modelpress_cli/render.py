"""Readable tables for jobs and reports. Every key may be missing: render what is there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"succeeded": "green", "failed": "red", "canceled": "yellow", "running": "cyan", "queued": "blue"}


def human_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return str(value)  # pragma: no cover


def human_count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}" if isinstance(value, int) or float(value).is_integer() else f"{value:.3g}"


def percent(value: Any) -> str:
    return f"{value * 100:.2f} %" if isinstance(value, (int, float)) else "-"


def number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return escape(str(value))


def status_text(status: Any) -> str:
    """Markup for a job status (escaped: the status comes from the server)."""
    style = STATUS_STYLE.get(str(status), "")
    return f"[{style}]{escape(str(status))}[/{style}]" if style else escape(str(status))


def plain(value: Any) -> Text:
    """A table cell shown as is: text from the server is never read as rich markup."""
    return Text("" if value is None else str(value))


# (label, metric key, formatter): the rows of the per-step metric table
METRIC_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("params", "params", human_count),
    ("nonzero params", "nonzero_params", human_count),
    ("sparsity", "sparsity", percent),
    ("size", "size_bytes", human_bytes),
    ("size (zlib)", "compressed_size_bytes", human_bytes),
    ("size (sparse est.)", "sparse_size_bytes_estimate", human_bytes),
    ("MACs", "macs", human_count),
    ("top-1", "top1", percent),
    ("top-5", "top5", percent),
    ("top-1 agreement", "top1_agreement", percent),
    ("output cosine", "output_cosine", number),
]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _benchmark_p50(step: dict[str, Any]) -> str:
    rows = _list(_dict(step.get("details")).get("results"))
    parts = []
    for row in rows:
        row = _dict(row)
        p50 = _dict(row.get("model")).get("p50_ms")
        if isinstance(p50, (int, float)):
            parts.append(f"{p50:.2f} ms @{row.get('batch_size', '?')}")
    return ", ".join(parts) or "-"


def metrics_table(report: dict[str, Any]) -> Table | None:
    """Metrics as rows; the original, then the model after each step, as columns."""
    original = _dict(report.get("original"))
    steps = [_dict(s) for s in _list(report.get("steps"))]
    stages: list[tuple[str, dict[str, Any]]] = []
    if original:
        stages.append(("original", original))
    elif steps and _dict(steps[0].get("before")):
        stages.append(("original", _dict(steps[0].get("before"))))
    for position, step in enumerate(steps):
        label = f"{step.get('index', position)} {step.get('kind', '?')}"
        stages.append((label, _dict(step.get("after"))))
    if not stages:
        return None
    table = Table(title="Model after each step", title_justify="left")
    table.add_column("metric")
    for label, _ in stages:
        table.add_column(escape(label), justify="right")
    for label, key, fmt in METRIC_ROWS:
        if any(key in metrics for _, metrics in stages):
            table.add_row(label, *(fmt(metrics.get(key)) for _, metrics in stages))
    if any(s.get("kind") == "benchmark" for s in steps):
        table.add_row("latency p50", "", *(_benchmark_p50(s) if s.get("kind") == "benchmark" else "" for s in steps))
    if any("duration_s" in s for s in steps):
        table.add_row("step time", "", *(f"{s['duration_s']:.1f} s" if isinstance(s.get("duration_s"), (int, float))
                                         else "-" for s in steps))
    return table


def benchmark_table(step: dict[str, Any]) -> Table | None:
    details = _dict(step.get("details"))
    rows = [_dict(r) for r in _list(details.get("results"))]
    if not rows:
        return None
    where = ", ".join(f"{k} {details[k]}" for k in ("device", "threads") if details.get(k) is not None)
    table = Table(title=escape(f"Benchmark (step {step.get('index', '?')}{'; ' + where if where else ''})"),
                  title_justify="left")
    for column in ("batch", "p50 ms", "p95 ms", "original p50 ms", "throughput /s", "speedup", "beyond noise"):
        table.add_column(column, justify="right")
    for row in rows:
        model, reference = _dict(row.get("model")), _dict(row.get("original"))
        significant = "yes" if row.get("speedup_significant") else ("slower" if row.get("slowdown_significant") else "no")
        speedup = row.get("speedup_vs_original")
        table.add_row(plain(row.get("batch_size", "?")), number(model.get("p50_ms")), number(model.get("p95_ms")),
                      number(reference.get("p50_ms")), number(model.get("throughput_per_s")),
                      f"{speedup:.2f}x" if isinstance(speedup, (int, float)) else "-", significant)
    return table


def verdicts_table(report: dict[str, Any]) -> Table | None:
    verdicts = _dict(report.get("verdicts"))
    if not verdicts:
        return None
    table = Table(title="Verdicts", title_justify="left")
    table.add_column("artifact")
    table.add_column("verdict")
    table.add_column("why", overflow="fold")
    for name, entry in verdicts.items():
        entry = _dict(entry)
        verdict = str(entry.get("verdict", "?"))
        style = {"faster": "green", "smaller only": "yellow", "no gain": "red"}.get(verdict, "")
        table.add_row(plain(name), Text(verdict, style=style), plain(entry.get("reason", "")))
    return table


def targets_table(targets: dict[str, Any]) -> Table:
    met = targets.get("met")
    title = "Targets: " + ("[green]all met[/green]" if met else "[red]missed[/red]" if met is False else "?")
    table = Table(title=title, title_justify="left")
    for column, justify in (("target", "left"), ("wanted", "right"), ("measured", "right"), ("met", "center"),
                            ("why", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for check in _list(targets.get("checks")):
        check = _dict(check)
        ok = check.get("met")
        table.add_row(plain(check.get("name", "?")), number(check.get("target")), number(check.get("measured")),
                      "[green]yes[/green]" if ok else "[red]no[/red]", plain(check.get("reason", "")))
    return table


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    model = _dict(report.get("model"))
    if model:
        arch = model.get("architecture") or model.get("format") or "?"
        lines.append(f"model: {arch} {model.get('arch_kwargs') or ''}".rstrip()
                     + f", {human_count(model.get('params'))} params, input {model.get('input_shape', '?')}")
    dataset = _dict(report.get("dataset"))
    if dataset:
        lines.append(f"dataset: {dataset.get('samples', '?')} samples ({dataset.get('train_samples', '?')} train, "
                     f"{dataset.get('eval_samples', '?')} eval), input {dataset.get('input_shape', '?')}")
    environment = _dict(report.get("environment"))
    device = environment.get("device")
    duration = report.get("duration_s")
    tail = []
    if device:
        tail.append(f"device {device}")
    if isinstance(duration, (int, float)):
        tail.append(f"took {duration:.1f} s")
    if tail:
        lines.append(", ".join(tail))
    return lines


def print_report(console: Console, report: dict[str, Any]) -> None:
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
    table = metrics_table(report)
    if table is not None:
        console.print(table)
    for step in _list(report.get("steps")):
        step = _dict(step)
        if step.get("kind") == "benchmark":
            bench = benchmark_table(step)
            if bench is not None:
                console.print(bench)
    verdicts = verdicts_table(report)
    if verdicts is not None:
        console.print(verdicts)
    if isinstance(report.get("targets"), dict):
        console.print(targets_table(report["targets"]))
    export = _dict(report.get("export"))
    failed = [f"{name}: {_dict(s).get('reason', '')}" for name, s in export.items() if _dict(s).get("ok") is False]
    for line in failed:
        console.print(f"[yellow]export skipped[/yellow] {escape(line)}", highlight=False)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table()
    for column in ("id", "status", "progress", "step", "created", "message"):
        table.add_column(column, justify="right" if column == "progress" else "left")
    for job in jobs:
        step = job.get("current_step")
        table.add_row(
            plain(job.get("id", "?")), status_text(job.get("status")), f"{float(job.get('progress') or 0):.0f} %",
            plain(f"{step} {job.get('current_step_kind') or ''}" if step is not None else "-"),
            plain(str(job.get("created_at", ""))[:19].replace("T", " ")), plain(str(job.get("message") or "")[:60]),
        )
    return table


def artifacts_table(artifacts: list[dict[str, Any]]) -> Table:
    table = Table()
    for column in ("name", "kind", "format", "size", "sha256"):
        table.add_column(column)
    for artifact in artifacts:
        table.add_row(plain(artifact.get("name")), plain(artifact.get("kind", "")), plain(artifact.get("format", "")),
                      human_bytes(artifact.get("size_bytes")), plain(str(artifact.get("sha256", ""))[:16]))
    return table

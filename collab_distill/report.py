"""``collab-distill report RUN_DIR``: one Markdown + HTML page per run.

It reads what every run writes (``results.json``, ``models.json``, ``logs/csv/metrics.csv``) and
what plugins add under ``RUN_DIR/plugins/`` (e.g. the C-Net's per-image weights), and renders:
the results table, the learned loss weights over training, their distribution over images at the
end, and test accuracy against MACs for every student.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path
from typing import Any

from collab_distill.task import ConfigError

__all__ = ["write_report"]


def _read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (reports are written on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _weights_plot(rows: list[dict[str, float]], students: list[str], out: Path) -> Path | None:
    series = {
        (s, term): [(r["step"], r[f"train/{s}/{term}"]) for r in rows if f"train/{s}/{term}" in r]
        for s in students for term in ("alpha", "beta", "gamma")
    }
    if not any(series.values()):
        return None
    plt = _pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    for ax, term in zip(axes, ("alpha", "beta", "gamma")):
        for s in students:
            points = series[(s, term)]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=s)
        ax.set_title(f"mean {term}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("loss weights over training (mean over the batch)")
    return _save(fig, out / "weights_over_training.png")


def _meta_plot(rows: list[dict[str, float]], out: Path) -> Path | None:
    """The meta objective and the meta-gradient's norm at every meta step: did the meta modules learn?"""
    series = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("train/meta/loss", "train/meta/grad_norm")}
    if not series["train/meta/loss"]:
        return None
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for ax, (key, points), title in zip(axes, series.items(), ("meta loss", "meta-gradient norm")):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if any(p[1] > 0 for p in series["train/meta/grad_norm"]):
        axes[1].set_yscale("log")
    fig.suptitle("meta steps over training")
    return _save(fig, out / "meta_steps.png")


def _distribution_plot(run: Path, out: Path) -> Path | None:
    table = run / "plugins" / "cnet" / "val_weights.csv"
    if not table.is_file():
        return None
    plt = _pyplot()

    with table.open() as f:
        rows = list(csv.DictReader(f))
    students = sorted({r["student"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, term in zip(axes, ("alpha", "beta", "gamma")):
        for s in students:
            ax.hist([float(r[term]) for r in rows if r["student"] == s], bins=30, alpha=0.5, label=s)
        ax.set_title(term)
    axes[0].legend(fontsize=8)
    fig.suptitle("C-Net weights over the val images at the end of training")
    return _save(fig, out / "weights_distribution.png")


def _accuracy_vs_macs(results: dict[str, Any], out: Path) -> Path | None:
    metric = results.get("selection_metric", "top1")
    points = [
        (name, r.get("macs"), r["last"].get(f"test_{metric}"), r["best_on_val"].get(f"test_{metric}"))
        for name, r in results.get("students", {}).items()
    ]
    points = [p for p in points if p[1]]
    if not points:
        return None
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    points.sort(key=lambda p: p[1])
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label="last epoch")
    ax.plot([p[1] for p in points], [p[3] for p in points], "s--", label="best on val")
    for name, macs, last, _ in points:
        ax.annotate(name, (macs, last), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "accuracy_vs_macs.png")


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and v is not None else "-"


def _plugin_figures(run: Path, out: Path) -> list[Path]:
    """PNGs that plugins wrote into ``RUN/plugins/<plugin>/`` (e.g. the C-Net's image grid),
    copied next to the report as ``<plugin>_<file>``."""
    copied = []
    for figure in sorted(run.glob("plugins/*/*.png")):
        target = out / f"{figure.parent.name}_{figure.name}"
        shutil.copyfile(figure, target)
        copied.append(target)
    return copied


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report/report.md`` and ``report.html``; returns their paths."""
    run = Path(run_dir)
    results_path = run / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"report: {str(run)!r} has no results.json; give the folder of a finished run (runs/NAME/version_N)")
    results = json.loads(results_path.read_text())
    if results.get("status") != "finished":
        raise ConfigError(f"report: the run in {str(run)!r} did not finish (status {results.get('status')!r}); resume it first")
    out = run / "report"
    out.mkdir(exist_ok=True)
    students = list(results["students"])
    metric = results.get("selection_metric", "top1")
    rows = _read_metrics(run / "logs" / "csv" / "metrics.csv")
    figures = [p for p in (_weights_plot(rows, students, out), _meta_plot(rows, out), _distribution_plot(run, out),
                           _accuracy_vs_macs(results, out)) if p]
    figures += _plugin_figures(run, out)

    lines = [f"# Run report: {run.parent.name}/{run.name}", "",
             f"seed {results.get('seed')}, {results.get('epochs')} epochs, {results.get('global_step')} steps; "
             f"model selection on val ({metric}), never on test.", "",
             f"| student | params | MACs | test {metric} (last) | best epoch | test {metric} (best on val) |",
             "|---|---|---|---|---|---|"]
    for name, r in results["students"].items():
        lines.append(f"| {name} | {r.get('params', '-')} | {r.get('macs', '-')} | {_fmt(r['last'].get(f'test_{metric}'))} | "
                     f"{r['best_on_val'].get('epoch', '-')} | {_fmt(r['best_on_val'].get(f'test_{metric}'))} |")
    for name, r in results.get("teachers", {}).items():
        lines.append(f"| {name} (teacher) | {r.get('params', '-')} | {r.get('macs', '-')} | {_fmt(r.get('test', {}).get(metric))} | - | - |")
    lines.append("")
    for fig in figures:
        lines += [f"![{fig.stem}]({fig.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")

    body = [f"<h1>{html.escape(lines[0][2:])}</h1>", f"<p>{html.escape(lines[2])}</p>", "<table border='1' cellpadding='4'>"]
    header, *table = [line for line in lines if line.startswith("|") and not line.startswith("|---")]
    body.append("<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in header.strip("|").split("|")) + "</tr>")
    for line in table:
        body.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
    body.append("</table>")
    body += [f"<p><img src='{fig.name}' alt='{fig.stem}'></p>" for fig in figures]
    page = out / "report.html"
    page.write_text("<!doctype html><meta charset='utf-8'><title>collab-distill report</title>\n" + "\n".join(body) + "\n")
    return md, page

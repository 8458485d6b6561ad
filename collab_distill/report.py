"""``collab-distill report RUN_DIR``: one Markdown + HTML page per run.

It reads what every run writes (``results.json``, ``logs/csv/metrics.csv``) and renders the
generic parts: the results table (students and teachers), the loss weights over training, the
meta steps, and test accuracy against MACs for every student and teacher.

Then come the plugins' own sections. A plugin answers the ``collab_distill_report_sections`` hook
with :class:`ReportSection` objects (a title, Markdown text, figures it wrote under
``RUN_DIR/plugins/<name>/``); the engine stores them at the end of the fit with
:func:`write_sections` as ``RUN_DIR/report_sections.json``, and :func:`write_report` renders each
one after the generic parts, its figures copied next to the report. The report knows no method
by name: a third-party plugin's section is shown exactly like a built-in one's.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from collab_distill.task import ConfigError

__all__ = ["ReportSection", "write_sections", "read_sections", "write_report", "SECTIONS_FILE"]

#: where :func:`write_sections` stores the plugins' sections, relative to the run folder
SECTIONS_FILE = "report_sections.json"


@dataclass
class ReportSection:
    """One section a plugin adds to ``collab-distill report`` (see the
    ``collab_distill_report_sections`` hook).

    Attributes:
        title: the section's heading.
        text: Markdown shown under the heading (paragraphs, ``- `` lists, ``|`` tables,
            ``**bold**`` and `` `code` `` are also rendered in the HTML page).
        figures: PNG files the plugin wrote, as paths relative to the run folder
            (``plugins/<name>/<file>.png``); shown after the text, in this order.
    """

    title: str
    text: str = ""
    figures: list[str] = field(default_factory=list)


def _relative_figure(run: Path, figure: Any, title: str) -> str:
    """``figure`` as a POSIX path relative to the run folder, after checking that it is one."""
    text = str(figure)
    path = PurePosixPath(Path(text).as_posix())
    if Path(text).is_absolute() or path.is_absolute() or ".." in path.parts or not path.parts or path == PurePosixPath("."):
        raise ValueError(f"report section {title!r}: figure {text!r} must be a path inside the run folder, relative to "
                         "it (e.g. 'plugins/<name>/figure.png')")
    if not (run / path).is_file():
        raise ValueError(f"report section {title!r}: figure {text!r} does not exist in the run folder {str(run)!r}; "
                         "write it before returning the section")
    return path.as_posix()


def write_sections(run_dir: str | Path, sections: Sequence[ReportSection]) -> Path:
    """Store the plugins' ``sections`` as ``RUN_DIR/report_sections.json`` (replacing it) for
    ``collab-distill report``; returns its path.

    Every figure must be a path relative to ``run_dir`` (no ``..``) to an existing file: a
    :class:`ValueError` names the section and figure otherwise.
    """
    run = Path(run_dir)
    stored = []
    for section in sections:
        if not isinstance(section, ReportSection):
            raise TypeError(f"collab_distill_report_sections must return ReportSection objects, got {section!r}")
        if isinstance(section.figures, (str, Path)):
            raise TypeError(f"report section {section.title!r}: figures must be a list of paths, got {section.figures!r}")
        figures = [_relative_figure(run, f, section.title) for f in section.figures]
        stored.append(asdict(ReportSection(str(section.title), str(section.text or ""), figures)))
    path = run / SECTIONS_FILE
    path.write_text(json.dumps({"sections": stored}, indent=1) + "\n")
    return path


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object a run wrote; a file that is not one (cut short by a full disk, edited by
    hand) is one error naming it, not the JSON decoder's traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"report: {str(path)!r} is not valid JSON ({err}); the run's files are damaged: "
                          "restore the file, or run the config again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"report: {str(path)!r} holds a JSON {type(data).__name__}, not the object the run wrote; "
                          "restore the file, or run the config again")
    return data


def read_sections(run_dir: str | Path) -> list[ReportSection]:
    """The sections :func:`write_sections` stored for a run (none when it stored none)."""
    path = Path(run_dir) / SECTIONS_FILE
    if not path.is_file():
        return []
    data = _read_json_object(path)
    return [ReportSection(s["title"], s.get("text", ""), list(s.get("figures", []))) for s in data.get("sections", [])]


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
    for ax, points, title in zip(axes, series.values(), ("meta loss", "meta-gradient norm")):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if any(p[1] > 0 for p in series["train/meta/grad_norm"]):
        axes[1].set_yscale("log")
    fig.suptitle("meta steps over training")
    return _save(fig, out / "meta_steps.png")


def _si(value: float) -> str:
    """``1500000`` -> ``1.5M``: a MAC count readable on an axis."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _log_ticks(low: float, high: float) -> list[float]:
    """Major ticks of a log axis from ``low`` to ``high``: 1-2-5 per decade, thinned to the
    decades when that gives too many, and at least the two ends when none falls inside."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for steps in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in steps if low <= m * 10.0 ** e <= high]
        if len(ticks) <= 8:
            break
    if len(ticks) > 8:  # many decades: every n-th one
        ticks = ticks[:: math.ceil(len(ticks) / 8)]
    return ticks if len(ticks) >= 2 else sorted({low, *ticks, high})


def _accuracy_vs_macs(results: dict[str, Any], out: Path) -> Path | None:
    metric = results.get("selection_metric", "top1")
    points = [
        (name, r.get("macs"), r["last"].get(f"test_{metric}"), r["best_on_val"].get(f"test_{metric}"))
        for name, r in results.get("students", {}).items()
    ]
    points = [p for p in points if p[1]]
    teachers = [(name, r.get("macs"), r.get("test", {}).get(metric)) for name, r in results.get("teachers", {}).items()]
    teachers = [t for t in teachers if t[1] and t[2] is not None]
    if not points:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4))
    points.sort(key=lambda p: p[1])
    ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label="student, last epoch")
    ax.plot([p[1] for p in points], [p[3] for p in points], "s--", label="student, best on val")
    for name, macs, last, _ in points:
        ax.annotate(name, (macs, last), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if teachers:
        ax.plot([t[1] for t in teachers], [t[2] for t in teachers], "*", color="tab:red", markersize=12, linestyle="none",
                label="teacher")
        for name, macs, value in teachers:
            ax.annotate(name, (macs, value), textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:red")
    ax.set_xscale("log")
    macs = [p[1] for p in points] + [t[1] for t in teachers]
    pad = max(1.25, (max(macs) / min(macs)) ** 0.08)  # room for the markers and names at both ends
    low, high = min(macs) / pad, max(macs) * pad
    ax.set_xlim(low, high)
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(low, high)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _si(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("MACs per image (log scale)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "accuracy_vs_macs.png")


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and v is not None else "-"


def _inline(text: str) -> str:
    """Escaped HTML of one line of Markdown, with ``code`` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _markdown_html(text: str) -> list[str]:
    """The HTML of a section's Markdown: paragraphs, ``- `` lists and ``|`` tables (the rest is
    shown as text)."""
    body: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.lstrip().startswith("|") for line in lines):
            rows = [line for line in lines if not re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", line)]
            body.append("<table border='1' cellpadding='4'>")
            for i, line in enumerate(rows):
                tag = "th" if i == 0 else "td"
                body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in _cells(line)) + "</tr>")
            body.append("</table>")
        elif all(line.lstrip()[:2] in ("- ", "* ") for line in lines):
            body.append("<ul>" + "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines) + "</ul>")
        else:
            body.append("<p>" + "<br>".join(_inline(line) for line in lines) + "</p>")
    return body


def _copy_figure(run: Path, figure: str, out: Path, taken: set[str]) -> Path | None:
    """Copy a section's figure next to the report as ``<folder>_<file>`` (``plugins/`` left out
    of the name); ``None`` when it is missing from the run folder."""
    source = run / figure
    if not source.is_file():
        return None
    parts = PurePosixPath(figure).parts
    name = "_".join(parts[1:] if parts[0] == "plugins" and len(parts) > 1 else parts)
    stem, suffix, k = Path(name).stem, Path(name).suffix, 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}{suffix}"
    taken.add(name)
    target = out / name
    shutil.copyfile(source, target)
    return target


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report/report.md`` and ``report.html``; returns their paths."""
    run = Path(run_dir)
    results_path = run / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"report: {str(run)!r} has no results.json; give the folder of a finished run (runs/NAME/version_N)")
    results = _read_json_object(results_path)
    if results.get("status") != "finished":
        raise ConfigError(f"report: the run in {str(run)!r} did not finish (status {results.get('status')!r}); resume it first")
    out = run / "report"
    out.mkdir(exist_ok=True)
    students = list(results["students"])
    metric = results.get("selection_metric", "top1")
    rows = _read_metrics(run / "logs" / "csv" / "metrics.csv")
    figures = [p for p in (_weights_plot(rows, students, out), _meta_plot(rows, out), _accuracy_vs_macs(results, out)) if p]
    taken = {f.name for f in figures}
    # (title, text, copied figures, figures missing from the run folder)
    sections: list[tuple[str, str, list[Path], list[str]]] = []
    for section in read_sections(run):
        pairs = [(f, _copy_figure(run, f, out, taken)) for f in section.figures]
        sections.append((section.title, section.text.strip(), [c for _, c in pairs if c], [f for f, c in pairs if c is None]))

    lines = [f"# Run report: {run.parent.name}/{run.name}", "",
             f"seed {results.get('seed')}, {results.get('epochs')} epochs, {results.get('global_step')} steps; "
             f"model selection on val ({metric}), never on test.", "",
             f"| student | params | MACs | test {metric} (last) | best epoch | test {metric} (best on val) |",
             "|---|---|---|---|---|---|"]
    for name, r in results["students"].items():
        lines.append(f"| {name} | {r.get('params', '-')} | {r.get('macs', '-')} | {_fmt(r['last'].get(f'test_{metric}'))} | "
                     f"{r['best_on_val'].get('epoch', '-')} | {_fmt(r['best_on_val'].get(f'test_{metric}'))} |")
    for name, r in results.get("teachers", {}).items():
        test = _fmt(r.get("test", {}).get(metric))
        lines.append(f"| {name} (teacher) | {r.get('params', '-')} | {r.get('macs', '-')} | {test} | - | - |")
    lines.append("")
    generic_end = len(lines)
    for fig in figures:
        lines += [f"![{fig.stem}]({fig.name})", ""]
    for title, text, copied, missing in sections:
        lines += [f"## {title}", ""]
        if text:
            lines += [text, ""]
        for fig in copied:
            lines += [f"![{fig.stem}]({fig.name})", ""]
        if missing:
            lines += ["(figures missing from the run folder: " + ", ".join(f"`{m}`" for m in missing) + ")", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")

    body = [f"<h1>{html.escape(lines[0][2:])}</h1>", f"<p>{html.escape(lines[2])}</p>", "<table border='1' cellpadding='4'>"]
    header, *table = [line for line in lines[:generic_end] if line.startswith("|") and not line.startswith("|---")]
    body.append("<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in header.strip("|").split("|")) + "</tr>")
    for line in table:
        body.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
    body.append("</table>")
    body += [f"<p><img src='{html.escape(fig.name)}' alt='{html.escape(fig.stem)}'></p>" for fig in figures]
    for title, text, copied, missing in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += _markdown_html(text)
        body += [f"<p><img src='{html.escape(fig.name)}' alt='{html.escape(fig.stem)}'></p>" for fig in copied]
        if missing:
            listed = ", ".join(f"<code>{html.escape(m)}</code>" for m in missing)
            body.append(f"<p>(figures missing from the run folder: {listed})</p>")
    page = out / "report.html"
    page.write_text("<!doctype html><meta charset='utf-8'><title>collab-distill report</title>\n" + "\n".join(body) + "\n")
    return md, page

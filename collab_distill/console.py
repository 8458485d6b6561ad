"""What the user sees in the terminal: a progress bar and tables (rank 0 only)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

_console = Console(stderr=False, highlight=False, soft_wrap=True)


def _rank_zero(fabric: Any) -> bool:
    return fabric is None or getattr(fabric, "is_global_zero", True)


def info(fabric: Any, message: str) -> None:
    if _rank_zero(fabric):
        _console.print(message)


def plain(fabric: Any, message: str) -> None:
    """Print ``message`` as it is on rank 0: no markup, so brackets (``[trace]``, shapes, lists)
    are kept, and no highlighting."""
    if _rank_zero(fabric):
        _console.print(message, markup=False, highlight=False)


class _Bar:
    def __init__(self, progress: Optional[Progress], task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    @property
    def enabled(self) -> bool:
        return self.progress is not None

    def advance(self, loss: Optional[float]) -> None:
        if self.progress is not None:
            if loss is None:  # keep the last shown loss
                self.progress.update(self.task_id, advance=1)
            else:
                self.progress.update(self.task_id, advance=1, loss=f"{loss:.4f}")


@contextlib.contextmanager
def progress(fabric: Any, description: str, total: int, enabled: bool) -> Iterator[_Bar]:
    """A progress bar over one epoch; silent on other ranks and when output is not a terminal."""
    if not enabled or not _rank_zero(fabric) or not sys.stdout.isatty():
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}"),
    ]
    with Progress(*columns, console=_console, transient=True) as bar:
        task_id = bar.add_task(description, total=total, loss="")
        yield _Bar(bar, task_id)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"
    return "-" if value is None else str(value)


def model_table(fabric: Any, summary: Mapping[str, Mapping[str, Any]]) -> None:
    if not _rank_zero(fabric) or not summary:
        return
    from collab_distill.profiling import format_count

    table = Table(title="cohort", title_justify="left")
    for col in ("member", "role", "model", "params", "MACs"):
        table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
    for name, s in summary.items():
        macs = s.get("macs")
        table.add_row(name, s.get("kind", ""), s.get("model", ""), format_count(s["params"]), format_count(macs) if macs else "-")
    _console.print(table)


def epoch_table(fabric: Any, row: Mapping[str, Any], students: list[str], metric: str) -> None:
    """One line per student with this epoch's validation metrics."""
    if not _rank_zero(fabric):
        return
    keys = sorted({k.split("/val_", 1)[1] for k in row if "/val_" in k})
    table = Table(title=f"epoch {row['epoch']}  ({row['seconds']:.1f} s)", title_justify="left")
    table.add_column("student")
    for key in keys:
        table.add_column(f"val {key}", justify="right")
    for name in students:
        table.add_row(name, *(_fmt(row.get(f"{name}/val_{k}")) for k in keys))
    _console.print(table)


def metrics_table(fabric: Any, split: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
    if not _rank_zero(fabric):
        return
    keys = sorted({k for m in metrics.values() for k in m})
    table = Table(title=split, title_justify="left")
    table.add_column("member")
    for key in keys:
        table.add_column(key, justify="right")
    for name, values in metrics.items():
        table.add_row(name, *(_fmt(values.get(k)) for k in keys))
    _console.print(table)


def results_table(fabric: Any, results: Mapping[str, Any]) -> None:
    """The final table: test metrics of the last epoch and of the best-on-val epoch."""
    if not _rank_zero(fabric):
        return
    metric = results.get("selection_metric", "top1")
    table = Table(title=f"test {metric} (model selection on val, never on test)", title_justify="left")
    for col in ("student", "params", "last epoch", f"test {metric} (last)", "best epoch", f"test {metric} (best val)"):
        table.add_column(col, justify="left" if col == "student" else "right", no_wrap=col == "student")
    from collab_distill.profiling import format_count

    for name, r in results.get("students", {}).items():
        table.add_row(
            name, format_count(r.get("params", 0)), _fmt(r["last"].get("epoch")), _fmt(r["last"].get(f"test_{metric}")),
            _fmt(r["best_on_val"].get("epoch")), _fmt(r["best_on_val"].get(f"test_{metric}")),
        )
    for name, r in results.get("teachers", {}).items():
        if "test" in r:
            table.add_row(f"{name} (teacher)", format_count(r.get("params", 0)), "-", _fmt(r["test"].get(metric)), "-", "-")
    _console.print(table)

"""A run's loggers (Fabric's CSV and TensorBoard loggers under ``run_dir/logs``, or any Fabric
``Logger``), and the CSV log carried over when a run resumes."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from collab_distill.task import ConfigError

if TYPE_CHECKING:
    from lightning_fabric.loggers import Logger

__all__ = ["make_loggers"]


def make_loggers(kinds: list[Any], run_dir: Path, resume_step: Optional[int] = None) -> list[Logger]:
    """The run's loggers: ``csv`` and ``tensorboard`` write under ``run_dir/logs``; any other
    entry is a ready ``lightning_fabric.loggers.Logger`` (W&B, MLflow, ... by ``class_path``).

    ``resume_step``: the run resumes from a checkpoint written at this step; the CSV log keeps
    every row the run logged up to it (and drops later ones, which the resumed run logs again)."""
    from lightning_fabric.loggers import CSVLogger, Logger, TensorBoardLogger

    loggers: list[Logger] = []
    for kind in kinds:
        if kind == "csv":
            csv_logger = CSVLogger(root_dir=str(run_dir), name="logs", version="csv", flush_logs_every_n_steps=50)
            if resume_step is not None:
                _carry_over(csv_logger, resume_step)
            loggers.append(csv_logger)
        elif kind == "tensorboard":
            loggers.append(TensorBoardLogger(root_dir=str(run_dir), name="logs", version="tensorboard"))
        elif isinstance(kind, Logger):
            loggers.append(kind)
        else:
            raise ConfigError(f"trainer.loggers: {kind!r} is neither csv, tensorboard nor a lightning_fabric Logger (class_path)")
    return loggers


def _carry_over(logger: Any, resume_step: int) -> None:
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts: read the rows
    first, log those up to ``resume_step`` again through the logger and write them at once."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with warnings.catch_warnings():
        # Lightning warns that it deletes the old file: its rows are being carried over right here
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        for row in rows:
            step = int(float(row.pop("step")))
            if step <= resume_step:
                logger.log_metrics({k: float(v) for k, v in row.items() if v not in ("", None)}, step)
        logger.save()

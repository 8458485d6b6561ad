"""What MC-Distil's trained C-Net leaves behind: its weights applied to a split
(``plugins/cnet/<split>_weights.csv``), their statistics and, with label noise, how alpha separates
clean from flipped labels (``summary.json``), the figures, the end-of-fit inert warning and the
report section.

:class:`CNetOutputs` holds the :class:`~collab_distill.plugins.mc_distil.CNet` methods that do this
(CNet inherits them), apart from the plugin's construction and its ``loss_weights`` hook.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from collab_distill import console
from collab_distill.engine_view import EngineView
from collab_distill.hookspecs import hookimpl
from collab_distill.records import Knowledge
from collab_distill.report import ReportSection

__all__ = ["CNetOutputs", "TERMS", "WeightRows", "weight_statistics", "largest_spread", "noise_separation"]

TERMS = ("alpha", "beta", "gamma")


class CNetOutputs:
    """The trained C-Net applied to a data set and what it writes to the run folder and the
    report. A part of :class:`~collab_distill.plugins.mc_distil.CNet`, which provides the
    attributes and methods declared here."""

    module: Optional[nn.ModuleDict]
    students: list[str]
    inert_threshold: float

    if TYPE_CHECKING:
        @property
        def uses_records(self) -> bool: ...

        def weights(self, engine: EngineView, batch: Any, records: Mapping[str, Knowledge],
                    teacher_records: Mapping[str, Knowledge] = {}) -> dict[str, Tensor]: ...

    # -- applying the C-Net to a data set --------------------------------------------------

    def apply(self, engine: EngineView, split: str) -> list[tuple[int, int, str, float, float, float]]:
        """The C-Net's weights for every image of ``split`` (this rank's shard) as rows
        ``(index, label, student, alpha, beta, gamma)``; every module is left in its previous mode.
        With ``normalize: batch`` the weights are those of the split's batches."""
        assert self.module is not None
        loader = engine.batches(split)
        # the C-Net and the students whose losses it may read, in eval mode (BatchNorm's running
        # statistics), so that applying it after a fit and from a checkpoint give the same weights
        modules = [self.module, *engine.students.values()]
        modes = [[m.training for m in module.modules()] for module in modules]
        for module in modules:
            module.eval()
        rows = []
        with torch.no_grad():
            for batch in loader:
                batch = engine.task.move_batch(batch, engine.fabric)
                records: dict[str, Knowledge] = {}
                teachers: Mapping[str, Knowledge] = {}
                if self.uses_records:
                    # the units the cohort shares in training (detection: the region source's proposals)
                    context = engine.task.shared_context(batch, engine.teachers, engine.students)
                    records = {s: engine.task.knowledge(m, batch, context=context) for s, m in engine.students.items()}
                    teachers = engine.teacher_records(batch, context)
                targets = batch.get("targets") if isinstance(batch, dict) else None
                # one class per image (classification) is shown in the grid; -1 otherwise
                labels = targets.tolist() if isinstance(targets, Tensor) and targets.dim() == 1 else [-1] * len(batch["index"])
                for student, w in self.weights(engine, batch, records, teachers).items():
                    for index, label, (a, b, g) in zip(batch["index"].tolist(), labels, w.float().cpu().tolist()):
                        rows.append((int(index), int(label), student, a, b, g))
        for module, module_modes in zip(modules, modes):
            for m, mode in zip(module.modules(), module_modes):
                m.training = mode
        return rows

    def write_weights(self, engine: EngineView, split: str, per_side: int = 8) -> Path:
        """``plugins/cnet/<split>_weights.csv`` and ``<split>_extremes.png`` in the run folder: the
        weights of every image, and per student the ``per_side`` images whose loss leans most on
        the teacher (largest beta / (alpha + beta)) and most on the label (smallest). Also adds
        the split's weight statistics (and, for a training split with label noise, how well
        alpha separates clean from flipped labels) to ``plugins/cnet/summary.json``."""
        rows = self.apply(engine, split)
        assert engine.run_dir is not None  # called inside a fit or on a finished run's folder
        folder = engine.run_dir / "plugins" / "cnet"
        folder.mkdir(parents=True, exist_ok=True)
        flipped = _flipped_flags(engine, split)
        table = folder / f"{split}_weights.csv"
        if flipped is None:
            table.write_text("index,label,student,alpha,beta,gamma\n"
                             + "".join(f"{i},{y},{s},{a:.6g},{b:.6g},{g:.6g}\n" for i, y, s, a, b, g in rows))
        else:
            table.write_text("index,label,student,alpha,beta,gamma,flipped\n"
                             + "".join(f"{i},{y},{s},{a:.6g},{b:.6g},{g:.6g},{int(flipped[i])}\n" for i, y, s, a, b, g in rows))
        summary: dict[str, Mapping[str, Any]] = {"students": weight_statistics(rows, self.students)}
        noise = noise_separation(rows, self.students, flipped) if flipped is not None else None
        if noise is not None:
            summary["label_noise"] = noise
        _update_summary(folder / "summary.json", split, summary)
        try:
            _extremes_grid(engine, split, rows, self.students, per_side, folder / f"{split}_extremes.png")
            if noise is not None:
                _clean_vs_flipped_histogram(rows, self.students, flipped, noise,
                                            folder / f"{split}_alpha_clean_vs_flipped.png")
        except ImportError:  # matplotlib is a dependency, but a figure is never worth failing a run for
            pass
        return table

    def inert(self, statistics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> bool:
        """No student's weight of any learned term varies over the images by more than
        ``inert_threshold`` of its mean: the C-Net weighs every image alike."""
        return largest_spread(statistics) <= self.inert_threshold

    @hookimpl
    def collab_distill_fit_end(self, engine: EngineView) -> None:
        """Apply the trained C-Net to the val split (and to a training split with label noise)
        for ``collab-distill report``; warn when its weights stayed inert."""
        assert engine.fabric is not None
        if not engine.fabric.is_global_zero or self.module is None:
            return
        self.write_weights(engine, "val")
        if _flipped_flags(engine, "train") is not None:
            self.write_weights(engine, "train")
        assert engine.run_dir is not None  # write_weights wrote there
        summary = json.loads((engine.run_dir / "plugins" / "cnet" / "summary.json").read_text())
        val = summary["val"]["students"]
        if self.inert(val):
            spread = largest_spread(val)
            message = (
                f"CNet: the C-Net's weights stayed inert: over the val images no student's alpha, beta or gamma "
                f"varies by more than {spread:.2%} of its mean (threshold {self.inert_threshold:.0%}), so it weighed "
                f"every image alike after {len(engine.meta_history)} meta steps. Give it more meta steps "
                "(meta.every_n_steps), a larger CNet.lr, or per-image signals (CNet.use_losses).")
            warnings.warn(message, stacklevel=1)
            console.plain(engine.fabric, f"[warning] {message}")

    @hookimpl
    def collab_distill_report_sections(self, engine: EngineView) -> Optional[list[ReportSection]]:
        """The report's C-Net section: how the learned weights spread over the val images (and,
        with label noise, how alpha separates clean from flipped training labels), the weights'
        distribution per student and term (``plugins/cnet/val_weights_distribution.png``, drawn
        here from ``val_weights.csv``) and the figures ``fit_end`` wrote."""
        if self.module is None or engine.run_dir is None:
            return None
        assert engine.fabric is not None
        if not engine.fabric.is_global_zero:
            return None
        folder = engine.run_dir / "plugins" / "cnet"
        table, summary_path = folder / "val_weights.csv", folder / "summary.json"
        if not table.is_file() or not summary_path.is_file():
            return None
        try:
            _distribution_figure(table, folder / "val_weights_distribution.png")
        except ImportError:  # matplotlib is a dependency, but a figure is never worth failing a run for
            pass
        names = ("val_weights_distribution.png", "val_extremes.png", "train_extremes.png", "train_alpha_clean_vs_flipped.png")
        figures = [f"plugins/cnet/{name}" for name in names if (folder / name).is_file()]
        summary = json.loads(summary_path.read_text())
        text = self._report_text(summary, len(engine.meta_history))
        return [ReportSection("MC-Distil: the C-Net's loss weights", text, figures)]

    def _report_text(self, summary: Mapping[str, Any], meta_steps: int) -> str:
        """Markdown: the inert/spread verdict, each student's weights over the val images and,
        with label noise, alpha's separation of clean and flipped training labels."""
        val = summary["val"]["students"]
        spread = largest_spread(val)
        verdict = ("**inert**, the C-Net weighs every image alike" if self.inert(val)
                   else "the C-Net weighs images differently")
        lines = [f"`{self!r}`, {meta_steps} meta steps. Over the val images the largest spread of a weight is "
                 f"{spread:.2%} of its mean (std / mean; inert at or below {self.inert_threshold:.0%}), so {verdict}.", "",
                 "| student | alpha mean (std) | beta mean (std) | gamma mean (std) | alpha 5-95% |", "|---|---|---|---|---|"]
        for student, terms in val.items():
            cells = [f"{terms[t]['mean']:.3f} ({terms[t]['std']:.3f})" for t in TERMS]
            lines.append(f"| {student} | " + " | ".join(cells) + f" | {terms['alpha']['q5']:.3f}-{terms['alpha']['q95']:.3f} |")
        noise = summary.get("train", {}).get("label_noise")
        if noise:
            lines += ["", "With label noise, on the training split: how well alpha (the label's weight) ranks clean labels "
                      "above flipped ones (AUC 0.5: blind, 1: perfect).", "",
                      "| student | alpha AUC clean vs flipped | mean alpha clean | mean alpha flipped | flipped / images |",
                      "|---|---|---|---|---|"]
            for student, n in noise.items():
                lines.append(f"| {student} | {n['alpha_auc_clean_vs_flipped']:.3f} | {n['alpha_mean_clean']:.3f} | "
                             f"{n['alpha_mean_flipped']:.3f} | {n['flipped']} / {n['images']} |")
        return "\n".join(lines)

    @hookimpl
    def collab_distill_evaluation_end(self, engine: EngineView, split: str) -> None:
        """``collab-distill validate|test`` of a finished run: apply its C-Net to that split too."""
        if engine.fitting or engine.run_dir is None:
            return
        assert engine.fabric is not None
        if engine.fabric.is_global_zero and engine.meta_modules.get("cnet") is not None:
            self.write_weights(engine, split)


#: ``(index, label, student, alpha, beta, gamma)`` per image and student
WeightRows = list[tuple[int, int, str, float, float, float]]


def weight_statistics(rows: WeightRows, students: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per student and term: mean, std and the 5/25/50/75/95% quantiles over the images."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for student in students:
        mine = torch.tensor([r[3:] for r in rows if r[2] == student], dtype=torch.float64).view(-1, 3)
        if mine.shape[0] == 0:
            continue
        q = torch.quantile(mine, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64), dim=0)
        out[student] = {
            term: {"mean": float(mine[:, k].mean()), "std": float(mine[:, k].std(unbiased=False)),
                   **{f"q{p}": float(q[j, k]) for j, p in enumerate((5, 25, 50, 75, 95))}}
            for k, term in enumerate(TERMS)
        }
    return out


def largest_spread(statistics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> float:
    """The largest std / mean over students and (non-zero) terms of :func:`weight_statistics`."""
    return max((t["std"] / t["mean"] for s in statistics.values() for name, t in s.items()
                if name in TERMS and t["mean"] > 0), default=0.0)


def noise_separation(rows: WeightRows, students: list[str], flipped: Any) -> dict[str, dict[str, float]]:
    """Per student: the AUC of alpha ranking clean labels above flipped ones (0.5: blind, 1:
    every clean image gets more label weight than every flipped one) and the mean alpha of each."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for student in students:
        mine = [(r[3], bool(flipped[r[0]])) for r in rows if r[2] == student]
        alpha = [a for a, _ in mine]
        clean = [not f for _, f in mine]
        if len(set(clean)) < 2:
            continue
        out[student] = {
            "alpha_auc_clean_vs_flipped": float(roc_auc_score(clean, alpha)),
            "alpha_mean_clean": float(sum(a for a, c in mine if not c) / max(1, sum(not c for _, c in mine))),
            "alpha_mean_flipped": float(sum(a for a, c in mine if c) / max(1, sum(c for _, c in mine))),
            "flipped": int(sum(f for _, f in mine)),
            "images": len(mine),
        }
    return out


def _flipped_flags(engine: EngineView, split: str) -> Optional[Any]:
    """Which samples of ``split`` a noise option corrupted (indexed like the split): flipped
    labels (classification), images with any corrupted box (detection); ``None`` when the
    split's data set has no such record."""
    flipped = getattr(engine.task.dataset(split), "flipped", None)
    return flipped if flipped is not None and len(flipped) else None


def _update_summary(path: Path, split: str, summary: Mapping[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[split] = summary
    path.write_text(json.dumps(data, indent=2))


def _extremes_grid(engine: EngineView, split: str, rows: list[tuple[int, int, str, float, float, float]],
                   students: list[str], per_side: int, path: Path) -> None:
    """Two rows of images per student: most teacher-weighted, then most label-weighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = engine.task.dataset(split)
    fig, axes = plt.subplots(2 * len(students), per_side, figsize=(1.3 * per_side, 2.9 * len(students)), squeeze=False)
    for k, student in enumerate(students):
        mine = sorted((r for r in rows if r[2] == student), key=lambda r: r[4] / max(r[3] + r[4], 1e-12))
        sides = (("teacher", mine[::-1][:per_side]), ("label", mine[:per_side]))
        for j, (side, picked) in enumerate(sides):
            for col in range(per_side):
                ax = axes[2 * k + j][col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(picked):
                    ax.axis("off")
                    continue
                index, label, _, a, b, g = picked[col]
                image = engine.task.images(engine.task.collate([dataset[index]]))[0].float().cpu()
                image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
                if image.shape[0] == 1:
                    ax.imshow(image[0].numpy(), cmap="gray")
                else:
                    ax.imshow(image[:3].permute(1, 2, 0).numpy())
                ax.set_title((f"y={label}\n" if label >= 0 else "") + f"α{a:.2f} β{b:.2f}", fontsize=7)
                if col == 0:
                    ax.set_ylabel(f"{student}\nmost {side}", fontsize=8)
    fig.suptitle(f"C-Net on {split}: per student, the images weighted most towards the teacher (β/(α+β) largest) "
                 f"and towards the label (smallest)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distribution_figure(table: Path, path: Path) -> None:
    """Per term, histograms of the weights in ``<split>_weights.csv`` over the images, one per
    student (terms that are 0 for every image are left out)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with table.open() as f:
        rows = list(csv.DictReader(f))
    students = list(dict.fromkeys(r["student"] for r in rows))
    terms = [t for t in TERMS if any(float(r[t]) != 0 for r in rows)] or ["alpha"]
    fig, axes = plt.subplots(1, len(terms), figsize=(4.3 * len(terms), 3.6), squeeze=False)
    for ax, term in zip(axes[0], terms):
        values = [float(r[term]) for r in rows]
        low, high = min(values), max(values)
        bins = [low + (high - low) * k / 30 for k in range(31)] if high > low else 30  # the same bins for every student
        for student in students:
            ax.hist([float(r[term]) for r in rows if r["student"] == student], bins=bins, alpha=0.5, label=student)
        ax.set_title(term)
        ax.set_xlabel("weight")
    axes[0][0].set_ylabel("images")
    axes[0][0].legend(fontsize=8)
    split = table.name.removesuffix("_weights.csv")
    fig.suptitle(f"C-Net weights over the {split} images at the end of training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clean_vs_flipped_histogram(rows: list[tuple[int, int, str, float, float, float]], students: list[str], flipped: Any,
                                separation: Mapping[str, Mapping[str, float]], path: Path) -> None:
    """Per student, histograms of alpha for images whose label is clean and for flipped ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(students), figsize=(3.6 * len(students), 2.8), squeeze=False)
    for ax, student in zip(axes[0], students):
        mine = [(r[3], bool(flipped[r[0]])) for r in rows if r[2] == student]
        for is_flipped, colour, name in ((False, "tab:blue", "clean"), (True, "tab:red", "flipped")):
            values = [a for a, f in mine if f == is_flipped]
            if values:
                ax.hist(values, bins=30, alpha=0.6, color=colour, label=f"{name} ({len(values)})", density=True)
        auc = separation.get(student, {}).get("alpha_auc_clean_vs_flipped")
        ax.set_title(f"{student}: alpha AUC {auc:.2f}" if auc is not None else student, fontsize=9)
        ax.set_xlabel("alpha (label weight)")
        ax.legend(fontsize=7)
    fig.suptitle("C-Net on the training split: label weight of images with clean vs flipped labels", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""MC-Distil (Section 3 of the paper): a meta-learned coordinator network (C-Net) that mixes each
student's loss per image, and the PooledStudent consensus target (eq. 4).

* :class:`CNet` answers ``loss_weights``: ``g_phi(x)`` gives alpha, beta, gamma for every student
  and every image. It is a meta module: the engine's bilevel step trains it (eq. 8-9) on the
  default meta objective, the sum of the students' cross-entropy on a held-out batch (eq. 6).
  With ``independent: true`` every student gets a C-Net of its own (the Meta-Distil baseline).
* :class:`PooledStudent` answers ``consensus_targets``: the true class takes the largest logit
  over the students, every other class the smallest (detached).

Unlike the authors' release, the C-Net's head is trained, its outputs are bounded by a chosen
activation, and gamma with PooledStudent is implemented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collab_distill.hookspecs import hookimpl
from collab_distill.meta import MetaModule
from collab_distill.plugin_manager import Plugin
from collab_distill.records import Knowledge, LossWeights, SoftTarget
from collab_distill.task import ConfigError, ModelFactory, TaskInfo

__all__ = ["CNet", "CoordinatorNetwork", "PooledStudent", "pooled_student_logits"]

Activation = Literal["sigmoid", "softplus", "softmax"]


class CoordinatorNetwork(nn.Module):
    """``g_phi``: an image backbone, optionally the detached logits of the cohort, and a linear
    head with 3 outputs (alpha, beta, gamma) per student it coordinates."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        num_students: int,
        activation: Activation = "sigmoid",
        scale: float = 1.0,
        logit_inputs: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_students = num_students
        self.activation = activation
        self.scale = scale
        self.head = nn.Linear(embedding_dim + logit_inputs, 3 * num_students)
        # start near the same weights for every image (0.5 * scale for sigmoid); small non-zero
        # head weights so the backbone gets a meta-gradient from the first meta step on
        nn.init.normal_(self.head.weight, std=1e-2)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor, logits: Optional[Tensor] = None) -> Tensor:
        """``[B, S, 3]`` weights (alpha, beta, gamma) for ``S`` students."""
        features = self.backbone(images)
        if logits is not None:
            features = torch.cat([features, logits], dim=1)
        raw = self.head(features).view(-1, self.num_students, 3)
        if self.activation == "sigmoid":
            return self.scale * torch.sigmoid(raw)
        if self.activation == "softplus":
            return self.scale * F.softplus(raw)
        return self.scale * torch.softmax(raw, dim=-1)  # the three terms of a student sum to scale


class CNet(Plugin):
    """MC-Distil's coordinator network as a loss-weight provider.

    Args:
        backbone: any image classifier factory; it is built with ``embedding_dim`` outputs and
            used as the C-Net's feature extractor (default: ResNet10-s, a small ResNet as in the paper).
        embedding_dim: width of the backbone's output.
        activation: ``sigmoid`` (each weight in (0, scale)), ``softplus`` (non-negative,
            unbounded) or ``softmax`` (alpha + beta + gamma = scale for each student and image).
        scale: multiplies the activation's output.
        use_logits: also feed the detached students' (and teachers') logits to the head.
        gamma: learn gamma; ``false`` fixes it at 0 (MC-Distil-NoPS).
        independent: one C-Net per student, each seeing only its own student (Meta-Distil).
        lr: Adam learning rate of the C-Net (paper: 1e-3).
        weight_decay: Adam weight decay of the C-Net (paper: 1e-4).
    """

    def __init__(
        self,
        backbone: Optional[ModelFactory] = None,
        embedding_dim: int = 64,
        activation: Activation = "sigmoid",
        scale: float = 1.0,
        use_logits: bool = False,
        gamma: bool = True,
        independent: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        if embedding_dim < 1 or scale <= 0 or lr <= 0 or weight_decay < 0:
            raise ConfigError("CNet: embedding_dim >= 1, scale > 0, lr > 0 and weight_decay >= 0 are required")
        if activation not in ("sigmoid", "softplus", "softmax"):
            raise ConfigError(f"CNet.activation={activation!r}: use sigmoid, softplus or softmax")
        if backbone is None:
            from collab_distill.tasks.classification.models import ResNet

            backbone = ResNet("s")
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.activation = activation
        self.scale = scale
        self.use_logits = use_logits
        self.gamma = gamma
        self.independent = independent
        self.lr = lr
        self.weight_decay = weight_decay
        self.students: list[str] = []
        self.module: Optional[nn.ModuleDict] = None

    # -- construction ---------------------------------------------------------------------

    def _network(self, info: TaskInfo, num_students: int, logit_inputs: int) -> CoordinatorNetwork:
        backbone_info = TaskInfo(num_classes=self.embedding_dim, in_channels=info.in_channels, image_size=info.image_size)
        return CoordinatorNetwork(
            self.backbone.build(backbone_info), self.embedding_dim, num_students, self.activation, self.scale, logit_inputs
        )

    @hookimpl
    def collab_distill_configure(self, engine: Any) -> None:
        info = engine.info
        self.students = list(engine.cohort.students)
        torch.manual_seed(engine.seed * 1_000 + 7)  # the C-Net's initialisation depends on the seed only
        if self.independent:
            logit_inputs = info.num_classes * (1 + len(engine.cohort.teachers)) if self.use_logits else 0
            nets = {s: self._network(info, 1, logit_inputs) for s in self.students}
        else:
            members = len(self.students) + len(engine.cohort.teachers)
            logit_inputs = info.num_classes * members if self.use_logits else 0
            nets = {"shared": self._network(info, len(self.students), logit_inputs)}
        self.module = nn.ModuleDict(nets)

    @hookimpl
    def collab_distill_meta_modules(self, engine: Any) -> list[MetaModule]:
        assert self.module is not None
        return [MetaModule("cnet", self.module, lambda p: torch.optim.Adam(p, lr=self.lr, weight_decay=self.weight_decay))]

    # -- the hook -------------------------------------------------------------------------

    def _logit_features(self, students: list[str], records: Mapping[str, Knowledge], teachers: Mapping[str, Knowledge]) -> Tensor:
        parts = [records[s].logits.detach() for s in students] + [t.logits.detach() for t in teachers.values()]
        return torch.cat(parts, dim=1).float()

    def weights(self, engine: Any, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge] = {}) -> dict[str, Tensor]:
        """``{student: [B, 3]}`` from the (possibly looked-ahead) C-Net."""
        nets = engine.meta_modules["cnet"]
        images = engine.task.images(batch)
        out: dict[str, Tensor] = {}
        if self.independent:
            for s in self.students:
                logits = self._logit_features([s], records, teacher_records) if self.use_logits else None
                out[s] = nets[s](images, logits)[:, 0]
        else:
            logits = self._logit_features(self.students, records, teacher_records) if self.use_logits else None
            w = nets["shared"](images, logits)
            out = {s: w[:, i] for i, s in enumerate(self.students)}
        if not self.gamma:
            out = {s: torch.cat([w[:, :2], torch.zeros_like(w[:, 2:])], dim=1) for s, w in out.items()}
        return out

    @hookimpl
    def collab_distill_loss_weights(
        self, engine: Any, batch: Any, records: Mapping[str, Knowledge], teacher_records: Mapping[str, Knowledge]
    ) -> dict[str, LossWeights]:
        weights = self.weights(engine, batch, records, teacher_records if self.use_logits else {})
        return {s: LossWeights.from_tensor(w) for s, w in weights.items()}

    # -- applying the C-Net to a data set --------------------------------------------------

    def apply(self, engine: Any, split: str) -> list[tuple[int, int, str, float, float, float]]:
        """The C-Net's weights for every image of ``split`` (this rank's shard) as rows
        ``(index, label, student, alpha, beta, gamma)``; the C-Net is left in its previous mode."""
        assert self.module is not None
        loader, _ = engine.loaders[split]
        modes = [m.training for m in self.module.modules()]
        self.module.eval()
        rows = []
        with torch.no_grad():
            for batch in loader:
                batch = engine.task.move_batch(batch, engine.fabric)
                records = {s: engine.task.knowledge(m, batch) for s, m in engine.students.items()} if self.use_logits else {}
                teachers = engine._teacher_records(batch, None) if self.use_logits else {}
                targets = batch.get("targets") if isinstance(batch, dict) else None
                # one class per image (classification) is shown in the grid; -1 otherwise
                labels = targets.tolist() if isinstance(targets, Tensor) and targets.dim() == 1 else [-1] * len(batch["index"])
                for student, w in self.weights(engine, batch, records, teachers).items():
                    for index, label, (a, b, g) in zip(batch["index"].tolist(), labels, w.float().cpu().tolist()):
                        rows.append((int(index), int(label), student, a, b, g))
        for m, mode in zip(self.module.modules(), modes):
            m.training = mode
        return rows

    def write_weights(self, engine: Any, split: str, per_side: int = 8) -> Path:
        """``plugins/cnet/<split>_weights.csv`` and ``<split>_extremes.png`` in the run folder: the
        weights of every image, and per student the ``per_side`` images whose loss leans most on
        the teacher (largest beta / (alpha + beta)) and most on the label (smallest)."""
        rows = self.apply(engine, split)
        folder = engine.run_dir / "plugins" / "cnet"
        folder.mkdir(parents=True, exist_ok=True)
        table = folder / f"{split}_weights.csv"
        table.write_text("index,label,student,alpha,beta,gamma\n"
                         + "".join(f"{i},{y},{s},{a:.6g},{b:.6g},{g:.6g}\n" for i, y, s, a, b, g in rows))
        try:
            _extremes_grid(engine, split, rows, self.students, per_side, folder / f"{split}_extremes.png")
        except ImportError:  # matplotlib is a dependency, but a grid is never worth failing a run for
            pass
        return table

    @hookimpl
    def collab_distill_fit_end(self, engine: Any) -> None:
        """Apply the trained C-Net to the val split (rank 0, its shard) for ``collab-distill report``."""
        if engine.fabric.is_global_zero and self.module is not None:
            self.write_weights(engine, "val")

    @hookimpl
    def collab_distill_evaluation_end(self, engine: Any, split: str) -> None:
        """``collab-distill validate|test`` of a finished run: apply its C-Net to that split too."""
        if (not engine.fitting and engine.run_dir is not None and engine.fabric.is_global_zero
                and engine.meta_modules.get("cnet") is not None):
            self.write_weights(engine, split)

    def __repr__(self) -> str:
        return (f"CNet(backbone={self.backbone.describe()}, activation={self.activation}, gamma={self.gamma}, "
                f"independent={self.independent}, use_logits={self.use_logits})")


def pooled_student_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 4: ``[S, U, K]`` student logits -> ``[U, K]``: max over students at the true class,
    min over students elsewhere. Units without a label (``-1``) take the min everywhere."""
    pooled = logits.min(dim=0).values
    has_label = labels >= 0
    if has_label.any():
        rows = has_label.nonzero(as_tuple=True)[0]
        cls = labels[rows]
        pooled[rows, cls] = logits[:, rows, cls].max(dim=0).values
    return pooled


class PooledStudent(Plugin):
    """The PooledStudent consensus target of MC-Distil (eq. 4), detached, for every student."""

    @hookimpl
    def collab_distill_consensus_targets(self, records: Mapping[str, Knowledge], temperature: float) -> dict[str, SoftTarget]:
        first = next(iter(records.values()))
        stacked = torch.stack([r.logits.detach() for r in records.values()])
        target = SoftTarget.from_logits(pooled_student_logits(stacked, first.unit_labels), temperature)
        return {name: target for name in records}


def _extremes_grid(engine: Any, split: str, rows: list[tuple[int, int, str, float, float, float]],
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

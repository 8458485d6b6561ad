"""A tiny digits config for tests that run the real CLI: one student, 200 images, one epoch."""

from __future__ import annotations

RESNET = "collab_distill.tasks.classification.ResNet"


def tiny_digits_yaml(*, subset: int = 200, loggers: str = "[]", teacher: str | None = None, extra: str = "") -> str:
    """The config text. ``teacher``: a ResNet size trained in the run for one epoch (and a KD mix
    that uses it); ``extra``: more top-level YAML, appended."""
    cohort_teacher = ""
    if teacher is not None:
        cohort_teacher = (
            f"  teachers:\n    t: {{model: {{class_path: {RESNET}, init_args: {{size: {teacher}}}}}, train_epochs: 1}}\n"
        )
        extra = ("plugins: [{class_path: collab_distill.plugins.fixed_weights.FixedLossWeights, "
                 "init_args: {alpha: 0.5, beta: 0.5}}]\n") + extra
    return f"""\
seed: 0
task:
  class_path: collab_distill.tasks.classification.ImageClassification
  init_args:
    data:
      class_path: collab_distill.tasks.classification.Digits
      init_args: {{batch_size: 32, subset: {subset}}}
cohort:
  students:
    s: {{class_path: {RESNET}, init_args: {{size: xxxs}}}}
{cohort_teacher}trainer:
  max_epochs: 1
  accelerator: cpu
  progress_bar: false
  loggers: {loggers}
{extra}"""

#!/usr/bin/env python
"""Knowledge distillation added to a detectron2 ``train_net.py``, without collab-distill's CLI.

Everything except ``build_model``, ``resume_or_load`` and the ``--teacher-*`` / distillation
arguments is detectron2's usual ``train_net.py``: ``DefaultTrainer`` with its hooks, periodic
checkpoints, ``COCOEvaluator`` and ``launch`` for several GPUs or machines. The model the
trainer sees is :class:`~collab_distill.tasks.detection.detectron2.DistillingRCNN`: in training
its loss dict is the student's own four losses plus ``loss_distill`` (KD over regions shared
with the teacher), which ``SimpleTrainer``/``AMPTrainer`` sum and log like any other loss; in
evaluation it is the student.

    python examples/detectron2_train_net.py --config-file student_R18_FPN.yaml \\
        --teacher-config teacher_R50_FPN.yaml --teacher-weights model_final_280758.pkl \\
        --num-gpus 8 --beta 0.5 --temperature 2  [KEY VALUE ... (student config overrides)]

Datasets are registered as in any detectron2 project (the builtin ``coco_2017_*`` names read
``$DETECTRON2_DATASETS/coco``); ``--coco-dataset NAME JSON IMAGE_DIR`` registers more.
Outputs in ``OUTPUT_DIR``: detectron2's checkpoints (``student.*`` and ``teacher.*`` keys;
``--resume`` continues from the one ``last_checkpoint`` names) and, once training finished,
``student_final.pth``, the student alone in detectron2's format, loadable by any detectron2
config through ``MODEL.WEIGHTS`` (it leaves ``last_checkpoint`` alone).

Weights never load partly by accident: the teacher's file and the checkpoint a ``--resume``
continues from must cover every key of the model with the right shapes, or the run stops before
training with the first problems and their likely cause (e.g. a teacher trained for another
number of classes). ``--teacher-weights`` also takes collab-distill's files: a run's
``teachers/NAME/teacher.pt``, a ``collab-distill export``, or a run's ``last.ckpt`` (with
``--teacher-member NAME`` when it holds several models).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, HookBase, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from collab_distill.checkpoint import atomic_save
from collab_distill.task import ConfigError
from collab_distill.tasks.detection.detectron2 import DistillingRCNN, load_detectron2_weights

RESUME = "--resume (the checkpoint OUTPUT_DIR/last_checkpoint names)"
RESUME_FIX = ("A resume needs a checkpoint of this run's model, student and teacher together (OUTPUT_DIR/model_*.pth): "
              "write its file name into OUTPUT_DIR/last_checkpoint, or train without --resume (or in another OUTPUT_DIR).")


class SaveStudent(HookBase):
    """After training finished, write the student alone as OUTPUT_DIR/student_final.pth, in
    detectron2's format (``{"model": state_dict}``). Not through ``DetectionCheckpointer.save``,
    which would point OUTPUT_DIR/last_checkpoint at it: a later ``--resume`` would then load a
    file without the wrapper's ``student.``/``teacher.`` keys."""

    def after_train(self) -> None:
        if comm.is_main_process() and self.trainer.iter >= self.trainer.max_iter:  # not after a failure
            model = self.trainer.model
            student = (model.module if isinstance(model, DistributedDataParallel) else model).student
            state = {key: value.cpu() for key, value in student.state_dict().items()}
            atomic_save({"model": state}, os.path.join(self.trainer.cfg.OUTPUT_DIR, "student_final.pth"))


class DistillationTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer whose model is the student wrapped with a frozen teacher."""

    teacher_cfg: CfgNode
    teacher_weights: str
    teacher_member: str | None = None
    distillation: dict[str, Any] = {}

    @classmethod
    def build_model(cls, cfg: CfgNode) -> DistillingRCNN:
        student = build_model(cfg)
        if cfg.MODEL.WEIGHTS:  # the student's initial weights (e.g. an ImageNet backbone: may be partial)
            load_detectron2_weights(student, cfg.MODEL.WEIGHTS, strict=False, field="MODEL.WEIGHTS")
        teacher = build_model(cls.teacher_cfg)
        # all of it: distilling from a teacher with a random head would train the student on noise
        load_detectron2_weights(teacher, cls.teacher_weights, field="--teacher-weights", member=cls.teacher_member,
                                fix="Give weights trained for the --teacher-config model on the student's classes.")
        return DistillingRCNN(student, teacher, student_format=cfg.INPUT.FORMAT,
                              teacher_format=cls.teacher_cfg.INPUT.FORMAT, **cls.distillation)

    def resume_or_load(self, resume: bool = True) -> None:
        # MODEL.WEIGHTS already went into the student in build_model; only a resume reads the
        # wrapper's own checkpoint (student and teacher together), which must cover all of it:
        # detectron2 would load what fits, log the rest and train on from random weights
        if resume and self.checkpointer.has_checkpoint():
            load_detectron2_weights(self.model, self.checkpointer.get_checkpoint_file(), field=RESUME, fix=RESUME_FIX,
                                    checkpointables=self.checkpointer.checkpointables)
            self.start_iter = self.iter + 1  # the checkpoint holds the iteration that just finished

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> COCOEvaluator:
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    def build_hooks(self) -> list[HookBase]:
        return [*super().build_hooks(), SaveStudent()]


def setup(args: Any) -> CfgNode:
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    teacher_cfg = get_cfg()
    teacher_cfg.merge_from_file(args.teacher_config)
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.freeze()
    DistillationTrainer.teacher_cfg = teacher_cfg
    DistillationTrainer.teacher_weights = args.teacher_weights
    DistillationTrainer.teacher_member = args.teacher_member
    DistillationTrainer.distillation = {"alpha": args.alpha, "beta": args.beta, "temperature": args.temperature,
                                        "regions_per_image": args.regions_per_image}
    return cfg


def main(args: Any) -> Any:
    for name, json_file, image_root in args.coco_dataset or []:
        register_coco_instances(name, {}, json_file, image_root)
    cfg = setup(args)
    if args.eval_only:  # evaluates the student: of the last checkpoint with --resume, else MODEL.WEIGHTS
        model = DistillationTrainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if args.resume and checkpointer.has_checkpoint():
            load_detectron2_weights(model, checkpointer.get_checkpoint_file(), field=RESUME, fix=RESUME_FIX)
        elif cfg.MODEL.WEIGHTS:
            load_detectron2_weights(model.student, cfg.MODEL.WEIGHTS, field="MODEL.WEIGHTS (--eval-only evaluates the student)")
        return DistillationTrainer.test(cfg, model.eval())
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parser() -> Any:
    p = default_argument_parser()
    p.add_argument("--teacher-config", required=True, help="detectron2 config file of the teacher")
    p.add_argument("--teacher-weights", required=True,
                   help="the teacher's trained weights: detectron2 .pkl / .pth, collab-distill teacher.pt / export / last.ckpt")
    p.add_argument("--teacher-member", help="the model to take from a collab-distill last.ckpt that holds several")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the student's own detection losses")
    p.add_argument("--beta", type=float, default=0.5, help="weight of the distillation loss")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the distillation")
    p.add_argument("--regions-per-image", type=int, default=64, help="teacher proposals shared per image")
    p.add_argument("--coco-dataset", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                   help="register a COCO-format data set under NAME (repeatable)")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except ConfigError as err:  # a file that does not fit: one message, no traceback
        sys.exit(f"detectron2_train_net.py: error: {err}")

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
``--resume`` works as usual) and ``student_final.pth``, the student alone, loadable by any
detectron2 config through ``MODEL.WEIGHTS``.
"""

from __future__ import annotations

import os
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, HookBase, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from collab_distill.tasks.detection.detectron2 import DistillingRCNN


class SaveStudent(HookBase):
    """After training, write the student alone as OUTPUT_DIR/student_final.pth."""

    def after_train(self) -> None:
        if comm.is_main_process():
            model = self.trainer.model
            student = (model.module if isinstance(model, DistributedDataParallel) else model).student
            DetectionCheckpointer(student, save_dir=self.trainer.cfg.OUTPUT_DIR).save("student_final")


class DistillationTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer whose model is the student wrapped with a frozen teacher."""

    teacher_cfg: CfgNode
    teacher_weights: str
    distillation: dict[str, Any] = {}

    @classmethod
    def build_model(cls, cfg: CfgNode) -> DistillingRCNN:
        student = build_model(cfg)
        if cfg.MODEL.WEIGHTS:  # the student's initial weights (e.g. an ImageNet backbone)
            DetectionCheckpointer(student).load(cfg.MODEL.WEIGHTS)
        teacher = build_model(cls.teacher_cfg)
        DetectionCheckpointer(teacher).load(cls.teacher_weights)
        return DistillingRCNN(student, teacher, student_format=cfg.INPUT.FORMAT,
                              teacher_format=cls.teacher_cfg.INPUT.FORMAT, **cls.distillation)

    def resume_or_load(self, resume: bool = True) -> None:
        # MODEL.WEIGHTS already went into the student in build_model; only a resume reads the
        # wrapper's own checkpoint (student and teacher together)
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)

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
    DistillationTrainer.distillation = {"alpha": args.alpha, "beta": args.beta, "temperature": args.temperature,
                                        "regions_per_image": args.regions_per_image}
    return cfg


def main(args: Any) -> Any:
    for name, json_file, image_root in args.coco_dataset or []:
        register_coco_instances(name, {}, json_file, image_root)
    cfg = setup(args)
    if args.eval_only:
        model = DistillationTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return DistillationTrainer.test(cfg, model.eval())
    trainer = DistillationTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parser() -> Any:
    p = default_argument_parser()
    p.add_argument("--teacher-config", required=True, help="detectron2 config file of the teacher")
    p.add_argument("--teacher-weights", required=True, help="the teacher's trained weights (.pkl / .pth)")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the student's own detection losses")
    p.add_argument("--beta", type=float, default=0.5, help="weight of the distillation loss")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the distillation")
    p.add_argument("--regions-per-image", type=int, default=64, help="teacher proposals shared per image")
    p.add_argument("--coco-dataset", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                   help="register a COCO-format data set under NAME (repeatable)")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))

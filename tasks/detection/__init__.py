"""Object detection: COCO-format data, torchvision Faster R-CNN detectors of several sizes, and
the task adapter that gives every cohort member's class logits over shared regions."""

from collab_distill.tasks.detection.data import CocoDetection
from collab_distill.tasks.detection.models import FasterRCNN, RegionDetector
from collab_distill.tasks.detection.task import CocoEvaluator, ObjectDetection

__all__ = ["CocoDetection", "FasterRCNN", "RegionDetector", "ObjectDetection", "CocoEvaluator"]

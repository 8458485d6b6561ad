"""Image classification: data sets, the ResNet10 family and torchvision models, multi-exit
wrappers, the task adapter."""

from collab_distill.tasks.classification.data import (
    CIFAR10,
    CIFAR100,
    ClassificationData,
    Digits,
    ImageFolderData,
    TinyImageNet,
)
from collab_distill.tasks.classification.models import ResNet, ResNetCifar, TorchvisionModel
from collab_distill.tasks.classification.multi_exit import MultiExit, MultiExitNet, MultiExitOutput
from collab_distill.tasks.classification.task import ImageClassification, TopKEvaluator

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "ClassificationData",
    "Digits",
    "ImageFolderData",
    "TinyImageNet",
    "ResNet",
    "ResNetCifar",
    "TorchvisionModel",
    "MultiExit",
    "MultiExitNet",
    "MultiExitOutput",
    "ImageClassification",
    "TopKEvaluator",
]

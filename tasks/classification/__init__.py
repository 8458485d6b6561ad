"""Image classification: data sets, the ResNet10 family and torchvision models, multi-exit
wrappers, the task adapter."""

from collab_distill.tasks.classification.data import (
    CIFAR10,
    CIFAR100,
    ClassificationData,
    Digits,
    ImageFolderData,
    LabelNoise,
    TinyImageNet,
    instance_dependent_noise,
    symmetric_noise,
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
    "LabelNoise",
    "symmetric_noise",
    "instance_dependent_noise",
    "ResNet",
    "ResNetCifar",
    "TorchvisionModel",
    "MultiExit",
    "MultiExitNet",
    "MultiExitOutput",
    "ImageClassification",
    "TopKEvaluator",
]

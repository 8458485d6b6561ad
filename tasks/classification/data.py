"""Image classification data sets: loading, validation, seeded splits and seeded augmentation.

Every data set here is configured in YAML by ``class_path``/``init_args`` and offers four
splits:

``train``
    The official training set minus the held-out splits below. Its ``__getitem__`` takes the
    ``(index, augmentation_seed)`` keys that :class:`~collab_distill.data.SeededSampler`
    yields (or a plain ``int``) and applies the training augmentation under
    :func:`~collab_distill.data.augment_seeded`, so one key always gives the same pixels.
``meta``
    A seeded random ``meta_fraction`` of the official training set, held out from ``train``
    (used to learn how losses are mixed). Evaluation transforms only.
``val``
    Another, disjoint, seeded random ``val_fraction`` of the official training set, used for
    model selection. With ``val_fraction=0`` there is no separate validation split and
    ``dataset("val")`` returns the ``meta`` split.
``test``
    The official test set (for Tiny-ImageNet: its labelled official validation set). It is
    only reported, never used for selection.

Samples are ``{"inputs": Tensor, "targets": int, "index": int}`` where ``index`` is the
position within the split (the number the sampler gave). ``inputs`` is ``[C, H, W]``, or
``[V, C, H, W]`` for ``views=V > 1`` independently augmented views of one training image.

The splits depend only on the ``seed`` given to :meth:`ClassificationData.setup` (never on the
global RNG state), so every process of a run, and a resumed run, sees the same splits.

``label_noise`` (a :class:`LabelNoise`) corrupts the labels of the ``train`` split only, seeded
the same way, for robustness experiments such as MC-Distil's Instance CIFAR-100: ``meta``,
``val`` and ``test`` keep their clean labels. The train split's ``flipped`` and
``clean_targets`` tell which labels were changed.

The code lives in sibling modules, by concern; this module keeps every name it had:

* :mod:`~collab_distill.tasks.classification.sources`: the pixels of an official split and
  :class:`SplitDataset`, the data set of one split (transforms, seeded augmentation, views).
* :mod:`~collab_distill.tasks.classification.label_noise`: the label noise generators.
* :mod:`~collab_distill.tasks.classification.base`: :class:`ClassificationData`, the checks and the
  seeded splits, :class:`LabelNoise`.
* :mod:`~collab_distill.tasks.classification.in_memory`: :class:`Digits`, :class:`CIFAR10`,
  :class:`CIFAR100`.
* :mod:`~collab_distill.tasks.classification.folders`: :class:`TinyImageNet`,
  :class:`ImageFolderData`.
"""

from __future__ import annotations

from collab_distill.tasks.classification.base import IMAGENET_MEAN, IMAGENET_STD, ClassificationData, LabelNoise
from collab_distill.tasks.classification.base import NOISE_KINDS as NOISE_KINDS
from collab_distill.tasks.classification.base import SPLITS as SPLITS
from collab_distill.tasks.classification.folders import ImageFolderData, TinyImageNet
from collab_distill.tasks.classification.in_memory import (
    CIFAR10,
    CIFAR100,
    CIFAR_MEAN,
    CIFAR_STD,
    Digits,
)
from collab_distill.tasks.classification.in_memory import CIFAR10_MEAN as CIFAR10_MEAN
from collab_distill.tasks.classification.in_memory import CIFAR10_STD as CIFAR10_STD
from collab_distill.tasks.classification.label_noise import instance_dependent_noise, symmetric_noise
from collab_distill.tasks.classification.sources import SplitDataset

__all__ = [
    "ClassificationData",
    "SplitDataset",
    "LabelNoise",
    "symmetric_noise",
    "instance_dependent_noise",
    "Digits",
    "CIFAR10",
    "CIFAR100",
    "TinyImageNet",
    "ImageFolderData",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

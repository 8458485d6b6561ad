"""The classification data sets held in memory: scikit-learn's digits (no files needed) and
CIFAR-10/100 from the official python pickles.

See :mod:`collab_distill.tasks.classification.data` for the splits every data set offers.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import v2

from collab_distill.task import ConfigError, TaskInfo
from collab_distill.tasks.classification.base import ClassificationData, LabelNoise, check_root
from collab_distill.tasks.classification.sources import LoadedData, Source, TensorSource

__all__ = ["Digits", "CIFAR10", "CIFAR100", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100
CIFAR_STD = (0.2673, 0.2564, 0.2762)


# ----------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------


class Digits(ClassificationData):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images, 10 classes.

    Needs no files. A stratified ``test_fraction`` of the images, drawn with ``test_seed``
    (fixed across runs by default, so it plays the part of an official test set), is the
    ``test`` split; the rest is the training set split into ``train``/``meta``/``val`` by the run
    seed. Inputs are float32 ``[1, 8, 8]``, normalised with the ``train`` split's mean and std;
    the augmentation is a random translation by up to one pixel.

    Args:
        test_fraction: Fraction of all images used as the test split, in ``(0, 1)``.
        test_seed: Seed of the test split; ``None`` uses the run seed.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    def __init__(
        self,
        test_fraction: float = 0.2,
        test_seed: int | None = 0,
        meta_fraction: float = 0.1,
        val_fraction: float = 0.1,
        views: int = 1,
        augment: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        subset: int | None = None,
        label_noise: LabelNoise | None = None,
    ) -> None:
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.test_fraction = test_fraction
        self.test_seed = test_seed

    def setup(self, seed: int) -> TaskInfo:
        self._seed = int(seed)
        return super().setup(seed)

    def _load(self) -> LoadedData:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"Digits.test_fraction is {self.test_fraction}; it must be in (0, 1), e.g. 0.2.")
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
        targets = digits.target.astype(np.int64)
        test_seed = self._seed if self.test_seed is None else self.test_seed
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=self.test_fraction, random_state=test_seed, stratify=targets
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        return LoadedData(
            train=TensorSource(images[train_idx].contiguous(), targets[train_idx]),
            test=TensorSource(images[test_idx].contiguous(), targets[test_idx]),
            class_names=[str(d) for d in digits.target_names],
            in_channels=1,
            image_size=(8, 8),
        )

    def _normalization(self, train: Source, train_indices: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
        assert isinstance(train, TensorSource)
        x = train.images[torch.from_numpy(train_indices)]
        return (float(x.mean()),), (float(x.std()),)

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=1)]


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


# torchvision verifies the md5 of every CIFAR pickle (``_check_integrity`` for the data batches,
# ``_load_meta`` for the meta file) against the official archive. That rejects copies that were
# re-pickled or converted (and the small synthetic files of the tests). ``check_integrity(path,
# None)`` only checks that the file exists, so these subclasses blank the checksums, which turns
# both checks into existence checks without copying torchvision's loading code. They are used
# only with ``verify_checksums: false``.
class _UncheckedCIFAR10(datasets.CIFAR10):
    train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _UncheckedCIFAR100(datasets.CIFAR100):
    train_list = [[f, None] for f, _ in datasets.CIFAR100.train_list]
    test_list = [[f, None] for f, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


class _CIFARBase(ClassificationData):
    _tv_cls: type[Any] = datasets.CIFAR10
    _unchecked_cls: type[Any] = _UncheckedCIFAR10
    _folder: str = ""
    _files: str = ""
    _archive: str = ""

    def __init__(
        self,
        root: str,
        verify_checksums: bool = True,
        meta_fraction: float = 0.1,
        val_fraction: float = 0.1,
        views: int = 1,
        augment: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        subset: int | None = None,
        label_noise: LabelNoise | None = None,
    ) -> None:
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.root = root
        self.verify_checksums = verify_checksums

    def _load(self) -> LoadedData:
        name = type(self).__name__
        expected = f"{self._folder}/{self._files} (the extracted {self._archive})"
        root = check_root(name, self.root, expected)
        folder = os.path.join(root, self._folder)
        if not os.path.isdir(folder):
            raise ConfigError(
                f"{name}.root: {root!r} has no {self._folder}/ folder. Expected layout: root/{expected}. "
                "Set root to the folder that contains it."
            )
        tv_cls = self._tv_cls
        cls = tv_cls if self.verify_checksums else self._unchecked_cls
        try:
            train = cls(root, train=True, download=False)
            test = cls(root, train=False, download=False)
        except RuntimeError as err:
            if "not found or corrupted" not in str(err):
                raise
            missing = [
                f for f, _ in tv_cls.train_list + tv_cls.test_list + [[tv_cls.meta["filename"], None]]
                if not os.path.isfile(os.path.join(folder, f))
            ]
            if missing:
                msg = f"is missing {', '.join(missing)}"
                fix = "Extract the official archive there."
            else:
                msg = "has files whose md5 checksums differ from the official archive (corrupted or re-packed)"
                fix = "Re-extract the official archive, or set verify_checksums: false if the files are a deliberate conversion."
            raise ConfigError(f"{name}.root: {folder!r} {msg}. Expected layout: root/{expected}. {fix}") from err
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise ConfigError(
                f"{name}.root: cannot read the pickles in {folder!r} ({type(err).__name__}: {err}). "
                f"Expected the python-pickle layout root/{expected}."
            ) from err

        def to_source(ds: Any) -> TensorSource:
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            return TensorSource(images, ds.targets)

        return LoadedData(
            train=to_source(train),
            test=to_source(test),
            class_names=list(train.classes),
            in_channels=3,
            image_size=(32, 32),
        )

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]


class CIFAR100(_CIFARBase):
    """CIFAR-100 (50,000 training / 10,000 test 32x32 images, 100 classes) from the python
    pickles: ``root/cifar-100-python/{train,test,meta}``. Held in memory. Augmentation: random
    crop 32 with padding 4 and horizontal flip; the usual CIFAR-100 mean/std.

    Args:
        root: Folder that contains ``cifar-100-python/``.
        verify_checksums: Check the files' md5 against the official archive (as torchvision
            does); turn off for re-pickled or converted copies.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    _tv_cls = datasets.CIFAR100
    _unchecked_cls = _UncheckedCIFAR100
    _folder = "cifar-100-python"
    _archive = "cifar-100-python.tar.gz"
    _files = "{train,test,meta}"
    mean = CIFAR_MEAN
    std = CIFAR_STD


class CIFAR10(_CIFARBase):
    """CIFAR-10 (50,000 training / 10,000 test 32x32 images, 10 classes) from the python
    pickles: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``. Held in
    memory. Augmentation: random crop 32 with padding 4 and horizontal flip; the usual CIFAR-10
    mean/std.

    Args:
        root: Folder that contains ``cifar-10-batches-py/``.
        verify_checksums: Check the files' md5 against the official archive (as torchvision
            does); turn off for re-pickled or converted copies.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
    """

    _tv_cls = datasets.CIFAR10
    _unchecked_cls = _UncheckedCIFAR10
    _folder = "cifar-10-batches-py"
    _archive = "cifar-10-python.tar.gz"
    _files = "{data_batch_1..5,test_batch,batches.meta}"
    mean = CIFAR10_MEAN
    std = CIFAR10_STD

"""The classification data sets read lazily from image files: Tiny-ImageNet-200 and any
ImageFolder tree of class folders, and the image listing they share.

See :mod:`collab_distill.tasks.classification.data` for the splits every data set offers.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from torchvision.transforms import v2

from collab_distill.data import folder_problem, images_problem
from collab_distill.task import ConfigError
from collab_distill.tasks.classification.base import ClassificationData, LabelNoise, check_root
from collab_distill.tasks.classification.sources import FileSource, LoadedData

__all__ = ["TinyImageNet", "ImageFolderData"]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------


def _images_in(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(
            e.path for e in it if e.is_file() and e.name.lower().endswith(_IMAGE_EXTENSIONS)
        )


class TinyImageNet(ClassificationData):
    """Tiny-ImageNet-200 (100,000 training / 10,000 labelled validation 64x64 RGB images, 200
    classes), read lazily from ``root/tiny-imagenet-200/`` (or ``root`` itself being that
    folder)::

        wnids.txt                       one class id per line
        words.txt                       optional: "wnid<TAB>names" (for class_names)
        train/<wnid>/images/*.JPEG
        val/images/*.JPEG
        val/val_annotations.txt         "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"

    The official validation set is the ``test`` split (the official test set has no labels).
    Augmentation: random crop 64 with padding 8 and horizontal flip; ImageNet mean/std.

    Args:
        root: ``tiny-imagenet-200`` or the folder that contains it.
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

    _layout = (
        "tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
        "val/val_annotations.txt}"
    )

    def __init__(
        self,
        root: str,
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

    def _fail(self, what: str) -> ConfigError:
        return ConfigError(f"TinyImageNet.root: {what}. Expected layout: root/{self._layout}.")

    def _load(self) -> LoadedData:
        root = check_root("TinyImageNet", self.root, "tiny-imagenet-200/")
        base = os.path.join(root, "tiny-imagenet-200")
        if not os.path.isdir(base):
            base = root
        if not os.path.isfile(os.path.join(base, "wnids.txt")):
            raise self._fail(f"neither {root!r} nor {root!r}/tiny-imagenet-200 contains wnids.txt")
        with open(os.path.join(base, "wnids.txt")) as f:
            wnids = [line.strip() for line in f if line.strip()]
        if not wnids:
            raise self._fail(f"{base}/wnids.txt lists no classes")
        if len(set(wnids)) != len(wnids):
            raise self._fail(f"{base}/wnids.txt lists a class twice")
        index = {w: i for i, w in enumerate(wnids)}

        paths: list[str] = []
        targets: list[int] = []
        for w in wnids:
            folder = os.path.join(base, "train", w, "images")
            if not os.path.isdir(folder):
                raise self._fail(f"missing training folder {folder!r} for class {w}")
            files = _images_in(folder)
            if not files:
                raise self._fail(f"training folder {folder!r} (class {w}) has no images")
            paths += files
            targets += [index[w]] * len(files)

        val_dir = os.path.join(base, "val", "images")
        ann = os.path.join(base, "val", "val_annotations.txt")
        if not os.path.isdir(val_dir) or not os.path.isfile(ann):
            raise self._fail(f"missing {val_dir!r} or {ann!r} (the labelled official validation set, used as test)")
        present = set(os.listdir(val_dir))
        test_paths: list[str] = []
        test_targets: list[int] = []
        with open(ann) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                cols = line.rstrip("\n").split("\t")
                if len(cols) < 2:
                    raise self._fail(f"{ann}:{lineno} is not 'file<TAB>wnid...'")
                fname, w = cols[0], cols[1]
                if w not in index:
                    raise self._fail(f"{ann}:{lineno} names class {w!r}, which is not in wnids.txt")
                if fname not in present:
                    raise self._fail(f"{ann}:{lineno} names {fname!r}, which is not in {val_dir!r}")
                test_paths.append(os.path.join(val_dir, fname))
                test_targets.append(index[w])

        names = dict(zip(wnids, wnids))
        words = os.path.join(base, "words.txt")
        if os.path.isfile(words):
            with open(words) as f:
                for line in f:
                    cols = line.rstrip("\n").split("\t")
                    if len(cols) >= 2 and cols[0] in names:
                        names[cols[0]] = cols[1].split(",")[0].strip() or cols[0]
        size = (64, 64)
        return LoadedData(
            train=FileSource(paths, targets, size),
            test=FileSource(test_paths, test_targets, size),
            class_names=[names[w] for w in wnids],
            in_channels=3,
            image_size=size,
        )

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=8), v2.RandomHorizontalFlip()]


# ----------------------------------------------------------------------------------------------
# a generic image folder tree
# ----------------------------------------------------------------------------------------------


class ImageFolderData(ClassificationData):
    """Any image classification data laid out as class folders (torchvision ImageFolder)::

        root/<train_dir>/<class>/*.{jpg,png,...}
        root/<test_dir>/<class>/*.{jpg,png,...}

    Both must have the same class folders. Images are read lazily, converted to RGB and resized
    to ``image_size`` x ``image_size``. Augmentation: random crop with padding
    ``image_size // 8`` and horizontal flip; ImageNet mean/std.

    Args:
        root: Folder that contains ``train_dir`` and ``test_dir``.
        image_size: Side length the images are resized to.
        train_dir: Name of the training folder under ``root``.
        test_dir: Name of the test folder under ``root``.
        meta_fraction: See :class:`ClassificationData`.
        val_fraction: See :class:`ClassificationData`.
        views: See :class:`ClassificationData`.
        augment: See :class:`ClassificationData`.
        batch_size: See :class:`ClassificationData`.
        eval_batch_size: See :class:`ClassificationData`.
        num_workers: See :class:`ClassificationData`.
        subset: See :class:`ClassificationData`.
        label_noise: See :class:`ClassificationData`.
        check_images: At set-up, open every image the splits use (the used part of ``train_dir``
            with ``subset``, and all of ``test_dir``) and verify it with PIL (headers and, for
            PNG, checksums; no full decode, so e.g. a truncated JPEG may pass), so that a corrupt
            file stops the run with its name before training instead of in the middle of an
            epoch. It reads every file once, which takes a while for millions of images:
            ``false`` skips it for huge folders known to be sound.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        train_dir: str = "train",
        test_dir: str = "test",
        meta_fraction: float = 0.1,
        val_fraction: float = 0.1,
        views: int = 1,
        augment: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        subset: int | None = None,
        label_noise: LabelNoise | None = None,
        check_images: bool = True,
    ) -> None:
        super().__init__(
            meta_fraction, val_fraction, views, augment, batch_size, eval_batch_size, num_workers, subset, label_noise
        )
        self.root = root
        self.check_images = check_images
        # stored under another name: ``image_size`` is the (H, W) property every data set has
        self.image_size_arg = image_size
        self.train_dir = train_dir
        self.test_dir = test_dir

    def _scan(self, root: str, field: str, sub: str, allow_empty: bool) -> tuple[list[str], list[str], list[int]]:
        folder = os.path.join(root, sub)
        layout = f"root/{self.train_dir}/<class>/*.jpg and root/{self.test_dir}/<class>/*.jpg"
        problem = folder_problem(folder)
        if problem:
            raise ConfigError(
                f"ImageFolderData.{field}: {folder!r} {problem}. Expected layout: {layout}. "
                f"Set {field} (or root) to match the folders on disk."
            )
        with os.scandir(folder) as it:
            classes = sorted(e.name for e in it if e.is_dir())
        if not classes:
            raise ConfigError(
                f"ImageFolderData.{field}: {folder!r} has no class folders. Expected layout: {layout}."
            )
        paths: list[str] = []
        targets: list[int] = []
        for k, c in enumerate(classes):
            files = _images_in(os.path.join(folder, c))
            if not files and not allow_empty:
                raise ConfigError(
                    f"ImageFolderData.{field}: class folder {os.path.join(folder, c)!r} has no images "
                    f"({', '.join(_IMAGE_EXTENSIONS)}). Add images or remove the folder."
                )
            paths += files
            targets += [k] * len(files)
        return classes, paths, targets

    def _load(self) -> LoadedData:
        if not isinstance(self.image_size_arg, int) or self.image_size_arg < 1:
            raise ConfigError(f"ImageFolderData.image_size is {self.image_size_arg}; it must be an integer >= 1.")
        root = check_root("ImageFolderData", self.root, f"{self.train_dir}/<class>/ and {self.test_dir}/<class>/")
        classes, paths, targets = self._scan(root, "train_dir", self.train_dir, allow_empty=False)
        test_classes, test_paths, test_targets = self._scan(root, "test_dir", self.test_dir, allow_empty=True)
        if classes != test_classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            raise ConfigError(
                f"ImageFolderData.test_dir: the class folders of {self.test_dir!r} differ from those of "
                f"{self.train_dir!r} (only in train: {only_train[:5]}, only in test: {only_test[:5]}). "
                "Give both the same class folders (an empty folder is allowed in test)."
            )
        if not test_paths:
            raise ConfigError(f"ImageFolderData.test_dir: {os.path.join(root, self.test_dir)!r} has no images.")
        size = (self.image_size_arg, self.image_size_arg)
        return LoadedData(
            train=FileSource(paths, targets, size),
            test=FileSource(test_paths, test_targets, size),
            class_names=classes,
            in_channels=3,
            image_size=size,
        )

    def _too_few_classes(self, loaded: LoadedData) -> str:
        folder = os.path.join(os.path.expanduser(str(self.root)), self.train_dir)
        n = len(loaded.class_names)
        return (
            f"ImageFolderData.train_dir: {folder!r} has {n} class folder{'s' if n != 1 else ''} "
            f"({list(loaded.class_names)}); classification needs at least 2 classes (with one, every prediction is "
            f"right and training reports 100% accuracy). Add a folder per class: root/{self.train_dir}/<class>/*.jpg."
        )

    def _check_files(self, loaded: LoadedData, train_indices: np.ndarray) -> None:
        if not self.check_images:
            return
        assert isinstance(loaded.train, FileSource) and isinstance(loaded.test, FileSource)
        paths = [str(p) for p in loaded.train.paths[np.sort(train_indices)]] + [str(p) for p in loaded.test.paths]
        problem = images_problem("ImageFolderData", paths)
        if problem is not None:
            raise ConfigError(problem)

    def _augmentation(self, image_size: tuple[int, int]) -> list[Callable]:
        return [v2.RandomCrop(image_size, padding=max(1, image_size[0] // 8)), v2.RandomHorizontalFlip()]

"""Seeded label noise on the train split of the classification data sets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from collab_distill.task import ConfigError
from collab_distill.tasks.classification import (
    Digits,
    ImageFolderData,
    LabelNoise,
    instance_dependent_noise,
    symmetric_noise,
)
from conftest import digits_args

KINDS = ("symmetric", "instance")


def _digits(kind: str | None = None, rate: float = 0.4, seed: int | None = None, run_seed: int = 0) -> Digits:
    data = Digits(label_noise=None if kind is None else LabelNoise(kind, rate, seed))
    data.setup(run_seed)
    return data


@pytest.fixture(scope="module", params=KINDS)
def noisy(request) -> Digits:
    return _digits(request.param)


# ----------------------------------------------------------------------------------------------
# the data set
# ----------------------------------------------------------------------------------------------


def test_realised_rate_is_close_to_the_requested_rate(noisy):
    train = noisy.dataset("train")
    assert len(train) > 1000
    realised = train.flipped.mean()
    assert abs(realised - 0.4) < 0.05
    summary = noisy.info.extra["label_noise"]
    assert summary == {
        "kind": noisy.label_noise.kind,
        "rate": 0.4,
        "seed": 0,
        "flipped": int(train.flipped.sum()),
        "train_size": len(train),
        "realised_rate": pytest.approx(realised),
    }


def test_flipped_labels_differ_and_the_others_are_kept(noisy):
    train = noisy.dataset("train")
    clean, labels = train.clean_targets, train.targets
    assert train.flipped.dtype == bool and train.flipped.shape == clean.shape
    assert (labels[train.flipped] != clean[train.flipped]).all()
    assert (labels[~train.flipped] == clean[~train.flipped]).all()
    assert labels.min() >= 0 and labels.max() < noisy.num_classes
    assert len(np.unique(labels[train.flipped])) == noisy.num_classes  # every class receives flips


def test_samples_carry_the_noisy_label_and_their_split_index(noisy):
    train = noisy.dataset("train")
    for i in np.flatnonzero(train.flipped)[:5].tolist() + np.flatnonzero(~train.flipped)[:5].tolist():
        for key in (i, (i, 7)):  # a plain index and a SeededSampler key
            sample = train[key]
            assert set(sample) == {"inputs", "targets", "index"}
            assert sample["index"] == i and sample["targets"] == train.targets[i]
            assert train.flipped[sample["index"]] == (sample["targets"] != train.clean_targets[i])


def test_meta_val_and_test_keep_their_clean_labels(noisy):
    clean = _digits()
    assert clean.dataset("train").flipped is None
    assert "label_noise" not in clean.info.extra and clean.label_noise_rows() == []
    for split in ("train", "meta", "val", "test"):
        a, b = noisy.dataset(split), clean.dataset(split)
        np.testing.assert_array_equal(a.indices, b.indices)  # noise never changes the splits
        np.testing.assert_array_equal(a.clean_targets, b.targets)
        if split != "train":
            assert a.flipped is None
            np.testing.assert_array_equal(a.targets, b.targets)
            assert [a[i]["targets"] for i in range(20)] == [b[i]["targets"] for i in range(20)]
    # the shared source keeps the clean labels that meta and val read
    train = noisy.dataset("train")
    np.testing.assert_array_equal(train.source.targets[train.indices], clean.dataset("train").targets)


def test_label_noise_rows(noisy):
    train = noisy.dataset("train")
    rows = noisy.label_noise_rows()
    assert len(rows) == len(train)
    assert rows[:3] == [
        (i, int(train.clean_targets[i]), int(train.targets[i]), bool(train.flipped[i])) for i in range(3)
    ]
    assert sum(flip for *_, flip in rows) == noisy.info.extra["label_noise"]["flipped"]
    assert all((clean != label) == flip for _, clean, label, flip in rows)


@pytest.mark.parametrize("kind", KINDS)
def test_the_noise_seed_decides_the_flips(kind):
    first = _digits(kind, seed=5).dataset("train").targets
    np.testing.assert_array_equal(first, _digits(kind, seed=5).dataset("train").targets)
    assert (first != _digits(kind, seed=6).dataset("train").targets).any()
    # seed None is the run seed
    np.testing.assert_array_equal(
        _digits(kind, seed=None, run_seed=0).dataset("train").targets, _digits(kind, seed=0).dataset("train").targets
    )
    assert _digits(kind, seed=None, run_seed=2).info.extra["label_noise"]["seed"] == 2


# ----------------------------------------------------------------------------------------------
# the generators
# ----------------------------------------------------------------------------------------------


def test_symmetric_noise_flips_to_every_other_class_uniformly():
    labels = np.zeros(20000, dtype=np.int64)
    noisy, flipped = symmetric_noise(labels, 5, 0.3, np.random.default_rng(0))
    assert abs(flipped.mean() - 0.3) < 0.02
    assert (noisy[flipped] != 0).all() and (noisy[~flipped] == 0).all()
    counts = np.bincount(noisy[flipped], minlength=5)[1:]
    assert counts.min() > 0.9 * counts.mean()


def test_instance_noise_flip_decision_ignores_the_image_and_the_wrong_class_does_not():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=3000)
    images_a = rng.integers(0, 256, size=(3000, 64)).astype(np.float32)
    images_b = rng.integers(0, 256, size=(3000, 64)).astype(np.float32)
    noisy_a, flipped_a = instance_dependent_noise(images_a, labels, 10, 0.4, np.random.default_rng(1))
    noisy_b, flipped_b = instance_dependent_noise(images_b, labels, 10, 0.4, np.random.default_rng(1))
    np.testing.assert_array_equal(flipped_a, flipped_b)  # whether a label flips: not the image
    assert abs(flipped_a.mean() - 0.4) < 0.03
    assert (noisy_a[flipped_a] != noisy_b[flipped_a]).mean() > 0.5  # which wrong class: the image
    for noisy in (noisy_a, noisy_b):
        assert (noisy[flipped_a] != labels[flipped_a]).all() and (noisy[~flipped_a] == labels[~flipped_a]).all()
    # same image, same seed: same wrong class
    again, _ = instance_dependent_noise(images_a, labels, 10, 0.4, np.random.default_rng(1))
    np.testing.assert_array_equal(again, noisy_a)


def test_instance_noise_sends_one_image_to_one_wrong_class():
    # Xia et al. feed pixels on the 0..255 scale: the projection of one image nearly decides the wrong class
    image = np.random.default_rng(0).integers(0, 256, size=(1, 64)).astype(np.float32)
    images, labels = np.repeat(image, 2000, axis=0), np.full(2000, 3)
    noisy, flipped = instance_dependent_noise(images, labels, 10, 0.5, np.random.default_rng(2))
    assert len(np.unique(noisy[flipped])) == 1 and noisy[flipped][0] != 3


# ----------------------------------------------------------------------------------------------
# configuration errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "noise, message",
    [
        (LabelNoise("instance", 1.0), r"Digits.label_noise.rate is 1.0; it must be a number in \[0, 1\)"),
        (LabelNoise("symmetric", -0.1), r"Digits.label_noise.rate is -0.1; .* e.g. 0.4"),
        (LabelNoise("pairflip", 0.2), r"Digits.label_noise.kind is 'pairflip'; choose 'symmetric' .* or 'instance'"),
        (LabelNoise("instance", 0.2, seed=1.5), r"Digits.label_noise.seed is 1.5; it must be an integer, or null"),
        ({"kind": "instance", "rate": 0.2}, r"Digits.label_noise is \{.*\}; give a LabelNoise"),
    ],
)
def test_bad_label_noise_is_a_config_error(noise, message):
    with pytest.raises(ConfigError, match=message):
        Digits(label_noise=noise).setup(0)


def _image_folder(root, classes: int, per_class: int) -> None:
    """``root/{train,test}/<class>/*.png``: small random RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_instance_noise_on_images_read_from_disk(tmp_path):
    _image_folder(tmp_path, classes=3, per_class=20)
    data = ImageFolderData(str(tmp_path), image_size=8, label_noise=LabelNoise("instance", 0.4, seed=1))
    data.setup(0)
    train = data.dataset("train")
    assert 0 < train.flipped.sum() < len(train)
    assert (train.targets[train.flipped] != train.clean_targets[train.flipped]).all()
    clean = ImageFolderData(str(tmp_path), image_size=8)
    clean.setup(0)
    np.testing.assert_array_equal(data.dataset("meta").targets, clean.dataset("meta").targets)
    np.testing.assert_array_equal(data.dataset("test").targets, clean.dataset("test").targets)


def test_label_noise_needs_two_classes(tmp_path):
    _image_folder(tmp_path, classes=1, per_class=10)
    data = ImageFolderData(str(tmp_path), image_size=8, label_noise=LabelNoise("symmetric", 0.2))
    with pytest.raises(ConfigError, match=r"ImageFolderData.label_noise: the data has 1 class\(es\).*set it to null"):
        data.setup(0)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_fit_with_label_noise_from_yaml(tmp_path, cli_env):
    overlay = tmp_path / "noise.yaml"
    overlay.write_text(
        "task:\n  init_args:\n    data:\n      init_args:\n"
        "        subset: 600\n        label_noise: {kind: instance, rate: 0.4, seed: 3}\n"
    )
    args = digits_args(tmp_path / "runs", "noisy", epochs=1, extra=["--config", str(overlay)])
    workdir = tmp_path / "cwd"  # empty: nothing in cwd can shadow a module
    workdir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "collab_distill", *args], env=cli_env, capture_output=True, text=True, timeout=300,
        cwd=workdir,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    config = (tmp_path / "runs" / "noisy" / "version_0" / "config.yaml").read_text()
    assert "label_noise:\n          kind: instance\n          rate: 0.4\n          seed: 3" in config

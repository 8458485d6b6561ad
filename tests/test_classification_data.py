"""Classification data sets on small real files written in the real on-disk formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from collab_distill.data import SeededSampler
from collab_distill.task import ConfigError
from collab_distill.tasks.classification.data import (
    CIFAR10,
    CIFAR100,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Digits,
    ImageFolderData,
    TinyImageNet,
)

# ----------------------------------------------------------------------------------------------
# fake data in the real formats
# ----------------------------------------------------------------------------------------------


def _pickle(path, obj) -> None:
    # torchvision reads these with ``pickle.load(f, encoding="latin1")`` and indexes them with
    # str keys ("data", "fine_labels", ...): the official files are Python 2 pickles whose str
    # keys load as str. (``encoding="bytes"`` would give the b"data" keys often quoted.) Writing
    # str keys from Python 3 loads identically.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar100(root, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    data = {}
    for name, n in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n).tolist()
        _pickle(
            folder / name,
            {"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": name, "fine_labels": labels,
             "coarse_labels": [y // 5 for y in labels], "data": pixels},
        )
        data[name] = (pixels, labels)
    _pickle(folder / "meta", {"fine_label_names": [f"class{k:02d}" for k in range(100)],
                              "coarse_label_names": [f"super{k}" for k in range(20)]})
    return data


def make_cifar10(root, per_batch=10, n_test=12, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    data = {}
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        _pickle(folder / name, {"batch_label": name, "labels": labels, "data": pixels,
                                "filenames": [f"{i}.png" for i in range(n)]})
        data[name] = (pixels, labels)
    _pickle(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                      "frog", "horse", "ship", "truck"],
                                      "num_cases_per_batch": per_batch, "num_vis": 3072})
    return data


WNIDS = ["n01443537", "n01629819", "n01641577"]


def _image(rng, size=(64, 64)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def make_tiny(root, per_class=4, seed=2):
    """tiny-imagenet-200 with 3 classes; val images are PNG so their pixels can be checked exactly."""
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text(
        "n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
        "n01641577\tbullfrog, Rana catesbeiana\nn99999999\tunused\n"
    )
    for w in WNIDS:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            _image(rng).save(d / f"{w}_{i}.JPEG", format="JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    vd = base / "val" / "images"
    vd.mkdir(parents=True)
    lines, val = [], {}
    for i, w in enumerate([WNIDS[0], WNIDS[2], WNIDS[1], WNIDS[2]]):
        img = _image(rng)
        img.save(vd / f"val_{i}.png")
        lines.append(f"val_{i}.png\t{w}\t0\t0\t63\t63")
        val[f"val_{i}.png"] = (np.asarray(img), WNIDS.index(w))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base, val


def make_folder(root, classes=("cat", "dog", "eel"), n_train=5, n_test=2, seed=3):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                _image(rng, size=(40, 30)).save(d / f"{i}.png")
    (root / "train" / "README.txt").write_text("not a class")


def union_is_partition(data, n_total):
    idx = {s: set(data.dataset(s).indices.tolist()) for s in ("train", "meta", "val")}
    assert not idx["train"] & idx["meta"]
    assert not idx["train"] & idx["val"]
    if data.dataset("val") is not data.dataset("meta"):  # val_fraction=0: val *is* meta
        assert not idx["meta"] & idx["val"]
    assert idx["train"] | idx["meta"] | idx["val"] == set(range(n_total))
    return idx


def denorm(x, mean, std):
    """Undo the normalisation: back to pixels in [0, 1]."""
    return x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    d = Digits()
    info = d.setup(0)
    return d, info


def test_digits_sizes_and_info(digits):
    from sklearn.datasets import load_digits

    d, info = digits
    assert info.num_classes == 10 and d.num_classes == 10
    assert info.in_channels == 1 and d.in_channels == 1
    assert info.image_size == (8, 8) == d.image_size
    assert d.class_names == [str(k) for k in range(10)]
    sizes = d.split_sizes()
    assert sizes == {"train": 1149, "meta": 144, "val": 144, "test": 360}
    assert sum(sizes.values()) == 1797
    union_is_partition(d, 1437)
    # labels across all splits reproduce the data set's class counts
    counts = np.zeros(10, dtype=int)
    for s in ("train", "meta", "val", "test"):
        counts += np.bincount(d.dataset(s).targets, minlength=10)
    assert counts.tolist() == np.bincount(load_digits().target).tolist()
    # the test split is stratified: every class has 20% of its images (+-1) there
    test_counts = np.bincount(d.dataset("test").targets, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * np.bincount(load_digits().target)) <= 1)


def test_digits_eval_pixels_are_real_digits(digits):
    from sklearn.datasets import load_digits

    d, info = digits
    raw = load_digits()
    mean, std = info.extra["mean"], info.extra["std"]
    # normalised with the train split's statistics
    train_x = torch.stack([d.dataset("train")[i]["inputs"] for i in range(0, 1149, 7)])
    assert abs(float(train_x.mean())) < 0.1 and abs(float(train_x.std()) - 1) < 0.1
    assert 0.25 < mean[0] < 0.35 and 0.3 < std[0] < 0.45
    for split in ("meta", "test"):
        sample = d.dataset(split)[5]
        x = sample["inputs"]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32
        assert sample["index"] == 5 and isinstance(sample["targets"], int)
        pixels = (denorm(x, mean, std)[0] * 16).round().numpy()
        matches = np.where(np.all(np.abs(raw.images - pixels) < 1e-3, axis=(1, 2)))[0]
        assert len(matches) >= 1
        assert sample["targets"] in set(raw.target[matches].tolist())


def test_digits_splits_depend_only_on_seed():
    a, b, c = Digits(), Digits(), Digits()
    torch.manual_seed(123)
    np.random.seed(5)
    a.setup(7)
    torch.manual_seed(999)
    np.random.seed(6)
    b.setup(7)
    c.setup(8)
    for s in ("train", "meta", "val", "test"):
        assert np.array_equal(a.dataset(s).indices, b.dataset(s).indices)
    assert not np.array_equal(a.dataset("meta").indices, c.dataset("meta").indices)
    assert set(a.dataset("meta").indices.tolist()) != set(c.dataset("meta").indices.tolist())
    # the test split is fixed by test_seed, not by the run seed (it stands in for an official test set)
    assert np.array_equal(a.dataset("test").targets, c.dataset("test").targets)
    e = Digits(test_seed=None)
    e.setup(8)
    assert sum(e.split_sizes().values()) == 1797


def test_digits_seeded_augmentation(digits):
    d, _ = digits
    train = d.dataset("train")
    x1 = train[(10, 4242)]["inputs"]
    x2 = train[(10, 4242)]["inputs"]
    assert torch.equal(x1, x2)
    others = [train[(10, 4242 + k)]["inputs"] for k in range(1, 8)]
    assert any(not torch.equal(x1, o) for o in others)
    # the augmentation is a translation of at most one pixel: the eval image shifted somewhere
    plain = Digits(augment=False)
    plain.setup(0)
    assert np.array_equal(plain.dataset("train").indices, train.indices)
    base = plain.dataset("train")[10]["inputs"]
    assert torch.equal(plain.dataset("train")[(10, 1)]["inputs"], base)  # augment=False ignores the seed
    # global RNG state is untouched by seeded augmentation
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    train[(3, 77)]
    assert torch.equal(torch.rand(3), expected)


def test_digits_views_and_loader_workers():
    d = Digits(views=3)
    d.setup(0)
    train = d.dataset("train")
    x = train[(4, 1000)]["inputs"]
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    assert not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))
    # view 0 uses the key's seed, so it equals the single-view sample of the same key
    single = Digits()
    single.setup(0)
    assert torch.equal(single.dataset("train")[(4, 1000)]["inputs"], x[0])
    # pixels do not depend on the number of loader workers
    sampler = SeededSampler(len(train), seed=3, batch_size=32)
    b0 = next(iter(DataLoader(train, batch_size=32, sampler=sampler, num_workers=0)))
    b2 = next(iter(DataLoader(train, batch_size=32, sampler=sampler, num_workers=2)))
    assert b0["inputs"].shape == (32, 3, 1, 8, 8)
    assert torch.equal(b0["inputs"], b2["inputs"])
    assert torch.equal(b0["targets"], b2["targets"]) and torch.equal(b0["index"], b2["index"])
    assert torch.equal(b0["index"], torch.tensor([i for i, _ in list(sampler)[:32]]))


def test_digits_subset_and_val_fraction_zero():
    d = Digits(subset=100)
    d.setup(4)
    assert d.split_sizes() == {"train": 80, "meta": 10, "val": 10, "test": 360}
    first = set(torch.randperm(1437, generator=torch.Generator().manual_seed(4))[:100].tolist())
    idx = {s: set(d.dataset(s).indices.tolist()) for s in ("train", "meta", "val")}
    assert idx["train"] | idx["meta"] | idx["val"] == first

    z = Digits(val_fraction=0.0, meta_fraction=0.2)
    z.setup(0)
    assert z.dataset("val") is z.dataset("meta")
    assert z.split_sizes() == {"train": 1150, "meta": 287, "val": 287, "test": 360}
    union_is_partition(z, 1437)


def test_before_setup_and_unknown_split():
    d = Digits()
    with pytest.raises(RuntimeError, match="setup"):
        _ = d.num_classes
    with pytest.raises(RuntimeError, match="setup"):
        d.dataset("train")
    d.setup(0)
    with pytest.raises(ConfigError, match="valid"):
        d.dataset("valid")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"meta_fraction": 0.0}, "meta_fraction"),
        ({"meta_fraction": 1.2}, "meta_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"meta_fraction": 0.5, "val_fraction": 0.5}, "val_fraction"),
        ({"views": 0}, "views"),
        ({"subset": 5000}, "subset"),
        ({"subset": 0}, "subset"),
        ({"subset": 4}, "meta_fraction"),  # 10% of 4 images rounds to an empty meta split
        ({"meta_fraction": 0.6, "val_fraction": 0.3999, "subset": 20}, "empty"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_digits_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Digits(**kwargs).setup(0)


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


def test_cifar100(tmp_path):
    data = make_cifar100(tmp_path)
    d = CIFAR100(str(tmp_path), verify_checksums=False)
    info = d.setup(0)
    assert (info.num_classes, info.in_channels, info.image_size) == (100, 3, (32, 32))
    assert d.class_names[:2] == ["class00", "class01"] and len(d.class_names) == 100
    assert d.split_sizes() == {"train": 48, "meta": 6, "val": 6, "test": 20}
    union_is_partition(d, 60)

    # exact pixels and labels: the pickled rows are R, G, B planes of 32x32
    pixels, labels = data["test"]
    sample = d.dataset("test")[3]
    assert sample["inputs"].shape == (3, 32, 32) and sample["inputs"].dtype == torch.float32
    assert sample["targets"] == labels[3] and sample["index"] == 3
    raw = torch.from_numpy(pixels[3].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(denorm(sample["inputs"], CIFAR_MEAN, CIFAR_STD), raw, atol=1e-5)
    tr_pixels, tr_labels = data["train"]
    meta = d.dataset("meta")
    j = int(meta.indices[2])
    assert meta[2]["targets"] == tr_labels[j]
    assert torch.allclose(
        denorm(meta[2]["inputs"], CIFAR_MEAN, CIFAR_STD),
        torch.from_numpy(tr_pixels[j].reshape(3, 32, 32)).float() / 255,
        atol=1e-5,
    )

    train = d.dataset("train")
    a, b = train[(0, 11)]["inputs"], train[(0, 11)]["inputs"]
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert any(not torch.equal(a, train[(0, 11 + k)]["inputs"]) for k in range(1, 6))
    assert train[(0, 11)]["targets"] == tr_labels[int(train.indices[0])]
    # the augmented image is the original, padded by 4, cropped and maybe flipped
    orig = torch.from_numpy(tr_pixels[int(train.indices[0])].reshape(3, 32, 32)).float() / 255
    aug = denorm(a, CIFAR_MEAN, CIFAR_STD)
    padded = torch.nn.functional.pad(orig, (4, 4, 4, 4))
    found = any(
        torch.allclose(aug, (padded.flip(-1) if f else padded)[:, y : y + 32, x : x + 32], atol=1e-5)
        for f in (0, 1)
        for y in range(9)
        for x in range(9)
    )
    assert found

    again = CIFAR100(str(tmp_path), verify_checksums=False)
    again.setup(0)
    other = CIFAR100(str(tmp_path), verify_checksums=False)
    other.setup(1)
    assert np.array_equal(again.dataset("train").indices, train.indices)
    assert not np.array_equal(other.dataset("train").indices, train.indices)

    v = CIFAR100(str(tmp_path), verify_checksums=False, views=3)
    v.setup(0)
    x = v.dataset("train")[(5, 9)]["inputs"]
    assert x.shape == (3, 3, 32, 32)
    assert not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))

    # picklable, and identical batches with and without workers
    t2 = pickle.loads(pickle.dumps(train))
    assert torch.equal(t2[(7, 3)]["inputs"], train[(7, 3)]["inputs"])
    sampler = SeededSampler(len(train), seed=0, batch_size=16)
    b0 = next(iter(DataLoader(train, batch_size=16, sampler=sampler, num_workers=0)))
    b2 = next(iter(DataLoader(train, batch_size=16, sampler=sampler, num_workers=2)))
    assert torch.equal(b0["inputs"], b2["inputs"]) and b0["inputs"].shape == (16, 3, 32, 32)


def test_cifar100_checksums_and_layout_errors(tmp_path):
    make_cifar100(tmp_path)
    # torchvision checks md5s against the official archive; synthetic files fail that check
    with pytest.raises(ConfigError, match="verify_checksums") as err:
        CIFAR100(str(tmp_path)).setup(0)
    assert "cifar-100-python" in str(err.value) and "root" in str(err.value)

    with pytest.raises(ConfigError, match="root") as err:
        CIFAR100(str(tmp_path / "nope"), verify_checksums=False).setup(0)
    assert "does not exist" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="root") as err:
        CIFAR100(str(empty), verify_checksums=False).setup(0)
    assert "cifar-100-python/{train,test,meta}" in str(err.value)

    with pytest.raises(ConfigError, match="subset") as err:
        CIFAR100(str(tmp_path), verify_checksums=False, subset=61).setup(0)
    assert "only 60 images" in str(err.value)

    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(ConfigError, match="missing test") as err:
        CIFAR100(str(tmp_path), verify_checksums=False).setup(0)
    assert "root" in str(err.value) and "verify_checksums" not in str(err.value)



def test_cifar100_bad_labels(tmp_path):
    make_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{k}" for k in range(50)]}, f)
    with pytest.raises(ConfigError, match="label"):
        CIFAR100(str(tmp_path), verify_checksums=False).setup(0)


def test_cifar10(tmp_path):
    data = make_cifar10(tmp_path)
    d = CIFAR10(str(tmp_path), verify_checksums=False, meta_fraction=0.2, val_fraction=0.0, views=2)
    info = d.setup(3)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, (32, 32))
    assert d.class_names[0] == "airplane" and d.class_names[9] == "truck"
    assert d.split_sizes() == {"train": 40, "meta": 10, "val": 10, "test": 12}
    assert d.dataset("val") is d.dataset("meta")
    union_is_partition(d, 50)
    all_labels = sum((data[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    train = d.dataset("train")
    assert train.targets.tolist() == [all_labels[j] for j in train.indices]
    assert d.dataset("test").targets.tolist() == data["test_batch"][1]
    x = train[(1, 5)]["inputs"]
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x, train[(1, 5)]["inputs"])
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        CIFAR10(str(tmp_path / "cifar-10-batches-py"), verify_checksums=False).setup(0)


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------


def test_tiny_imagenet(tmp_path):
    base, val = make_tiny(tmp_path)
    for root in (tmp_path, base):  # the parent folder or tiny-imagenet-200 itself
        d = TinyImageNet(str(root), meta_fraction=0.25, val_fraction=0.25)
        info = d.setup(0)
        assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, (64, 64))
        assert d.class_names == ["goldfish", "European fire salamander", "bullfrog"]
        assert d.split_sizes() == {"train": 6, "meta": 3, "val": 3, "test": 4}
        union_is_partition(d, 12)
    train = d.dataset("train")
    assert sorted(np.bincount(np.concatenate([d.dataset(s).targets for s in ("train", "meta", "val")]))) == [4, 4, 4]
    # training images are labelled by their folder
    for i in range(len(train)):
        path = str(train.source.paths[train.indices[i]])
        assert WNIDS[train[i]["targets"]] in os.path.basename(path)
    # the official val set is the test split, labelled by val_annotations.txt, exact pixels (PNG)
    test = d.dataset("test")
    for i in range(len(test)):
        s = test[i]
        name = os.path.basename(str(test.source.paths[i]))
        pixels, label = val[name]
        assert s["targets"] == label and s["inputs"].shape == (3, 64, 64)
        raw = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
        assert torch.allclose(denorm(s["inputs"], IMAGENET_MEAN, IMAGENET_STD), raw, atol=1e-5)
    a = train[(2, 50)]["inputs"]
    assert torch.equal(a, train[(2, 50)]["inputs"]) and a.shape == (3, 64, 64)
    assert any(not torch.equal(a, train[(2, 50 + k)]["inputs"]) for k in range(1, 6))
    t2 = pickle.loads(pickle.dumps(train))
    assert torch.equal(t2[(2, 50)]["inputs"], a)


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        TinyImageNet(str(tmp_path / "missing")).setup(0)
    with pytest.raises(ConfigError, match="wnids.txt"):
        TinyImageNet(str(tmp_path)).setup(0)
    base, _ = make_tiny(tmp_path)
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(ConfigError, match="val_annotations.txt") as err:
        TinyImageNet(str(tmp_path)).setup(0)
    assert "TinyImageNet.root" in str(err.value)
    (base / "val" / "val_annotations.txt").write_text("val_0.png\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="not in wnids.txt"):
        TinyImageNet(str(tmp_path)).setup(0)
    (base / "val" / "val_annotations.txt").write_text("val_0.png\tn01443537\t0\t0\t1\t1\n")
    (base / "wnids.txt").write_text("\n".join(WNIDS + ["n02000000"]) + "\n")
    with pytest.raises(ConfigError, match="n02000000"):
        TinyImageNet(str(tmp_path)).setup(0)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    make_folder(tmp_path)
    d = ImageFolderData(str(tmp_path), image_size=16, meta_fraction=0.2, val_fraction=0.2)
    info = d.setup(0)
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, (16, 16))
    assert d.class_names == ["cat", "dog", "eel"]
    assert d.split_sizes() == {"train": 9, "meta": 3, "val": 3, "test": 6}
    union_is_partition(d, 15)
    assert d.dataset("test").targets.tolist() == [0, 0, 1, 1, 2, 2]
    s = d.dataset("test")[2]
    assert s["inputs"].shape == (3, 16, 16) and s["inputs"].dtype == torch.float32 and s["targets"] == 1
    # resized from 40x30 to 16x16 with PIL's bilinear filter, then normalised
    img = Image.open(tmp_path / "test" / "dog" / "0.png").convert("RGB").resize((16, 16), Image.BILINEAR)
    raw = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    assert torch.allclose(denorm(s["inputs"], IMAGENET_MEAN, IMAGENET_STD), raw, atol=1e-5)
    train = d.dataset("train")
    a = train[(0, 8)]["inputs"]
    assert torch.equal(a, train[(0, 8)]["inputs"]) and a.shape == (3, 16, 16)
    assert any(not torch.equal(a, train[(0, 8 + k)]["inputs"]) for k in range(1, 6))
    v = ImageFolderData(str(tmp_path), image_size=16, views=3)
    v.setup(0)
    x = v.dataset("train")[(0, 8)]["inputs"]
    assert x.shape == (3, 3, 16, 16) and not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        ImageFolderData(str(tmp_path / "missing")).setup(0)
    make_folder(tmp_path)
    with pytest.raises(ConfigError, match="test_dir") as err:
        ImageFolderData(str(tmp_path), test_dir="val").setup(0)
    assert "<class>" in str(err.value)
    with pytest.raises(ConfigError, match="train_dir"):
        ImageFolderData(str(tmp_path), train_dir="training").setup(0)
    with pytest.raises(ConfigError, match="image_size"):
        ImageFolderData(str(tmp_path), image_size=0).setup(0)
    (tmp_path / "test" / "fox").mkdir()
    with pytest.raises(ConfigError, match="test_dir") as err:
        ImageFolderData(str(tmp_path)).setup(0)
    assert "fox" in str(err.value)
    (tmp_path / "test" / "fox").rmdir()
    (tmp_path / "train" / "gnu").mkdir()
    (tmp_path / "test" / "gnu").mkdir()
    with pytest.raises(ConfigError, match="train_dir") as err:
        ImageFolderData(str(tmp_path)).setup(0)
    assert "gnu" in str(err.value) and "no images" in str(err.value)


def test_configurable_by_class_path(tmp_path):
    from jsonargparse import ArgumentParser

    from collab_distill.tasks.classification.data import ClassificationData

    make_folder(tmp_path)
    parser = ArgumentParser()
    parser.add_argument("--data", type=ClassificationData)
    cfg = parser.parse_string(
        "data:\n"
        "  class_path: collab_distill.tasks.classification.data.ImageFolderData\n"
        f"  init_args: {{root: '{tmp_path}', image_size: 8, views: 2, eval_batch_size: 7}}\n"
    )
    data = parser.instantiate(cfg).data
    assert isinstance(data, ImageFolderData)
    assert (data.views, data.batch_size, data.eval_batch_size) == (2, 64, 7)
    assert data.setup(0).image_size == (8, 8)
    assert data.dataset("train")[(0, 1)]["inputs"].shape == (2, 3, 8, 8)

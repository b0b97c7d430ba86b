"""Extraction: one forward pass per batch over all requested layers → a code store on disk."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
import torch

from .codes import STATS, layer_code, normalize_stats, _check_com
from .errors import StoreError
from .device import resolve_device
from .models import NormalizedModel, ProbedModel, check_input_size, parse_layers
from .run import Run
from .store import CodeStore, StoreWriter

__all__ = ["extract", "extract_images", "TensorImages"]


class TensorImages:
    """In-memory images (e.g. attacked ones) behind the dataset contract of ``somprobe.data``.

    Parameters
    ----------
    images : Tensor or ndarray [N, 3, S, S]
        Pixels in [0, 1].
    labels : array of int [N]
    ids : sequence of str [N]
    name, split : str
    """

    def __init__(self, images, labels, ids: Sequence[str], *, name: str = "images", split: str = "images"):
        self._x = torch.as_tensor(images)
        if self._x.ndim != 4:
            raise StoreError(f"images must be [N, C, S, S], got shape {tuple(self._x.shape)}")
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.ids = [str(i) for i in ids]
        if not (len(self._x) == len(self.labels) == len(self.ids)):
            raise StoreError(f"{len(self._x)} images, {len(self.labels)} labels and {len(self.ids)} ids: "
                             "give one label and one id per image")
        self.name = name
        self.split = split
        self.image_size = int(self._x.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices, image_size: int | None = None) -> torch.Tensor:
        x = self._x[torch.as_tensor(np.asarray(indices, dtype=np.int64))].float()
        if image_size is not None and int(image_size) != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(int(image_size),) * 2, mode="bilinear",
                                                align_corners=False, antialias=True).clamp_(0, 1)
        return x


def _check_finite(name: str, t: torch.Tensor, ids: Sequence[str]) -> None:
    if bool(torch.isfinite(t).all()):
        return
    bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
    shown = ", ".join(repr(ids[i]) for i in bad[:5])
    raise StoreError(f"non-finite activations in layer {name} for sample id(s) {shown}"
                     f"{' …' if len(bad) > 5 else ''} ({len(bad)} in this batch); check the model "
                     "weights (--checkpoint) and the input images of these samples")


def _rows_completed(path) -> int:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        return 0
    try:
        with open(mpath) as f:
            return int(json.load(f).get("rows_completed", 0))
    except (OSError, ValueError):
        return 0  # StoreWriter reports the corrupt manifest properly


def extract(model: NormalizedModel, dataset, indices=None, *, layers: str | Sequence[str] = "all",
            out, stats: str | Sequence[str] = STATS, com: str = "flat", batch_size: int = 64,
            device: str | torch.device = "auto", split: str | None = None, seed: int | None = 0,
            image_size: int | None = None, per_class: int | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = False, meta: Mapping | None = None) -> CodeStore:
    """Extract the vector codes of ``layers`` for ``dataset[indices]`` into a code store.

    One forward pass per batch serves every layer (:class:`~somprobe.models.ProbedModel`);
    conv feature maps become vector codes (:func:`~somprobe.codes.layer_code`), CLS tokens are
    stored raw. Runs under ``torch.inference_mode`` on ``device``.

    Parameters
    ----------
    model : NormalizedModel
        Pixels in [0, 1] → logits (``somprobe.models.build_model``).
    dataset : object
        ``.images(indices, image_size)`` → float [B, 3, S, S] in [0, 1], ``.labels``, ``.ids``,
        ``.name``, ``.split`` (``somprobe.data.load_dataset``).
    indices : array of int, optional
        Positions to extract, in row order; default all samples.
    layers : str or sequence of str
        e.g. ``"CL1-CL4"``, ``["CLS1", "module:layer1.0"]``; ``"all"`` = every named probe.
    out : path or Run
        The store directory; given a :class:`~somprobe.run.Run`, ``run.codes_dir(split)``.
    stats : sequence of str
        Per-channel statistics (subset of max, mean, std, com; canonical order).
    com : {"flat", "rc"}
        Centre of mass as one number per channel or as (row, column).
    batch_size : int
    device : str
        ``"auto"`` picks CUDA when present.
    split : str, optional
        Split name recorded in the manifest (and the directory name when ``out`` is a Run);
        default ``dataset.split``.
    seed : int, optional
        The seed of the sample draw, recorded in the manifest.
    image_size : int, optional
        Input side; default ``model.image_size``.
    per_class : int, optional
        Recorded in the manifest (how ``indices`` were drawn).
    resume, overwrite : bool
        Continue an incomplete store with the same parameters / replace an existing store.
    progress : bool
        tqdm bar over batches.
    meta : mapping, optional
        Extra manifest entries (JSON-serialisable); part of the resume check.

    Returns
    -------
    CodeStore

    Raises
    ------
    StoreError
        Non-finite activations (names layer and sample id), an existing store without
        ``resume``/``overwrite``, mismatched parameters on resume.
    ModelError
        Unknown layers (lists the valid ones).
    """
    stats = normalize_stats(stats)
    _check_com(com)
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    layer_list = parse_layers(layers, model)
    split = split if split is not None else str(getattr(dataset, "split", "data"))
    path = Run(out.root).codes_dir(split) if isinstance(out, Run) else out
    idx = np.arange(len(dataset.labels)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(idx)
    all_ids = list(dataset.ids)
    ids = [str(all_ids[i]) for i in idx]
    labels = np.asarray(dataset.labels, dtype=np.int64)[idx]
    size = int(image_size or getattr(model, "image_size", None) or getattr(dataset, "image_size", 224))
    dev = resolve_device(device)
    model = model.to(dev).eval()
    check_input_size(model, size)
    probe = ProbedModel(model, layer_list)

    params = {
        "model": getattr(model, "name", type(model).__name__),
        "checkpoint": getattr(model, "checkpoint", None),
        "checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
        "pretrained": bool(getattr(model, "pretrained", False)),
        "init_seed": getattr(model, "init_seed", None),
        "stats": list(stats),
        "com": com,
        "dataset": str(getattr(dataset, "name", "")),
        "dataset_split": str(getattr(dataset, "split", "")),
        "split": split,
        "per_class": per_class,
        "seed": seed,
        "image_size": size,
        "mean": [float(v) for v in model.mean.flatten()] if isinstance(model, NormalizedModel) else None,
        "std": [float(v) for v in model.std.flatten()] if isinstance(model, NormalizedModel) else None,
    }
    if meta:
        params.update(dict(meta))

    def run_batch(start: int):
        sl = idx[start:start + batch_size]
        x = dataset.images(sl, size).to(dev, dtype=torch.float32)
        batch_ids = ids[start:start + len(sl)]
        logits, acts = probe(x)
        codes = {}
        # probed layers before the logits, so the error names a layer where the problem shows first
        for name in layer_list:
            _check_finite(name, acts[name], batch_ids)
            codes[name] = layer_code(acts[name], stats, com).float().cpu().numpy()
        _check_finite("logits", logits, batch_ids)
        return codes, logits.argmax(dim=1).cpu().numpy()

    writer = None
    with torch.inference_mode():
        # the store needs each layer's width before the first write, so the first batch runs first
        first_start = min(_rows_completed(path), max(n - 1, 0)) if resume and not overwrite else 0
        if n == 0:
            raise StoreError(f"no samples to extract into {path}: the index list is empty; "
                             "check --per-class and the split")
        codes, preds = run_batch(first_start)
        dims = {k: int(v.shape[1]) for k, v in codes.items()}
        writer = StoreWriter(path, layers_dims=dims, n_rows=n, manifest=params, ids=ids,
                             resume=resume, overwrite=overwrite)
        starts = list(range(writer.rows_done, n, batch_size))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=writer.rows_done, unit="img", desc=f"extract {split}")
        try:
            for start in starts:
                if start != first_start:
                    codes, preds = run_batch(start)
                else:
                    # the first batch was computed above (its size may differ on resume)
                    codes = {k: v[: min(batch_size, n - start)] for k, v in codes.items()}
                    preds = preds[: min(batch_size, n - start)]
                b = len(preds)
                writer.write(start, codes, labels[start:start + b], preds)
                if bar is not None:
                    bar.update(b)
        finally:
            if bar is not None:
                bar.close()
    return writer.close()


def extract_images(model: NormalizedModel, images, labels, ids: Sequence[str], *,
                   layers: str | Sequence[str] = "all", out, split: str = "images",
                   dataset_name: str = "images", **kwargs) -> CodeStore:
    """Extract codes of in-memory images (e.g. adversarial or noisy ones) into a code store.

    Parameters
    ----------
    model : NormalizedModel
    images : Tensor or ndarray [N, 3, S, S]
        Pixels in [0, 1], already at the model's input size (kept at S unless
        ``image_size`` is passed).
    labels : array of int [N]
    ids : sequence of str [N]
        Sample ids (use the clean split's ids so rows pair up).
    layers, out, split
        As in :func:`extract`.
    dataset_name : str
        Recorded in the manifest.
    **kwargs
        Any other keyword of :func:`extract` (stats, com, batch_size, device, resume,
        overwrite, progress, meta, image_size, seed).

    Returns
    -------
    CodeStore
    """
    data = TensorImages(images, labels, ids, name=dataset_name, split=split)
    kwargs.setdefault("image_size", data.image_size)
    kwargs.setdefault("seed", None)
    return extract(model, data, None, layers=layers, out=out, split=split, **kwargs)

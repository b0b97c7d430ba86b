"""The run-level convexity test behind ``somprobe convexity`` (study 002).

Files written in ``run.paths_dir(name)`` (each atomically; ``convexity.json`` last)::

    convexity.csv           one row per combination: space, k, class, pred, in_class, p_class
    convexity_summary.csv   one row per space × k: n, share_in_class, mean_p_class
    convexity.json          parameters, pool counts, the summary rows
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..device import resolve_device
from ..errors import PathError
from ..run import Run, atomic_write_json, save_csv
from .convexity import DEFAULT_KS, convexity_summary, convexity_test
from .spaces import encode_images, make_space

__all__ = ["convexity_run", "CONVEXITY_COLUMNS", "CONVEXITY_SUMMARY_COLUMNS"]

CONVEXITY_COLUMNS = ["space", "k", "class", "pred", "in_class", "p_class"]
CONVEXITY_SUMMARY_COLUMNS = ["space", "k", "n", "share_in_class", "mean_p_class"]


def _predict(model, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)]).cpu().numpy()


def convexity_run(
    run,
    *,
    model: torch.nn.Module,
    dataset,
    indices=None,
    name: str = "convexity",
    spaces: Sequence[str] = ("input",),
    ks: Sequence[int] = DEFAULT_KS,
    trials: int = 100,
    per_class: int = 50,
    alpha: float = 1.0,
    seed: int = 0,
    chunk: int = 1024,
    device="auto",
    overwrite: bool = False,
) -> dict:
    """Share of random convex combinations of k same-class inputs that keep the class.

    Parameters
    ----------
    run : Run or path
    model : nn.Module
        Classifier on pixels in [0, 1]; put in eval mode here.
    dataset : ImageDataset
    indices : array of int, optional
        Pool of positions in ``dataset`` (default all); ``per_class`` correctly classified
        samples per class are drawn from it (seeded).
    name : str
        Folder under ``paths/``.
    spaces : sequence of str
        ``input`` and/or layers (the combinations are taken of the latents there).
    ks, trials, alpha, seed
        Of :func:`~somprobe.paths.convexity.convexity_test`.
    per_class : int
        Samples per class in the pool (the model's correct predictions only).
    chunk : int
        Points per forward pass.
    device : str
    overwrite : bool
        Replace an earlier test of the same name.

    Returns
    -------
    dict
        The summary written to ``convexity.json``.
    """
    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run(run)
    out = run.paths_dir(name)
    if (out / "convexity.json").is_file() and not overwrite:
        raise PathError(f"a convexity test {name!r} already exists in {run.root}; pass --overwrite "
                        "to replace it or choose another --name")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 2:
        raise PathError(f"per_class must be an integer >= 2, got {per_class!r}")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    space_objs = [make_space(model, s) for s in dict.fromkeys(spaces)]
    size = getattr(model, "image_size", None) or getattr(dataset, "image_size", None)
    pool = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    labels = np.asarray(dataset.labels, dtype=np.int64)[pool]
    rng = np.random.default_rng(seed)
    # A seeded shuffle, then at most 3 × per_class candidates per class are predicted.
    order = rng.permutation(len(pool))
    rank = pd.Series(labels[order]).groupby(labels[order]).cumcount().to_numpy()
    cand = np.sort(order[rank < 3 * per_class])
    images = dataset.images(pool[cand], size).to(dev)
    preds = _predict(model, images)
    ok = (preds == labels[cand]) | (labels[cand] < 0)
    keep = np.flatnonzero(ok)
    keep = keep[pd.Series(preds[keep]).groupby(preds[keep]).cumcount().to_numpy() < per_class]
    images, preds = images[torch.as_tensor(keep, device=dev)], preds[keep]
    if len(keep) == 0:
        raise PathError("the model classifies none of the pool correctly; check the model and dataset")

    rows, summaries = [], []
    for space in space_objs:
        z = encode_images(space, images, chunk=min(chunk, 256))
        res = convexity_test(space, z, preds, ks=ks, trials=trials, alpha=alpha, seed=seed, chunk=chunk)
        rows.append(pd.DataFrame({"space": space.name, **res}))
        summaries.append(pd.DataFrame({"space": space.name, **convexity_summary(res)}))
    table = pd.concat(rows, ignore_index=True)[CONVEXITY_COLUMNS]
    summary_t = pd.concat(summaries, ignore_index=True)[CONVEXITY_SUMMARY_COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "convexity.json").unlink(missing_ok=True)
    save_csv(out / "convexity.csv", table)
    save_csv(out / "convexity_summary.csv", summary_t)
    counts = np.bincount(preds, minlength=int(preds.max()) + 1)
    summary = {
        "name": name, "spaces": [s.name for s in space_objs], "ks": [int(k) for k in ks],
        "trials": int(trials), "alpha": float(alpha), "seed": int(seed), "per_class": int(per_class),
        "pool": int(len(keep)), "pool_per_class": {int(c): int(n) for c, n in enumerate(counts) if n},
        "device": str(dev), "seconds": time.perf_counter() - t0,
        "summary": summary_t.to_dict(orient="records"),
    }
    atomic_write_json(out / "convexity.json", summary)
    return summary

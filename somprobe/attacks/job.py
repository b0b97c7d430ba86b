"""The run-level attack job behind ``somprobe attack``.

Attacks (or adds noise to) the images of a clean split, saves the perturbed pixels in
``run.attack_dir(name)`` and, optionally, extracts a code store for them as split ``name`` with
the same ids, in the same order, as the clean split, so clean and perturbed codes pair up row for
row.

Files written (each atomically; ``summary.json`` last, so its presence means the attack finished)::

    attacks/<name>/images.npy        float32 [N, 3, S, S] perturbed pixels in [0, 1]
    attacks/<name>/ids.json          sample ids, the clean split's order
    attacks/<name>/labels.npy        int64 [N] labels the attack used (dataset or predicted)
    attacks/<name>/clean_preds.npy   int64 [N] predictions on the clean images
    attacks/<name>/preds.npy         int64 [N] predictions on the perturbed images
    attacks/<name>/targets.npy       int64 [N] target classes (targeted attacks only)
    attacks/<name>/summary.json      parameters, accuracies, success rates, timings
    analysis/attacks.csv             one row per attack name (replaced when re-run)
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from . import core as _attacks
from .bim import bim as _bim
from .cw import cw_l2 as _cw_l2
from .deepfool import deepfool as _deepfool
from .. import distributed as dist
from ..device import resolve_device
from ..errors import AttackError, DistributedError, StoreError
from ..run import Run, atomic_output, atomic_write_json, save_csv, save_npy

__all__ = ["attack_run", "ATTACKS", "default_name", "source_ids", "ATTACKS_TABLE_COLUMNS"]

ATTACKS = ("pgd", "fgsm", "noise", "bim", "deepfool", "cw")
# Attacks without an eps budget (minimal-L2 attacks): their eps is None in the summary.
UNBOUNDED = ("deepfool", "cw")
ATTACKS_TABLE_COLUMNS = [
    "name", "attack", "norm", "eps", "steps", "n", "clean_acc", "perturbed_acc", "success_rate",
    "success_rate_correct", "labels", "backend", "seed",
]


def default_name(attack: str) -> str:
    """Split/attack name used when none is given: ``adv-<attack>``, or ``noise``."""
    return "noise" if attack == "noise" else f"adv-{attack}"


def _source_store(run: Run, split: str):
    """The complete clean code store ``split`` of ``run`` (its ids, layers and parameters)."""
    from ..store import open_store

    return open_store(run.codes_dir(split))


def source_ids(run: Run, split: str) -> list[str]:
    """Sample ids of the clean code store ``split`` of ``run``, in row order."""
    return _source_store(run, split).ids


def _indices_for_ids(dataset, ids: list[str], split: str) -> np.ndarray:
    import pandas as pd

    index = pd.Index(dataset.ids)
    if not index.is_unique:
        raise AttackError(f"dataset {getattr(dataset, 'name', '')!r} has duplicate sample ids; "
                          "ids must identify samples uniquely")
    idx = index.get_indexer(ids)
    missing = [ids[i] for i in np.flatnonzero(idx < 0)[:5]]
    if missing:
        raise AttackError(
            f"{int((idx < 0).sum())} ids of split {split!r} are not in dataset "
            f"{getattr(dataset, 'name', '')!r}/{getattr(dataset, 'split', '')!r} (e.g. {missing}): "
            f"pass the dataset the split was extracted from"
        )
    return idx.astype(np.int64)


@contextlib.contextmanager
def _local_default_rng(seed: int, device: torch.device):
    # advertorch draws its random start from torch's default generator; seeding a forked copy
    # makes both backends draw the same start while leaving the caller's global state unchanged.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _shared_output(path, shape):
    """A float32 ``.npy`` of ``shape`` to fill row by row; it replaces ``path`` only when complete.

    One process: a temporary sibling (:func:`~somprobe.run.atomic_output`). Under torchrun
    rank 0 creates ``.<name>.partial`` next to ``path``, every rank maps it and writes its own
    rows, and rank 0 renames it once every rank reported success (a failing rank's error reaches
    all of them; nothing incomplete is ever named ``path``).
    """
    ranks = dist.context()
    if not ranks.distributed:
        with atomic_output(path) as tmp:
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            yield images
            images.flush()
            del images
        return
    tmp = path.with_name(f".{path.name}.partial")

    def create():
        del_me = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        del del_me

    dist.on_main(create, "creating the image file")
    images, err = None, None
    try:
        images = np.load(tmp, mmap_mode="r+")
    except OSError as e:
        err = f"cannot open {tmp} that rank 0 created ({e}): --out must be on a shared filesystem"
    dist.agree(err, what="opening the shared image file")
    try:
        yield images
    except Exception as e:
        try:  # the other ranks wait in the check below: tell them
            dist.agree(f"{type(e).__name__}: {e}", what="the attack")
        except DistributedError:
            pass
        raise
    images.flush()
    del images
    dist.agree(None, what="the attack")
    dist.on_main(lambda: os.replace(tmp, path), "saving the images")


def _batch_seed(seed: int, batch: int) -> int:
    """Seed of the random draws (PGD start, noise) of global batch ``batch``.

    Keyed by the batch's position, not by the order batches run in, so ranks of a torchrun job
    that attack disjoint batches draw what one process draws. The first batch uses ``seed``
    itself: a job of one batch draws exactly what ``torch.manual_seed(seed)`` and then
    advertorch (or :func:`~somprobe.attacks.pgd`) draw.
    """
    if batch == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) % 2**63, int(batch)]).generate_state(1, np.uint64)
    return int(state[0] % np.uint64(2**63))


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def attack_run(
    run,
    *,
    model: torch.nn.Module,
    dataset,
    indices=None,
    source_split: str = "som-val",
    name: str | None = None,
    attack: str = "pgd",
    eps: float = 4 / 255,
    steps: int = 50,
    step_size: float | None = None,
    norm: str = "linf",
    targeted: bool = False,
    symmetric: bool = False,
    labels: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    device="auto",
    backend: str = "builtin",
    overshoot: float = 0.02,
    kappa: float = 0.0,
    initial_const: float = 0.1,
    binary_search_steps: int = 5,
    extract: bool = True,
    layers=None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Perturb a clean split of a run, save the images, report accuracy, extract their codes.

    Parameters
    ----------
    run : Run or path
        The run directory.
    model : nn.Module
        Classifier on pixels in [0, 1] (``NormalizedModel``); moved to ``device``.
    dataset : ImageDataset
        Dataset holding the clean samples (``.ids``, ``.labels``, ``.images(idx, size)``).
    indices : array of int, optional
        Positions in ``dataset`` to perturb. Default: the samples of the clean code store
        ``source_split``, in its row order (so perturbed stores match it id for id).
    source_split : str
        Clean split whose ids are used when ``indices`` is None (default ``som-val``).
    name : str, optional
        Attack and split name; default ``adv-pgd`` / ``adv-fgsm`` / ``noise``.
    attack : {"pgd", "fgsm", "noise", "bim", "deepfool", "cw"}
        BIM (:func:`somprobe.attacks.bim`, Linf, ``steps`` steps of ``step_size`` — default
        1/255), DeepFool (:func:`somprobe.attacks.deepfool`, ``steps`` = max iterations) and
        Carlini–Wagner L2 (:func:`somprobe.attacks.cw_l2`, ``steps`` Adam iterations per
        binary-search step) beside
        PGD (see :func:`somprobe.attacks.pgd`), FGSM, or the uniform-noise control.
    eps, steps, step_size, norm, targeted, backend
        Attack parameters (see :func:`somprobe.attacks.pgd`); ``steps``/``step_size``/``norm``
        apply to PGD only (FGSM is one Linf step; noise is Linf-bounded).
    symmetric : bool
        Noise in [-eps, eps] instead of the paper's [0, eps].
    labels : {"auto", "dataset", "predictions"} or None
        Labels the attack moves away from. ``auto``: the dataset's labels, or the model's clean
        predictions when the dataset has none (negative labels); ``None`` = ``predictions``.
        The summary says which were used.
    seed : int
        Seeds the random start (both backends draw the same start from it), the noise and the
        targets of a targeted attack.
    batch_size : int
        Images attacked at once.
    device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    extract : bool
        Also extract a code store for the perturbed images as split ``name``
        (:func:`somprobe.extract.extract_images`).
    layers : list of str, optional
        Layers to extract; default the clean split's layers.
    overwrite : bool
        Replace an existing attack of the same name.
    progress : bool
        Show a tqdm bar over batches.

    Returns
    -------
    dict
        The summary also written to ``summary.json``. Accuracies are fractions; ``success_rate``
        is, untargeted, the fraction of samples whose perturbed prediction differs from the label
        (targeted: equals the target) and ``success_rate_correct`` the same among the samples the
        model classified correctly before the perturbation.
    """
    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run(run)
    if attack not in ATTACKS:
        raise AttackError(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)}")
    labels = "predictions" if labels is None else labels
    if labels not in ("auto", "dataset", "predictions"):
        raise AttackError(f"labels must be 'auto', 'dataset' or 'predictions', got {labels!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttackError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AttackError(f"seed must be an integer, got {seed!r}")
    if targeted and attack == "noise":
        raise AttackError("the noise control cannot be targeted; drop targeted=True")
    name = default_name(attack) if name is None else name
    out_dir = run.attack_dir(name)
    if (out_dir / "summary.json").exists() and not overwrite:
        raise AttackError(f"attack {name!r} already exists in {run.root}; pass overwrite=True "
                          f"(--overwrite) to replace it or choose another name")
    # Validate everything before touching the run.
    if attack == "pgd":
        norm, eps, steps, step_size = _attacks.check_pgd_params(
            eps=eps, steps=steps, step_size=step_size, norm=norm, backend=backend)
    elif attack == "bim":
        eps = _attacks.check_eps(eps)
        step_size = min(1.0 / 255.0, eps) if step_size is None else step_size
        norm, eps, steps, step_size = _attacks.check_pgd_params(
            eps=eps, steps=steps, step_size=step_size, norm="linf")
    elif attack in UNBOUNDED:
        norm, eps, step_size = "l2", None, None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise AttackError(f"steps must be an integer >= 1, got {steps!r}")
        if attack == "deepfool":
            _attacks._check_number("overshoot", overshoot, low=0.0, low_open=False)
        else:
            _attacks._check_number("kappa", kappa, low=0.0, low_open=False)
            _attacks._check_number("initial_const", initial_const, low=0.0)
            if isinstance(binary_search_steps, bool) or not isinstance(binary_search_steps, int) \
                    or binary_search_steps < 1:
                raise AttackError(f"binary_search_steps must be an integer >= 1, got {binary_search_steps!r}")
    else:
        eps = _attacks.check_eps(eps)
        norm, steps, step_size = "linf", (1 if attack == "fgsm" else 0), None
    if backend not in _attacks.BACKENDS:
        raise AttackError(f"unknown backend {backend!r}; use one of {', '.join(_attacks.BACKENDS)}")
    if backend == "advertorch" and attack == "pgd":
        _attacks.import_advertorch_attacks()  # fail before any work, with the clear message

    # Which samples: explicit positions, or the clean split's ids in its row order.
    source = None
    if indices is None:
        source = _source_store(run, source_split)
        ids = source.ids
        idx = _indices_for_ids(dataset, ids, source_split)
    else:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= len(dataset):
            raise AttackError(f"indices must be non-empty positions in 0..{len(dataset) - 1}")
        ids = [dataset.ids[i] for i in idx]
        source_split = None
    n = len(idx)
    true = np.asarray(dataset.labels, dtype=np.int64)[idx]
    num_classes = getattr(dataset, "num_classes", None) or _attacks._num_classes(model)
    missing_labels = bool((true < 0).any())
    if labels == "dataset" and missing_labels:
        raise AttackError(f"{int((true < 0).sum())} samples have no label (negative); use "
                          f"labels='predictions' (--labels predictions) to attack the predictions")
    use_preds = labels == "predictions" or (labels == "auto" and missing_labels)
    if not use_preds and num_classes is not None and true.max() >= num_classes:
        raise AttackError(f"labels reach {int(true.max())} but there are {num_classes} classes: "
                          f"the model and dataset do not match")

    dev = resolve_device(device)
    model = model.to(dev)
    # The clean store's input size, so clean and perturbed codes see the same pixels.
    size = (source.manifest.get("image_size") if source is not None else None) or \
        getattr(model, "image_size", None) or getattr(dataset, "image_size", None)
    x0 = dataset.images(idx[:1], size)
    shape = (n, *x0.shape[1:])

    targets = None
    if targeted:
        if num_classes is None or num_classes < 2:
            raise AttackError("a targeted attack needs the number of classes (>= 2) from the "
                              "dataset or the model")
        rng = np.random.default_rng(seed)
        # A uniformly drawn class other than the label (or prediction, filled in per batch).
        offsets = rng.integers(1, num_classes, size=n)

    ranks = dist.context()

    def clear_old():
        out_dir.mkdir(parents=True, exist_ok=True)
        # summary.json marks a finished attack: drop the old one first so a crash mid-way cannot
        # leave new images under an old summary.
        for stale in ("summary.json", "targets.npy", "converged.npy", "iterations.npy"):
            (out_dir / stale).unlink(missing_ok=True)

    dist.on_main(clear_old, "clearing the old attack")
    used = np.empty(n, dtype=np.int64)
    clean_pred = np.empty(n, dtype=np.int64)
    pert_pred = np.empty(n, dtype=np.int64)
    if targeted:
        targets = np.empty(n, dtype=np.int64)
    linf = np.empty(n, dtype=np.float64)
    l2 = np.empty(n, dtype=np.float64)
    # DeepFool: crossed within its iterations / steps taken; CW: a successful image was found.
    converged = np.ones(n, dtype=bool)
    iterations = np.full(n, int(steps), dtype=np.int64)
    # Under torchrun each rank attacks its own run of whole global batches (batch-aligned, so
    # each batch and its seed are what one process would use) into a shared memory-mapped file.
    mine = dist.batch_shard(n, batch_size, ranks.rank, ranks.world_size)
    starts = range(mine.start, mine.stop, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"attack {name}", unit="batch")
    with _shared_output(out_dir / "images.npy", shape) as images:
        for s in starts:
            sl = slice(s, min(s + batch_size, n))
            x = dataset.images(idx[sl], size).to(dev)
            cp = _attacks.predict_labels(model, x)
            y_lab = cp if use_preds else torch.as_tensor(true[sl], device=dev)
            y = y_lab
            if targeted:
                y = (y_lab + torch.as_tensor(offsets[sl], device=dev)) % num_classes
                targets[sl] = y.cpu().numpy()
            bseed = _batch_seed(seed, s // batch_size)
            if attack == "pgd":
                with _local_default_rng(bseed, dev):
                    xp = _attacks.pgd(model, x, y, eps=eps, steps=steps, step_size=step_size,
                                      norm=norm, targeted=targeted, backend=backend)
            elif attack == "fgsm":
                xp = _attacks.fgsm(model, x, y, eps=eps, targeted=targeted)
            elif attack == "bim":
                xp = _bim(model, x, y, eps=eps, steps=steps, step_size=step_size,
                                  targeted=targeted)
            elif attack == "deepfool":
                res = (_deepfool(model, x, target=y, max_iter=steps, overshoot=overshoot)
                       if targeted else
                       _deepfool(model, x, y, max_iter=steps, overshoot=overshoot))
                xp = res.images
                converged[sl] = res.converged.cpu().numpy()
                iterations[sl] = res.iterations.cpu().numpy()
            elif attack == "cw":
                res = _cw_l2(model, x, y, targeted=targeted, kappa=kappa, steps=steps,
                                     initial_const=initial_const,
                                     binary_search_steps=binary_search_steps)
                xp = res.images
                converged[sl] = res.success.cpu().numpy()
            else:
                xp = _attacks.uniform_noise(x, eps=eps, symmetric=symmetric, seed=bseed)
            pp = _attacks.predict_labels(model, xp)
            d = (xp - x).flatten(1).double()
            linf[sl] = d.abs().amax(1).cpu().numpy()
            l2[sl] = d.norm(dim=1).cpu().numpy()
            used[sl] = y_lab.cpu().numpy()
            clean_pred[sl] = cp.cpu().numpy()
            pert_pred[sl] = pp.cpu().numpy()
            images[sl] = xp.detach().to("cpu", torch.float32).numpy()

    if ranks.distributed:
        # every rank gets every rank's rows of the small per-sample arrays
        rows = (mine.start, mine.stop)
        parts = dist.all_gather_object((rows, used[slice(*rows)], clean_pred[slice(*rows)],
                                        pert_pred[slice(*rows)], linf[slice(*rows)], l2[slice(*rows)],
                                        None if targets is None else targets[slice(*rows)],
                                        converged[slice(*rows)], iterations[slice(*rows)]))
        for (a, b), u, c, p, li, l2_, t, cv, it in parts:
            used[a:b], clean_pred[a:b], pert_pred[a:b], linf[a:b], l2[a:b] = u, c, p, li, l2_
            converged[a:b], iterations[a:b] = cv, it
            if targets is not None:
                targets[a:b] = t

    def save_arrays():
        for fname, arr in (("labels.npy", used), ("clean_preds.npy", clean_pred), ("preds.npy", pert_pred)) \
                + ((("targets.npy", targets),) if targeted else ()) \
                + ((("converged.npy", converged), ("iterations.npy", iterations))
                   if attack in UNBOUNDED else ()):
            save_npy(out_dir / fname, arr)
        atomic_write_json(out_dir / "ids.json", ids)

    dist.on_main(save_arrays, "saving the attack")

    # Accuracy is against the dataset labels; with predicted labels there is no accuracy, and
    # success means the prediction changed.
    correct = clean_pred == used
    if targeted:
        success = pert_pred == targets
    else:
        success = pert_pred != used
    summary = {
        "name": name,
        "attack": attack,
        "norm": norm,
        "eps": None if eps is None else float(eps),
        "steps": int(steps),
        "step_size": None if step_size is None else float(step_size),
        "targeted": bool(targeted),
        "symmetric": bool(symmetric) if attack == "noise" else None,
        "rand_init": attack == "pgd",
        "overshoot": float(overshoot) if attack == "deepfool" else None,
        "kappa": float(kappa) if attack == "cw" else None,
        "binary_search_steps": int(binary_search_steps) if attack == "cw" else None,
        "converged_rate": _rate(converged) if attack in UNBOUNDED else None,
        "converged_note": ("DeepFool samples that did not cross within `steps` iterations are kept "
                           "where the last step left them (converged.npy)" if attack == "deepfool" else
                           "CW samples without a successful image keep the clean image "
                           "(converged.npy)" if attack == "cw" else None),
        "backend": backend if attack == "pgd" else "builtin",
        "seed": int(seed),
        "n": int(n),
        "source_split": source_split,
        "labels": "model predictions" if use_preds else "dataset",
        "labels_note": (
            ("the dataset has no labels for these samples; " if missing_labels else "")
            + "the attack used the model's clean predictions as labels, so accuracies are not "
              "defined and success means the prediction changed") if use_preds else None,
        "clean_acc": None if use_preds else _rate(correct),
        "perturbed_acc": None if use_preds else _rate(pert_pred == used),
        "success_rate": _rate(success),
        "success_rate_correct": _rate(success[correct]),
        "n_clean_correct": int(correct.sum()),
        "changed_rate": _rate(pert_pred != clean_pred),
        "success_definition": (
            "targeted: perturbed prediction == target" if targeted else
            "untargeted: perturbed prediction != label; success_rate over all samples, "
            "success_rate_correct over the samples classified correctly before"),
        "linf_max": float(linf.max()),
        "l2_mean": float(l2.mean()),
        "image_shape": list(shape[1:]),
        "device": str(dev),
        "torch": torch.__version__,
        "attack_seconds": time.perf_counter() - t0,
        "split": None,
    }

    if extract:
        summary["split"] = name
        summary["layers"] = _extract(run, model, out_dir, ids, true,
                                     name=name, layers=layers, source=source,
                                     dataset_name=str(getattr(dataset, "name", "images")),
                                     batch_size=batch_size, device=dev, overwrite=overwrite,
                                     progress=progress, meta={"attack": {k: summary[k] for k in (
                                         "name", "attack", "norm", "eps", "steps", "seed")}})
    summary["seconds"] = time.perf_counter() - t0

    def finish():
        _append_table(run, summary)
        atomic_write_json(out_dir / "summary.json", summary)

    dist.on_main(finish, "writing the attack summary")
    return summary


def _extract(run, model, out_dir, ids, labels, *, name, layers, source, dataset_name, batch_size,
             device, overwrite, progress, meta):
    from ..extract import extract_images

    # Same layers and code definition as the clean split, so the two stores pair up column for
    # column as well as row for row.
    kwargs = {}
    if source is not None:
        layers = source.layers if layers is None else layers
        for key in ("stats", "com"):
            if source.manifest.get(key) is not None:
                kwargs[key] = source.manifest[key]
        dataset_name = source.manifest.get("dataset") or dataset_name
    layers = "all" if layers is None else layers
    images = np.load(out_dir / "images.npy")
    store = extract_images(model, images, labels, ids, layers=layers, out=run.codes_dir(name),
                           split=name, dataset_name=dataset_name, batch_size=batch_size,
                           device=device, overwrite=overwrite, progress=progress, meta=meta,
                           **kwargs)
    if store.ids != list(ids):
        raise StoreError(f"the code store written for {name!r} has ids that differ from the clean "
                         f"split's; re-run with overwrite=True (--overwrite)")
    return store.layers


def _append_table(run: Run, summary: dict) -> None:
    import pandas as pd

    row = {c: summary.get(c) for c in ATTACKS_TABLE_COLUMNS}
    path = run.table("attacks")
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=ATTACKS_TABLE_COLUMNS)
    if "name" in table:
        table = table[table["name"] != summary["name"]]
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True) if len(table) else \
        pd.DataFrame([row], columns=ATTACKS_TABLE_COLUMNS)
    save_csv(path, table)

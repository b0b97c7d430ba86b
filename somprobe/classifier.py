"""Train a timm classifier on a named dataset when no pretrained weights can be had.

``train_classifier`` writes into a run directory (:class:`somprobe.run.Run`):

``model/checkpoint.pt``
    the timm network's ``state_dict`` (tensors only, no pickled code; loadable with
    ``torch.load(..., weights_only=True)`` and ``timm.create_model(name, num_classes=K)``);
``model/meta.json``
    model name, classes, input size, normalisation, per-epoch validation accuracy, seed, timing …;
``model/train_state.pt``
    optimizer/scheduler state after the last finished epoch, so an interrupted run continues with
    ``resume=True`` (``somprobe train ... --resume``). Shuffling and augmentation of epoch ``e`` are
    seeded by ``(seed, e)``, so a resumed run draws the same batches as an uninterrupted one.

``load_trained`` rebuilds the model (pixels in [0, 1], mean/std inside) from those two files.
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageDataset, load_dataset
from .errors import ModelError
from .models import build_model, check_input_size, resolve_device
from .run import Run, atomic_output, atomic_write_json

__all__ = ["train_classifier", "load_trained", "evaluate", "default_epochs", "default_image_size",
           "TRAIN_DEFAULTS"]

# Measured on the 2-core CI machine (see BENCHMARKS.md / benchmarks/train_accuracy.py).
TRAIN_DEFAULTS = dict(model_name="resnet18", batch_size=128, lr=0.05, weight_decay=5e-4,
                      augment=True)


def default_epochs(n_train: int) -> int:
    """Epochs used when none are given: 8 for small training sets (≤ 10,000), else 4.

    Both reach the accuracy targets (mnist5k ≥ 95 %, fashion-mnist ≥ 88 %) on CPU in minutes.
    """
    return 8 if n_train <= 10_000 else 4


def default_image_size(native_size: int | None) -> int:
    """Input side used when none is given: 32 px for small (≤ 32 px) images, else native/224.

    timm's resnet18 downsamples 32× overall, so 28×28 digits are upsampled to 32 px; this keeps
    training on CPU fast at the price of a 1×1 CL4 map (64 px gives 2×2 but trains ~6× slower;
    see BENCHMARKS.md).
    """
    if native_size is None:
        return 224
    return 32 if native_size <= 32 else int(native_size)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def one_cycle(step: int, *, total: int, pct_start: float = 0.25, div: float = 25.0,
              final_div: float = 1e4) -> float:
    """Learning-rate factor of the one-cycle schedule (cosine warm-up, cosine decay).

    Same curve as ``torch.optim.lr_scheduler.OneCycleLR`` (peak 1, start ``1/div``, end
    ``1/(div*final_div)``), but defined for any number of steps: torch's divides by zero when the
    warm-up is shorter than one step, which tiny runs hit.
    """
    def anneal(a, b, pct):
        return b + (a - b) / 2.0 * (1.0 + math.cos(math.pi * min(max(pct, 0.0), 1.0)))

    warm = pct_start * total - 1
    if warm > 0 and step <= warm:
        return anneal(1.0 / div, 1.0, step / warm)
    warm = max(warm, 0.0)
    return anneal(1.0, 1.0 / (div * final_div), (step - warm) / max(total - 1 - warm, 1.0))


def _random_crop(x: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (zero padding), one gather for the batch."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.from_numpy(rng.integers(0, 2 * pad + 1, size=b))
    dx = torch.from_numpy(rng.integers(0, 2 * pad + 1, size=b))
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, *, indices=None, image_size: int | None = None,
             batch_size: int = 256, device="cpu", progress: bool = False) -> tuple[float, np.ndarray]:
    """Accuracy of ``model`` on ``dataset`` (optionally at ``indices``).

    Returns
    -------
    (float, np.ndarray)
        Accuracy in [0, 1] and the int64 predictions.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    was_training = model.training
    model.eval()
    preds = []
    starts = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="validate", leave=False)
    for s in starts:
        b = idx[s:s + batch_size]
        x = dataset.images(b, image_size).to(device)
        preds.append(model(x).argmax(1).cpu())
    model.train(was_training)
    pred = torch.cat(preds).numpy().astype(np.int64) if preds else np.zeros(0, np.int64)
    return float((pred == dataset.labels[idx]).mean()) if len(idx) else float("nan"), pred


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def _save_state_dict(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def train_classifier(model_name: str = TRAIN_DEFAULTS["model_name"], dataset="mnist5k", *, out,
                     epochs: int | None = None,
                     batch_size: int = TRAIN_DEFAULTS["batch_size"],
                     lr: float = TRAIN_DEFAULTS["lr"],
                     weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
                     image_size: int | None = None, augment: bool = TRAIN_DEFAULTS["augment"],
                     seed: int = 0, device="auto", root=None, train_split: str = "train",
                     val_split: str = "val", max_train: int | None = None,
                     max_val: int | None = None, allow_download: bool = False,
                     resume: bool = False, overwrite: bool = False,
                     progress: bool = False) -> dict:
    """Train a randomly initialised timm classifier and save it into a run directory.

    SGD (momentum 0.9, Nesterov) with a one-cycle learning-rate schedule, cross-entropy, optional
    random-shift augmentation (±S/16 px, zero padding); validation accuracy after every epoch. The
    model sees pixels in [0, 1]; the dataset's mean/std are applied inside the wrapper and saved in
    the metadata.

    Parameters
    ----------
    model_name : str
        timm model name (``resnet18``, ``test_resnet`` …).
    dataset : str or path
        Anything :func:`somprobe.data.load_dataset` accepts; its ``train_split`` is trained on and
        its ``val_split`` validated on (the held-out 20 % for one-split datasets).
    out : Run or path
        Run directory; the model goes to ``run.checkpoint`` and ``run.model_meta``.
    epochs : int, optional
        Default :func:`default_epochs` of the training-set size.
    batch_size, lr, weight_decay : hyperparameters
        ``lr`` is the one-cycle peak.
    image_size : int, optional
        Input side; default :func:`default_image_size` of the dataset's native size.
    augment : bool
        Random shifts of up to S/16 pixels during training (±2 px at 32 px; ±4 px
        underfitted fashion-mnist in 3 epochs: 88.5 % validation).
    seed : int
        Seeds initialisation, shuffling and augmentation (global RNG state untouched).
    device : str
        ``auto``, ``cpu``, ``cuda`` …
    root : path, optional
        Local copy of the dataset (``--data-root``).
    allow_download : bool
        Let torchvision download a missing dataset (``--download``).
    max_train, max_val : int, optional
        Use a seeded random subset of this many samples (quick runs, tests).
    resume : bool
        Continue an interrupted run from its last finished epoch (nothing to do if complete).
    overwrite : bool
        Replace an existing trained model in ``out``.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    dict
        The metadata written to ``meta.json``.
    """
    run = out if isinstance(out, Run) else Run(out)
    if (epochs is not None and epochs < 1) or batch_size < 1 or not lr > 0:
        raise ModelError(f"epochs ({epochs}), batch_size ({batch_size}) and lr ({lr}) must be "
                         "positive")
    state_path = run.model_dir / "train_state.pt"
    old_meta = json.loads(run.model_meta.read_text()) if run.model_meta.is_file() else None
    if old_meta is not None and not (resume or overwrite):
        done = "a trained" if old_meta.get("complete") else "a partly trained"
        raise ModelError(f"{run.model_dir} already holds {done} model; pass overwrite=True "
                         "(--overwrite) to replace it or resume=True (--resume) to continue it")
    if resume and old_meta is not None and old_meta.get("complete") and not overwrite:
        return old_meta

    dev = resolve_device(device)
    train_ds = load_dataset(dataset, split=train_split, root=root, allow_download=allow_download)
    val_ds = load_dataset(dataset, split=val_split, root=root)
    if epochs is None:
        epochs = default_epochs(len(train_ds))
    size = int(image_size) if image_size is not None else default_image_size(train_ds.native_size)
    tr_idx = _subset(len(train_ds), max_train, seed)
    va_idx = _subset(len(val_ds), max_val, seed + 1)
    num_classes = train_ds.num_classes

    model = build_model(model_name, num_classes=num_classes, image_size=size, mean=train_ds.mean,
                        std=train_ds.std, seed=seed, device=dev)
    check_input_size(model, size)
    net = model.net
    steps_per_epoch = math.ceil(len(tr_idx) / batch_size)
    # No weight decay on BatchNorm/bias parameters, the usual choice for ResNets.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(one_cycle, total=epochs * steps_per_epoch))

    meta = {
        "model": model_name, "num_classes": num_classes, "classes": train_ds.classes,
        "image_size": size, "mean": list(train_ds.mean), "std": list(train_ds.std),
        "dataset": str(dataset), "train_split": train_ds.split, "val_split": val_ds.split,
        "train_size": int(len(tr_idx)), "val_size": int(len(va_idx)), "seed": seed,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "augment": augment, "optimizer": "sgd-nesterov-onecycle", "device": str(dev),
        "val_accuracy": [], "train_loss": [], "epoch_seconds": [], "epochs_done": 0,
        "time_seconds": 0.0, "complete": False, "torch": torch.__version__,
        # image folders: files left out as unreadable (the same list from both splits of a
        # one-split folder)
        "skipped_files": sorted(set(train_ds.skipped_files) | set(val_ds.skipped_files)),
    }
    start_epoch = 0
    if resume and old_meta is not None and state_path.is_file():
        st = torch.load(state_path, map_location=dev, weights_only=True)
        for k in ("model", "num_classes", "image_size", "epochs", "batch_size", "seed",
                  "train_size"):
            if old_meta.get(k) != meta[k]:
                raise ModelError(f"cannot resume {run.model_dir}: it was trained with {k}="
                                 f"{old_meta.get(k)!r}, now {meta[k]!r}; use the same settings "
                                 "or overwrite=True")
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch = int(st["epoch"])
        for k in ("val_accuracy", "train_loss", "epoch_seconds", "epochs_done", "time_seconds"):
            meta[k] = old_meta[k]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=(epochs - start_epoch) * steps_per_epoch, desc=f"train {model_name}")
    pad = max(1, size // 16)
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        order = tr_idx[rng.permutation(len(tr_idx))]
        model.train()
        total, n_seen = 0.0, 0
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            x = train_ds.images(b, size)
            if augment:
                x = _random_crop(x, pad, rng)
            x = x.to(dev)
            y = torch.from_numpy(train_ds.labels[b]).to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
            n_seen += len(b)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        acc, _ = evaluate(model, val_ds, indices=va_idx, image_size=size, device=dev)
        dt = time.perf_counter() - t0
        meta["val_accuracy"].append(round(acc, 6))
        meta["train_loss"].append(round(total / max(n_seen, 1), 6))
        meta["epoch_seconds"].append(round(dt, 3))
        meta["epochs_done"] = epoch + 1
        meta["time_seconds"] = round(meta["time_seconds"] + dt, 3)
        meta["complete"] = epoch + 1 == epochs
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, val_acc=f"{acc:.4f}")
        # Weights first, then the training state, then meta: meta.json never points at weights
        # that are not there yet.
        run.model_dir.mkdir(parents=True, exist_ok=True)
        _save_state_dict(run.checkpoint, {k: v.detach().cpu() for k, v in net.state_dict().items()})
        if meta["complete"]:
            state_path.unlink(missing_ok=True)
        else:
            _save_state_dict(state_path, {"net": net.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(), "epoch": epoch + 1})
        atomic_write_json(run.model_meta, meta)
    if bar is not None:
        bar.close()
    meta["final_val_accuracy"] = meta["val_accuracy"][-1]
    atomic_write_json(run.model_meta, meta)
    return meta


def load_trained(run_or_checkpoint, *, device="cpu") -> nn.Module:
    """Rebuild a model saved by :func:`train_classifier`.

    Parameters
    ----------
    run_or_checkpoint : Run or path
        A run directory, its ``model/`` folder, or the ``checkpoint.pt`` (``meta.json`` must sit
        next to it).
    device : str
        Where to put the model (``auto`` picks CUDA when present).

    Returns
    -------
    nn.Module
        Normalising wrapper in eval mode: pixels in [0, 1] → logits; ``.net`` is the timm model,
        ``.mean``/``.std``/``.image_size``/``.num_classes``/``.name`` as trained.
    """
    p = run_or_checkpoint.root if isinstance(run_or_checkpoint, Run) else Path(run_or_checkpoint)
    if p.is_dir():
        ckpt = p / "checkpoint.pt" if (p / "checkpoint.pt").is_file() else Run(p).checkpoint
    else:
        ckpt = p
    meta_p = ckpt.with_name("meta.json")
    if not ckpt.is_file() or not meta_p.is_file():
        raise ModelError(f"no trained model at {p} (need checkpoint.pt and meta.json); train one "
                         "with `somprobe train --out RUN`")
    meta = json.loads(meta_p.read_text())
    if not meta.get("model"):
        raise ModelError(f"{meta_p} names no model; retrain with `somprobe train`")
    # build_model reads meta.json beside the checkpoint (num_classes, mean, std, image_size).
    model = build_model(meta["model"], checkpoint=ckpt, device=device)
    model.meta = meta
    return model

"""Extraction: one forward pass per batch over all requested layers → a code store on disk."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
import torch

from .codes import STATS, layer_code, normalize_stats, _check_com
from . import distributed as dist
from .errors import DistributedError, SomprobeError, StoreError
from .device import resolve_device
from .models import NormalizedModel, ProbedModel, check_input_size, parse_layers
from .run import Run, _json_default
from .store import (_VOLATILE, CodeStore, StoreWriter, _ids_digest, done_intervals, progress_files,
                    read_progress)

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


def _finished_store(path, params: Mapping, layers: Sequence[str], ids: Sequence[str]) -> CodeStore | None:
    """The complete store at ``path`` when it holds exactly this extraction, else None.

    Lets ``resume`` pass over a store that is already finished (``--split both`` killed while
    writing the second store) instead of refusing it; a complete store made with other
    parameters is refused like an incomplete one would be.
    """
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None  # no store yet, or a corrupt manifest that StoreWriter reports
    if not old.get("complete"):
        return None
    want = dict(params, layers=list(layers), n_rows=len(ids), ids_sha256=_ids_digest(ids))
    want = json.loads(json.dumps(want, default=_json_default))
    diffs = [k for k in sorted(want) if k not in _VOLATILE and old.get(k) != want[k]]
    if old.get("dtype", "float32") != want.get("dtype", "float32") and "dtype" not in diffs:
        diffs.append("dtype")  # absent means float32 (issue 12), so compare it both ways
    if diffs:
        detail = "; ".join(f"{k}: stored {old.get(k)!r} vs now {want.get(k)!r}" for k in diffs[:5])
        raise StoreError(f"cannot resume {path}: it holds a complete code store made with other "
                         f"parameters ({detail}); run with the same parameters or pass --overwrite")
    return CodeStore(path)


def extract(model: NormalizedModel, dataset, indices=None, *, layers: str | Sequence[str] = "all",
            out, stats: str | Sequence[str] = STATS, com: str = "flat", batch_size: int = 64,
            device: str | torch.device = "auto", split: str | None = None, seed: int | None = 0,
            image_size: int | None = None, per_class: int | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = False, meta: Mapping | None = None,
            dtype: str = "float32") -> CodeStore:
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
        Continue an incomplete store with the same parameters (a complete one made with them is
        returned as it is) / replace an existing store.
    progress : bool
        tqdm bar over batches.
    meta : mapping, optional
        Extra manifest entries (JSON-serialisable); part of the resume check.
    dtype : {"float32", "float16"}
        Storage of the codes: float16 halves the disk (readers get float32 back; see README
        "Scaling" for what it changes in the maps). Codes beyond ±65504 are refused.

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
    if dtype != "float32":  # absent = float32, so stores made before the option still resume
        params["dtype"] = str(dtype)
    if resume and not overwrite:
        done = _finished_store(path, params, layer_list, ids)
        if done is not None:
            return done

    def run_batch(start: int, stop: int):
        sl = idx[start:stop]
        x = dataset.images(sl, size).to(dev, dtype=torch.float32)
        batch_ids = ids[start:stop]
        logits, acts = probe(x)
        codes = {}
        # probed layers before the logits, so the error names a layer where the problem shows first
        for name in layer_list:
            _check_finite(name, acts[name], batch_ids)
            codes[name] = layer_code(acts[name], stats, com).float().cpu().numpy()
        _check_finite("logits", logits, batch_ids)
        return codes, logits.argmax(dim=1).cpu().numpy()

    if n == 0:
        raise StoreError(f"no samples to extract into {path}: the index list is empty; "
                         "check --per-class and the split")
    with torch.inference_mode():
        return _fill_store(path, run_batch, n=n, batch_size=batch_size, ids=ids, labels=labels,
                           params=params, resume=resume, overwrite=overwrite, progress=progress,
                           desc=f"extract {split}")


# ---------------------------------------------------------------------------------------------
# Filling a store, in one process or sharded over the ranks of a torchrun job (issue 12)
# ---------------------------------------------------------------------------------------------
def _pieces(mine: range, batch_size: int, done) -> list[tuple[int, int]]:
    """The global batches (rows ``k·batch_size …``) inside ``mine`` minus the ``done`` intervals,
    as contiguous ``(start, stop)`` pieces in row order."""
    if len(mine) == 0:
        return []
    todo = np.ones(len(mine), dtype=bool)
    for a, b in done:
        lo, hi = max(int(a), mine.start), min(int(b), mine.stop)
        if hi > lo:
            todo[lo - mine.start:hi - mine.start] = False
    out = []
    first = mine.start - mine.start % batch_size
    for s in range(first, mine.stop, batch_size):
        lo, hi = max(s, mine.start), min(s + batch_size, mine.stop)
        edges = np.flatnonzero(np.diff(np.r_[False, todo[lo - mine.start:hi - mine.start], False]))
        out += [(lo + int(a), lo + int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return out


def _unfinished_ranks(path, world_size: int) -> str:
    try:
        recs = read_progress(path)
    except StoreError:
        return "unknown (progress records unreadable)"
    gone = []
    for r in range(world_size):
        rec = recs.get(r)
        if rec is None:
            gone.append(f"rank {r} (no progress record)")
        elif rec.get("status") != "done":
            why = f": {rec['error']}" if rec.get("error") else ""
            gone.append(f"rank {r} ({rec.get('status')}, last progress {rec.get('updated')}{why})")
    return ", ".join(gone) or "none"


def _fill_store(path, run_batch, *, n, batch_size, ids, labels, params, resume, overwrite,
                progress, desc) -> CodeStore:
    """Run ``run_batch(start, stop) → (codes, preds)`` over this rank's rows and write them.

    One process: rows in order, the manifest records progress after every batch (as before
    issue 12). Several ranks: rank 0 creates (or checks) the store, each rank writes the global
    batches of its :func:`~somprobe.distributed.batch_shard` not yet done and records them in
    its progress file; rank 0 marks the store complete after every rank reported done.
    """
    ctx = dist.context()
    cont = resume and not overwrite
    mine = dist.batch_shard(n, batch_size, ctx.rank, ctx.world_size)
    first = {}

    def first_batch():
        # the store needs each layer's width before the first write, so a first batch runs
        # before it is created; every rank runs its own now, at the same time as rank 0
        todo = _pieces(mine, batch_size, done_intervals(path) if cont else [])
        piece = todo[0] if todo else ((0, 1) if ctx.is_main else None)
        if piece is not None:
            first[piece] = run_batch(*piece)
        return piece

    def create():
        codes = first[first_batch()][0]
        return StoreWriter(path, layers_dims={k: int(v.shape[1]) for k, v in codes.items()},
                           n_rows=n, manifest=params, ids=ids, resume=resume, overwrite=overwrite)

    err = None
    if ctx.distributed and not ctx.is_main:
        try:
            first_batch()
        except SomprobeError as e:
            err = str(e)
    writer = dist.on_main(create, "creating the code store")
    if ctx.distributed:
        if not ctx.is_main and err is None:
            try:
                writer = StoreWriter.attach(path, manifest=params, ids=ids)
            except SomprobeError as e:
                err = str(e)
        dist.agree(err, what="opening the code store")
    sharded = ctx.distributed or bool(progress_files(path))
    todo = _pieces(mine, batch_size, done_intervals(path) if cont else [])
    mine_done = list(read_progress(path).get(ctx.rank, {}).get("done", [])) if sharded else []
    info = {"world_size": ctx.world_size, "batch_size": batch_size, "shard": [mine.start, mine.stop]}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        left = sum(b - a for a, b in todo)
        bar = tqdm(total=len(mine), initial=len(mine) - left, unit="img",
                   desc=desc + (f" (rank {ctx.rank} of {ctx.world_size})" if ctx.distributed else ""))
    try:
        if sharded:
            writer.record_progress(ctx.rank, mine_done, **info)
        for piece in todo:
            codes, preds = first.pop(piece) if piece in first else run_batch(*piece)
            s, e = piece
            if sharded:
                writer.put_rows(s, codes, labels[s:e], preds)
                mine_done.append([s, e])
                writer.record_progress(ctx.rank, mine_done, **info)
            else:
                writer.write(s, codes, labels[s:e], preds)
            if bar is not None:
                bar.update(e - s)
    except Exception as e:
        if sharded:
            try:
                writer.record_progress(ctx.rank, mine_done, status="failed",
                                       error=f"{type(e).__name__}: {e}"[:500], **info)
            except OSError:
                pass
        if ctx.distributed:
            try:  # the other ranks are waiting in the final check below: tell them
                dist.agree(f"{type(e).__name__}: {e}", what="extraction")
            except DistributedError:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
    if not sharded:
        return writer.close()
    writer.record_progress(ctx.rank, mine_done, status="done", **info)
    try:
        dist.agree(None, what=f"extraction into {path}")
    except DistributedError as e:
        raise DistributedError(f"{e}. Unfinished: {_unfinished_ranks(path, ctx.world_size)}. The "
                               f"store {path} stays incomplete: fix the cause and re-run the same "
                               "command with --resume") from None
    store = dist.on_main(writer.finish_sharded, "finishing the code store")
    return store if store is not None else CodeStore(path)


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

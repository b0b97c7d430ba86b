"""The run-level job behind ``somprobe connect``: pairs → spaces → methods → tables.

Methods are looked up in :data:`METHODS` by their ``--method`` name; a new path method
registers itself there with the keyword options it takes from the job and any extra columns it
adds to ``paths.csv``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import pairs as _pairs
from ..device import resolve_device
from ..errors import PathError
from ..run import Run, atomic_output, atomic_write_json, save_csv
from .core import PathBatch, check_paths, path_profile, resample
from .spaces import encode_images, make_space
from .linear import find_linear
from .neb import check_neb_params, find_neb
from .noise_sources import NOISE_SOURCES, draw_noise_pairs
from .barrier import BARRIER_EXTRAS, check_barrier_params, find_barrier
from .regions import REGION_EXTRAS, check_region_params, find_region_path

__all__ = ["MethodSpec", "METHODS", "register_method", "PATHS_COLUMNS", "TABLE1_COLUMNS",
           "connect_run", "connectivity_table", "method_summary"]

#: Common columns of ``paths.csv`` (method-specific extras follow them).
PATHS_COLUMNS = [
    "pair", "id_a", "id_b", "class", "space", "method", "linear_ok", "path_ok", "max_loss",
    "length_ratio", "iterations", "seconds", "failed", "reason",
]


@dataclass(frozen=True)
class MethodSpec:
    """A path method as the job sees it.

    Attributes
    ----------
    fn : callable
        ``fn(space, a, b, target, *, <options>, generator=None, progress=False) -> PathBatch``.
    options : dict
        Keyword options the method takes, mapped to their defaults; the job passes the value
        the user gave (``connect_run(..., options={...})`` / CLI flags) or this default.
    extras : tuple of str
        Extra per-pair ``stats`` columns copied into ``paths.csv``.
    check : bool
        Re-check the returned path densely with :func:`~somprobe.paths.core.check_paths`
        (the job then takes ``path_ok``, ``max_loss`` and ``length_ratio`` from the check).
    description : str
        One line for ``--help``.
    """

    fn: Callable
    options: dict = field(default_factory=dict)
    extras: tuple = ()
    check: bool = True
    description: str = ""
    #: ``validate(**options)`` raising :class:`PathError` on a bad option, called before any work
    #: so a bad option never leaves a half-written experiment (None: the method checks itself).
    validate: Callable | None = None


#: ``--method`` name → method.
METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, spec: MethodSpec) -> None:
    """Make ``spec`` available as ``--method name`` (replaces a method of the same name)."""
    METHODS[name] = spec


register_method("linear", MethodSpec(
    find_linear, options={"points": 100}, check=False,
    description="straight line, checked at --points points (linearly connectable)"))
register_method("neb", MethodSpec(
    find_neb, options={"pivots": 10, "steps": 100, "spring": math.inf, "optimizer": "adam",
                       "lr": 0.01, "tol": 0.1, "points": 100},
    extras=("converged", "pivot_max_loss"), check=False, validate=check_neb_params,
    description="nudged elastic band from the straight line (study 001), checked densely"))


# barrier bypass (study 000) and region paths (study 002), issue 10 ---------------------------
# Option names that other methods also use (lr, points, steps ...) get a prefix here, so that
# `--lr` of NEB never changes the barrier's Adam step.
def _barrier(space, a, b, target, *, barrier_lr=0.01, barrier_points=33, **kw):
    return find_barrier(space, a, b, target, lr=barrier_lr, points_per_segment=barrier_points, **kw)


def _regions(space, a, b, target, *, region_depth=10, **kw):
    return find_region_path(space, a, b, target, max_depth=region_depth, **kw)


def _check_barrier(*, barrier_lr=0.01, barrier_points=33, **kw):
    check_barrier_params(lr=barrier_lr, points_per_segment=barrier_points, **kw)


def _check_regions(*, region_depth=10, **kw):
    check_region_params(max_depth=region_depth, **kw)


register_method("barrier", MethodSpec(
    _barrier, options={"delta": 1e-3, "iters": 256, "barrier_lr": 0.01, "lambda_l2": 1.0,
                       "lambda_hf": 0.05, "hf": "tv", "max_depth": 5, "ends": "optimise",
                       "end_tol": 0.1, "barrier_points": 33},
    extras=BARRIER_EXTRAS, check=True, validate=_check_barrier,
    description="barrier bypass (study 000): Adam on the highest-loss point, recursively, until "
                "every barrier gap < delta"))
register_method("regions", MethodSpec(
    _regions, options={"spacing": 1e-4, "margin": 0.1, "overshoot": 0.02, "proj_steps": 50,
                       "region_depth": 10, "recurse": "both", "projection": "leading"},
    extras=REGION_EXTRAS, check=True, validate=_check_regions,
    description="region path (study 002, Algorithm 1): midpoints projected into the class by "
                "targeted DeepFool, checked at spacing*|a-b|"))


# --------------------------------------------------------------------------- the run job
#: Columns of ``table1.csv`` (study 001's Table 1, one row per space).
TABLE1_COLUMNS = ["space", "pairs", "linear", "nonlinear_only", "no_path", "failed", "methods"]


def connectivity_table(paths: pd.DataFrame) -> pd.DataFrame:
    """Study 001's Table 1 from ``paths.csv``: per space, how many pairs are linearly
    connectable, connected only by a non-linear path, or not connected at all.

    A pair counts as connected non-linearly when any method other than ``linear`` found a path
    (``path_ok``). Without such a method ``nonlinear_only`` and ``no_path`` are empty (not
    known). ``failed`` counts pairs some method recorded as failed (they count as no path unless
    another method found one).
    """
    rows = []
    for space, g in paths.groupby("space", sort=False):
        per_pair = g.groupby("pair", sort=False)
        lin = per_pair["linear_ok"].agg(lambda s: bool(s.astype(bool).any()))
        other = g[g["method"] != "linear"]
        methods = ",".join(dict.fromkeys(g["method"]))
        row = {"space": space, "pairs": int(len(lin)), "linear": int(lin.sum()),
               "failed": int(per_pair["failed"].agg(lambda s: bool(s.astype(bool).any())).sum()),
               "methods": methods}
        if len(other):
            found = other.groupby("pair")["path_ok"].agg(lambda s: bool(s.astype(bool).any()))
            found = found.reindex(lin.index, fill_value=False)
            row["nonlinear_only"] = int((~lin & found).sum())
            row["no_path"] = int((~lin & ~found).sum())
        else:
            row["nonlinear_only"] = row["no_path"] = None
        rows.append(row)
    out = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    # Counts stay integers next to the empty cells of linear-only spaces.
    for col in ("pairs", "linear", "nonlinear_only", "no_path", "failed"):
        out[col] = out[col].astype("Int64")
    return out


def method_summary(paths: pd.DataFrame) -> pd.DataFrame:
    """Per space × method: pairs, paths found, linearly connectable, failed, iterations, length
    ratio and seconds per pair (``paths_summary.csv``)."""
    g = paths.assign(path_ok=paths["path_ok"].astype(bool), linear_ok=paths["linear_ok"].astype(bool),
                     failed=paths["failed"].astype(bool)).groupby(["space", "method"], sort=False)
    out = g.agg(pairs=("pair", "size"), path_ok=("path_ok", "sum"), linear_ok=("linear_ok", "sum"),
                failed=("failed", "sum"), iterations_mean=("iterations", "mean"),
                length_ratio_median=("length_ratio", "median"), max_loss_median=("max_loss", "median"),
                seconds_per_pair=("seconds", "mean"))
    return out.reset_index()


def _predict(model, dataset, positions, size, device, batch_size=256) -> np.ndarray:
    from ..attacks.core import predict_labels

    out = np.empty(len(positions), dtype=np.int64)
    for s in range(0, len(positions), batch_size):
        x = dataset.images(positions[s:s + batch_size], size).to(device)
        out[s:s + batch_size] = predict_labels(model, x).cpu().numpy()
    return out


def _attack_arrays(run: Run, attack: str):
    d = run.attack_dir(attack)
    root = d.parent
    names = sorted(p.name for p in root.glob("*") if (p / "summary.json").is_file()) if root.is_dir() else []
    if not (d / "summary.json").is_file() or not (d / "images.npy").is_file():
        raise PathError(f"no perturbed images of attack {attack!r} in {run.root} (attacks there: "
                        f"{', '.join(names) or 'none'}); run `somprobe attack --out {run.root} "
                        f"--name {attack}` first")
    ids = json.loads((d / "ids.json").read_text())
    return (ids, np.load(d / "labels.npy"), np.load(d / "preds.npy"),
            np.load(d / "images.npy", mmap_mode="r"))


def _draw_pairs(run, model, dataset, pool, *, pair_source, n_pairs, seed, max_pool, size, device):
    """Pairs as a table (pair, id_a, id_b, class, source, a, b) plus counts and image loaders."""
    ids = np.asarray(dataset.ids, dtype=object)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    src = str(pair_source)
    if src == "same-class":
        order = np.random.default_rng(seed).permutation(len(pool))[:max_pool]
        sub = pool[np.sort(order)]
        preds = _predict(model, dataset, sub, size, device)
        df, counts = _pairs.same_class_pairs(labels[sub], preds, n_pairs=n_pairs, seed=seed)
        pa, pb = sub[df["a"].to_numpy()], sub[df["b"].to_numpy()]
        counts["pool"] = int(len(sub))
        table = pd.DataFrame({"id_a": ids[pa], "id_b": ids[pb], "class": df["class"].to_numpy()})
        load_b = ("clean", pb)
    elif src.startswith("adversarial:"):
        attack = src.split(":", 1)[1]
        adv_ids, adv_labels, adv_preds, adv_images = _attack_arrays(run, attack)
        order = np.random.default_rng(seed).permutation(len(pool))[:max_pool]
        sub = pool[np.sort(order)]
        preds = _predict(model, dataset, sub, size, device)
        df, counts = _pairs.adversarial_pairs(labels[sub], preds, adv_labels, adv_preds,
                                              n_pairs=n_pairs, seed=seed)
        pa, pb = sub[df["a"].to_numpy()], df["b"].to_numpy()
        counts["pool"] = int(len(sub))
        table = pd.DataFrame({"id_a": ids[pa],
                              "id_b": [f"{attack}:{adv_ids[i]}" for i in pb],
                              "class": df["class"].to_numpy()})
        load_b = ("attack", np.asarray(adv_images), pb)
    elif src in NOISE_SOURCES:  # ends made from noise (issue 10)
        table, counts, pa, xb = draw_noise_pairs(model, dataset, pool, source=src, n_pairs=n_pairs,
                                                 seed=seed, max_pool=max_pool, size=size,
                                                 device=device, predict=_predict)
        load_b = ("tensor", xb)
    else:
        path = Path(src)
        if not path.is_file():
            raise PathError(f"--pair-source {src!r} is neither 'same-class', 'adversarial:<attack>', "
                            f"{', '.join(repr(n) for n in NOISE_SOURCES)} "
                            "nor an existing CSV file with columns id_a, id_b[, class]")
        given = pd.read_csv(path, dtype={"id_a": str, "id_b": str})
        pool_ids = ids[pool]
        index = pd.Index([str(i) for i in pool_ids])
        need = np.unique(np.r_[index.get_indexer(given.get("id_a", pd.Series([], dtype=str)).astype(str)),
                               index.get_indexer(given.get("id_b", pd.Series([], dtype=str)).astype(str))])
        need = need[need >= 0]
        preds = np.full(len(pool), -1, dtype=np.int64)
        preds[need] = _predict(model, dataset, pool[need], size, device)
        df, counts = _pairs.pairs_from_table(given, pool_ids, labels[pool], preds)
        skipped = df[df["status"] != "ok"]
        counts["skipped_pairs"] = [f"{pool_ids[a]}~{pool_ids[b]}: {s}" for a, b, s in
                                   zip(skipped["a"], skipped["b"], skipped["status"])][:20]
        df = df[df["status"] == "ok"]
        if n_pairs is not None:
            _pairs._check_n(n_pairs, len(df), "usable pairs exist in the file")
            df = df.iloc[:n_pairs]
        pa, pb = pool[df["a"].to_numpy()], pool[df["b"].to_numpy()]
        table = pd.DataFrame({"id_a": ids[pa], "id_b": ids[pb], "class": df["class"].to_numpy()})
        load_b = ("clean", pb)
    table.insert(0, "pair", [_pairs.pair_id(a, b) for a, b in zip(table["id_a"], table["id_b"])])
    table["source"] = src if not src.endswith(".csv") else "file"
    return table, counts, pa, load_b


def _images_b(dataset, load_b, size):
    if load_b[0] == "tensor":
        return load_b[1]
    if load_b[0] == "clean":
        return dataset.images(load_b[1], size)
    return torch.as_tensor(np.ascontiguousarray(load_b[1][load_b[2]]), dtype=torch.float32)


def _profile_rows(prof: dict, pairs: list, target: np.ndarray, space: str, method: str,
                  classes: int) -> pd.DataFrame:
    df = pd.DataFrame({"pair": np.asarray(pairs, dtype=object)[prof["pair"]], "space": space,
                       "method": method, "class": target[prof["pair"]], "t": prof["t"], "pred": prof["pred"],
                       "p_target": prof["p_target"], "loss": prof["loss"]})
    for c in range(classes):
        df[f"p_{c}"] = prof["probs"][:, c]
    return df


def _done(paths: pd.DataFrame, space: str, method: str, out: Path) -> bool:
    return bool(((paths["space"] == space) & (paths["method"] == method)).any()) and \
        (out / "points" / f"{_key(space)}__{method}.npz").is_file()


def _key(space: str) -> str:
    return space.replace(":", "-").replace("/", "-")


def _to_uint8(x: Tensor) -> np.ndarray:
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _path_images(run: Run, out: Path, model, space_objs: dict, methods, *, n_pairs: int, n_show: int,
                 device) -> dict[str, str]:
    """Images at ``n_show`` equal arc-length points of the first paths, for the figures.

    Pixels in ``input``; a layer's latents decoded by its trained decoder. Written once per
    space × method (kept on resume); returns what happened per ``space/method``.
    """
    from ..errors import SomprobeError

    done: dict[str, str] = {}
    if n_pairs < 1 or n_show < 2:
        return done
    for space in space_objs.values():
        decoder = None
        for method in methods:
            key = f"{_key(space.name)}__{method}"
            src, dst = out / "points" / f"{key}.npz", out / "images" / f"{key}.npz"
            if not src.is_file():
                continue
            if dst.is_file():
                done[f"{space.name}/{method}"] = "kept"
                continue
            if space.clip is None and decoder is None:
                if not run.decoder_path(space.name).is_file():
                    done[f"{space.name}/{method}"] = (f"no decoder for {space.name}: run `somprobe decoder "
                                                      f"--out {run.root} --layer {space.name}`, then "
                                                      "connect --resume to add decoded images")
                    continue
                try:
                    from .decoder_job import load_decoder

                    decoder = load_decoder(run, space.name, device=device)
                except (SomprobeError, ImportError) as e:
                    done[f"{space.name}/{method}"] = str(e)
                    continue
            with np.load(src, allow_pickle=False) as z:
                anchors = torch.as_tensor(z["anchors"][:n_pairs])
                n_anchors = torch.as_tensor(z["n_anchors"][:n_pairs])
                pair = z["pair"][:n_pairs]
            pts, t = resample(anchors, n_anchors, n_show)
            flat = pts.reshape(-1, *pts.shape[2:]).to(device)
            if space.clip is None:
                from .decoders import decode

                imgs = decode(decoder, flat)
            else:
                imgs = flat
            imgs = _to_uint8(imgs).reshape(len(pair), n_show, *imgs.shape[1:])
            with atomic_output(dst) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, images=imgs, t=t.cpu().numpy(), pair=pair,
                             decoded=np.asarray(space.clip is None))
            done[f"{space.name}/{method}"] = "decoded" if space.clip is None else "pixels"
    return done


def connect_run(
    run,
    *,
    model: torch.nn.Module,
    dataset,
    indices=None,
    name: str = "default",
    spaces: Sequence[str] = ("input",),
    n_pairs: int | None = 25,
    pair_source: str = "same-class",
    methods: Sequence[str] = ("linear", "neb"),
    options: dict | None = None,
    max_pool: int = 2000,
    profile_pairs: int = 4,
    n_show: int = 8,
    chunk: int = 1024,
    seed: int = 0,
    device="auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Join pairs of inputs by paths in several spaces with several methods; write the tables.

    Parameters
    ----------
    run : Run or path
        The run directory; results go to ``run.paths_dir(name)``.
    model : nn.Module
        Classifier on pixels in [0, 1] (``NormalizedModel``), put in eval mode here.
    dataset : ImageDataset
        Where the clean images come from (``.ids``, ``.labels``, ``.images(idx, size)``).
    indices : array of int, optional
        Positions of ``dataset`` that form the clean pool (default all).
    name : str
        Experiment name (folder under ``paths/``).
    spaces : sequence of str
        ``input`` and/or layers :func:`~somprobe.paths.spaces.make_space` can split at.
    n_pairs : int or None
        Pairs to join (None: all there are).
    pair_source : str
        ``same-class``, ``adversarial:<attack name>`` (a clean image of class c and a perturbed
        image of that attack predicted c) or a CSV file with ``id_a``, ``id_b``[, ``class``].
    methods : sequence of str
        Names in :data:`METHODS`.
    options : dict, optional
        Method options (``pivots``, ``steps``, ``spring``, ``optimizer``, ``lr``, ``tol``,
        ``points`` ...); each method takes the ones it lists in its :class:`MethodSpec`.
    max_pool : int
        Same-class and adversarial pairs are drawn from at most this many clean samples (a
        seeded subset), whose predictions are computed.
    profile_pairs : int
        Pairs whose loss/softmax profiles go to ``profiles.csv`` and whose images along the
        path go to ``images/`` (for figures).
    n_show : int
        Images per path in ``images/``: pixels for ``input``, decoded latents where ``somprobe
        decoder`` trained a decoder for the layer (skipped otherwise; ``summary.json`` says so).
    chunk : int
        Points per forward pass.
    seed : int
        Seeds the pairs (and any method's generator).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    resume : bool
        Keep the space × method combinations already written and do the rest (the pairs must
        be the same).
    overwrite : bool
        Replace an existing experiment of the same name.
    progress : bool
        tqdm bars.

    Returns
    -------
    dict
        The summary written to ``summary.json`` (pair counts, options, table 1 rows).
    """
    t_start = time.perf_counter()
    run = run if isinstance(run, Run) else Run(run)
    out = run.paths_dir(name)
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PathError(f"unknown method(s) {unknown}; use some of {', '.join(METHODS)}")
    options = dict(options or {})
    known_opts = {k for m in METHODS.values() for k in m.options}
    bad_opts = sorted(set(options) - known_opts)
    if bad_opts:
        raise PathError(f"unknown method option(s) {bad_opts}; known: {', '.join(sorted(known_opts))}")
    for m in methods:
        if METHODS[m].validate is not None:
            METHODS[m].validate(**{k: options.get(k, v) for k, v in METHODS[m].options.items()})
    spaces = list(dict.fromkeys(s.strip() for s in spaces if s.strip()))
    if not spaces:
        raise PathError("no space given: pass e.g. --space input,CL1")
    if overwrite and out.is_dir() and not resume:
        for f in ("summary.json", "paths.csv", "table1.csv", "profiles.csv", "pairs.csv", "paths_summary.csv"):
            (out / f).unlink(missing_ok=True)
        for sub in ("points", "images"):
            for f in (out / sub).glob("*.npz") if (out / sub).is_dir() else ():
                f.unlink()

    dev = resolve_device(device)
    model = model.to(dev).eval()
    # Every space is checked before any work, so a bad --space fails at once.
    space_objs = {s: make_space(model, s) for s in spaces}
    if (out / "paths.csv").is_file() and not (resume or overwrite):
        raise PathError(f"connect experiment {name!r} already exists in {run.root}; pass --resume to "
                        "finish it, --overwrite to replace it, or another --name")
    size = getattr(model, "image_size", None) or getattr(dataset, "image_size", None)
    pool = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    table, counts, pa, load_b = _draw_pairs(run, model, dataset, pool, pair_source=pair_source,
                                            n_pairs=n_pairs, seed=seed, max_pool=max_pool,
                                            size=size, device=dev)
    if resume and (out / "pairs.csv").is_file():
        old = pd.read_csv(out / "pairs.csv", dtype=str)
        if list(old["pair"]) != list(table["pair"]):
            raise PathError(f"--resume: the pairs of {name!r} differ from this command's (other "
                            "--pairs, --pair-source or --seed?); repeat the original options or "
                            "use another --name")
    out.mkdir(parents=True, exist_ok=True)
    save_csv(out / "pairs.csv", table)
    xa = pa if isinstance(pa, torch.Tensor) else dataset.images(pa, size)
    xb = _images_b(dataset, load_b, size)
    target = torch.as_tensor(table["class"].to_numpy(dtype=np.int64).copy(), device=dev)
    pair_names = list(table["pair"])
    n_classes = int(getattr(model, "num_classes", 0) or 0)

    paths = pd.read_csv(out / "paths.csv") if resume and (out / "paths.csv").is_file() else \
        pd.DataFrame(columns=PATHS_COLUMNS)
    profiles = pd.read_csv(out / "profiles.csv") if resume and (out / "profiles.csv").is_file() else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    timings = {}
    for sname, space in space_objs.items():
        todo = [m for m in methods if not (resume and _done(paths, space.name, m, out))]
        if not todo:
            continue
        with torch.no_grad():
            za = encode_images(space, xa.to(dev)).detach()
            zb = encode_images(space, xb.to(dev)).detach()
        lin = None
        # The straight line first: every row carries its linear_ok.
        for method in ["linear"] + [m for m in todo if m != "linear"]:
            spec = METHODS[method]
            kw = {k: options.get(k, v) for k, v in spec.options.items()}
            t0 = time.perf_counter()
            batch = spec.fn(space, za, zb, target, chunk=chunk, generator=gen, progress=progress, **kw)
            seconds = time.perf_counter() - t0
            stats = dict(batch.stats)
            if spec.check:
                chk = check_paths(space, batch, target, points_per_segment=int(options.get("points", 100)),
                                  chunk=chunk)
                for k in ("path_ok", "max_loss", "length_ratio"):
                    stats[k] = chk[k]
                stats["path_ok"] = stats["path_ok"] & ~np.asarray(stats["failed"], dtype=bool)
            if method == "linear":
                lin = stats["path_ok"]
                if method not in todo:
                    continue
            timings[f"{space.name}/{method}"] = seconds
            rows = table[["pair", "id_a", "id_b", "class"]].copy()
            rows["space"], rows["method"], rows["linear_ok"] = space.name, method, lin
            for k in ("path_ok", "max_loss", "length_ratio", "iterations", "failed", "reason"):
                rows[k] = stats[k]
            rows["seconds"] = seconds / max(len(rows), 1)
            for k in spec.extras:
                rows[k] = stats.get(k)
            paths = paths[~((paths["space"] == space.name) & (paths["method"] == method))]
            paths = pd.concat([paths, rows], ignore_index=True) if len(paths) else rows
            paths = paths[PATHS_COLUMNS + [c for c in paths.columns if c not in PATHS_COLUMNS]]
            with atomic_output(out / "points" / f"{_key(space.name)}__{method}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, anchors=batch.anchors.detach().cpu().numpy().astype(np.float32),
                             n_anchors=batch.n_anchors.cpu().numpy(), pair=np.asarray(pair_names, dtype=str),
                             target=target.cpu().numpy())
            k_prof = min(profile_pairs, len(batch))
            if k_prof:
                sub = PathBatch(batch.anchors[:k_prof].to(dev), batch.n_anchors[:k_prof], {})
                nseg = int(batch.n_anchors[:k_prof].max()) - 1
                per_seg = max(2, int(options.get("points", 100)) // max(nseg, 1) + 1)
                prof = path_profile(space, sub, target[:k_prof], points_per_segment=per_seg,
                                    chunk=chunk, probs=True)
                n_classes = n_classes or prof["probs"].shape[1]
                rows_p = _profile_rows(prof, pair_names[:k_prof], target[:k_prof].cpu().numpy(), space.name,
                                       method, prof["probs"].shape[1])
                if profiles is not None:
                    profiles = profiles[~((profiles["space"] == space.name) & (profiles["method"] == method))]
                profiles = rows_p if profiles is None or not len(profiles) else \
                    pd.concat([profiles, rows_p], ignore_index=True)
                save_csv(out / "profiles.csv", profiles)
            save_csv(out / "paths.csv", paths)
            save_csv(out / "table1.csv", connectivity_table(paths))
            save_csv(out / "paths_summary.csv", method_summary(paths))

    # Every method of the experiment (also those of earlier --resume calls), for figures.
    all_methods = list(dict.fromkeys(list(paths["method"].astype(str)) + methods)) if len(paths) else methods
    images = _path_images(run, out, model, space_objs, all_methods, n_pairs=profile_pairs, n_show=n_show,
                          device=dev)
    t1 = connectivity_table(paths) if len(paths) else pd.DataFrame(columns=TABLE1_COLUMNS)
    summary = {
        "name": name, "pair_source": str(pair_source), "pairs": int(len(table)), "counts": counts,
        "spaces": [space_objs[s].name for s in spaces], "methods": methods,
        "options": {m: {k: options.get(k, v) for k, v in METHODS[m].options.items()} for m in methods},
        "seed": int(seed), "device": str(dev), "image_size": size, "timings": timings,
        "seconds": time.perf_counter() - t_start, "images": images,
        "table1": t1.astype(object).where(t1.notna(), None).to_dict(orient="records"),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary

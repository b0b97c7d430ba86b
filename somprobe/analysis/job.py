"""Run-level analyses: read a run's SOMs, BMUs and code stores, write the tidy tables.

``analyze_run`` (``somprobe analyze``) writes ``centres``, ``dclass_samples``, ``dclass``,
``density``, ``class_bmus``, ``weight_similarity``, ``centre_similarity`` and
``correct_incorrect`` (schemas in docs/interfaces.md) plus one G×G weight-distance matrix per SOM;
``shift_run`` (``somprobe shift``) writes ``shifts`` and ``shift_summary``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..run import Run, save_csv, save_npy, som_key
from ..som.grid import Grid
from .centres import check_bmus, class_centres, class_means, correct_vs_incorrect, d_class
from .density import bmu_density, class_bmu_counts, density_points
from .shifts import align_ids, bmu_shifts, shift_summary, shift_table
from .similarity import centre_similarity, choose_classes, weight_cosine_distances, weight_similarity_summary

__all__ = ["analyze_run", "shift_run", "find_soms", "write_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = {
    "centres": ["layer", "size", "class", "method", "mode_unit", "row", "col", "unit", "n_samples"],
    "dclass_samples": ["layer", "size", "split", "sample_id", "label", "pred", "correct", "d_class"],
    "dclass": ["layer", "size", "split", "class", "d_class", "n_samples"],
    "density": ["layer", "size", "split", "row", "col", "density"],
    "class_bmus": ["layer", "size", "split", "class", "unit", "row", "col", "count"],
    "weight_similarity": ["layer", "size", "mean", "median", "std", "q05", "q25", "q75", "q95"],
    "centre_similarity": ["layer", "size", "class_a", "class_b", "unit_a", "unit_b", "cosine_distance"],
    "correct_incorrect": ["layer", "size", "correct", "n", "mean", "median", "q25", "q75"],
    "shifts": ["layer", "size", "perturbation", "sample_id", "rank", "distance"],
    "shift_summary": ["layer", "size", "perturbation", "n", "n_missing", "mean", "median", "q25", "q75"],
}

_STEM = re.compile(r"^(?P<layer>.+)-(?P<m>\d+)x(?P<n>\d+)$")


@dataclass(frozen=True)
class SOMEntry:
    """One fitted SOM of a run: layer name, grid size and file."""

    layer: str
    m: int
    n: int
    path: Path

    @property
    def size(self) -> str:
        return f"{self.m}x{self.n}"

    @property
    def key(self) -> str:
        return som_key(self.layer, self.m, self.n)


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _file_layer(layer: str) -> str:
    """The layer as it appears in file names (``som_key`` replaces ``:`` and ``/``)."""
    return som_key(layer, 1, 1)[: -len("-1x1")]


def _parse_sizes(sizes) -> set[tuple[int, int]] | None:
    # as in fit_run: an int is a square size, so (10, 20) means 10×10 and 20×20
    if sizes is None:
        return None
    if isinstance(sizes, str):
        sizes = [t for t in sizes.split(",") if t.strip()]  # the CLI's "--size 10,20x30"
    elif isinstance(sizes, (int, np.integer)):
        sizes = [sizes]
    out = set()
    for s in sizes:
        if isinstance(s, (int, np.integer)):
            out.add((int(s), int(s)))
        elif isinstance(s, str):
            mt = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", s)
            if not mt:
                raise AnalysisError(f"cannot read SOM size {s!r}: write 20 or 20x30")
            out.add((int(mt[1]), int(mt[2] or mt[1])))
        else:
            m, n = s
            out.add((int(m), int(n)))
    return out


def find_soms(run, *, sizes=None, layers=None) -> list[SOMEntry]:
    """Fitted SOMs of a run (``soms/<layer>-<m>x<n>.pt``), naturally sorted by layer then size.

    The layer name comes from the ``.json`` sidecar's ``"layer"`` (or ``"meta": {"layer"}``) key
    when present (file stems
    replace ``:`` by ``_``), else from the file stem. ``sizes`` (``20``, ``"20x30"``, ``(20, 30)``
    or a list of them) and ``layers`` filter the result.

    Raises
    ------
    AnalysisError
        When the run has no SOM at all (``somprobe fit`` has not run) or none matches the filters.
    """
    run = Run(run) if not isinstance(run, Run) else run
    want_sizes = _parse_sizes(sizes)
    found: dict[str, SOMEntry] = {}
    if run.soms_dir.is_dir():
        for p in sorted(run.soms_dir.glob("*.pt")):
            mt = _STEM.match(p.stem)
            if not mt:
                continue
            layer = mt["layer"]
            side = p.with_suffix(".json")
            if side.is_file():
                try:
                    info = json.loads(side.read_text())
                    meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
                    layer = str(info.get("layer", meta.get("layer", layer)))
                except (OSError, json.JSONDecodeError, AttributeError):
                    pass
            found[p.stem] = SOMEntry(layer, int(mt["m"]), int(mt["n"]), p)
    if not found:
        raise AnalysisError(f"no fitted SOM in {run.soms_dir}: run `somprobe fit` first")
    out = list(found.values())
    if want_sizes is not None:
        out = [e for e in out if (e.m, e.n) in want_sizes]
    if layers is not None:
        names = {str(x) for x in ([layers] if isinstance(layers, str) else layers)}
        out = [e for e in out if e.layer in names or _file_layer(e.layer) in names]
    if not out:
        have = sorted({(e.layer, e.size) for e in found.values()}, key=lambda t: (_natural(t[0]), t[1]))
        raise AnalysisError(
            f"no fitted SOM matches layers={layers} sizes={sizes}; the run has {have}: "
            "pick among those or run `somprobe fit` with these layers and sizes"
        )
    return sorted(out, key=lambda e: (_natural(e.layer), e.m, e.n))


# inputs ---------------------------------------------------------------------------------------
def _load_som_weights(entry: SOMEntry) -> np.ndarray:
    """``[G, D]`` float32 weights of a SOM file (somprobe.som.map's dict of plain tensors)."""
    import torch

    try:
        obj = torch.load(entry.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise AnalysisError(f"cannot read SOM file {entry.path} ({e}): refit it with `somprobe fit`") from e
    if isinstance(obj, dict) and "weights" in obj:
        w = obj["weights"]
    else:
        try:
            from ..som.map import SOM
        except ImportError as e:
            raise AnalysisError(f"SOM file {entry.path} holds no 'weights' entry: refit it with `somprobe fit`") from e
        w = SOM.load(entry.path, device="cpu").weights
    w = w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
    if w.ndim != 2 or w.shape[0] != entry.m * entry.n:
        raise AnalysisError(
            f"SOM file {entry.path} has weights of shape {tuple(w.shape)}, not [{entry.m * entry.n}, D] "
            f"for a {entry.m}×{entry.n} grid: refit it with `somprobe fit`"
        )
    return w.astype(np.float32, copy=False)


@dataclass
class _Split:
    name: str
    labels: np.ndarray
    preds: np.ndarray | None
    ids: list
    layers: list | None
    dims: dict | None
    path: Path
    store: object | None = None

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])


def _load_split(run: Run, split: str) -> _Split:
    """Labels, predictions, ids and layer dimensions of a split's code store."""
    path = run.codes_dir(split)
    if not (path / "manifest.json").is_file():
        raise AnalysisError(
            f"no complete code store for split {split!r} at {path}: run `somprobe extract --split {split}`"
        )
    try:
        from ..store import open_store
    except ImportError:
        open_store = None
    if open_store is not None:
        st = open_store(path)
        return _Split(split, np.asarray(st.labels, dtype=np.int64), np.asarray(st.preds, dtype=np.int64),
                      list(st.ids), list(st.layers), dict(st.dims), path, st)
    # the store module is not there: read its documented files directly
    manifest = json.loads((path / "manifest.json").read_text())
    labels = np.load(path / "labels.npy").astype(np.int64)
    preds = np.load(path / "preds.npy").astype(np.int64) if (path / "preds.npy").is_file() else None
    ids = json.loads((path / "ids.json").read_text()) if (path / "ids.json").is_file() else [str(i) for i in range(labels.size)]
    dims = manifest.get("dims") if isinstance(manifest, dict) else None
    layers = list(dims) if isinstance(dims, dict) else (manifest.get("layers") if isinstance(manifest, dict) else None)
    if dims is None and layers is not None:
        dims = {}
        for layer in layers:
            f = path / f"{layer}.npy"
            if not f.is_file():
                f = path / f"{_file_layer(layer)}.npy"
            if f.is_file():
                dims[layer] = int(np.load(f, mmap_mode="r").shape[1])
    return _Split(split, labels, preds, list(ids), layers, dims, path)


def _check_som_store(entry: SOMEntry, dim: int, sp: _Split) -> None:
    if sp.layers is not None and entry.layer not in sp.layers:
        raise AnalysisError(
            f"SOM {entry.key} is for layer {entry.layer!r} but the {sp.name} code store holds layers "
            f"{sp.layers}: extract that layer (`somprobe extract --layers {entry.layer}`) or analyse "
            f"only layers present (--layers)"
        )
    if sp.dims is not None and entry.layer in sp.dims and int(sp.dims[entry.layer]) != dim:
        raise AnalysisError(
            f"SOM {entry.key} has {dim}-dimensional weights but layer {entry.layer!r} of the {sp.name} "
            f"code store has {sp.dims[entry.layer]}-dimensional codes: SOM and codes come from "
            "different layers or code settings; refit with `somprobe fit` on this store"
        )


def _bmu_splits(run: Run, entry: SOMEntry) -> list[str]:
    root = run.soms_dir / "bmus"
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / f"{entry.key}.npy").is_file())


def _load_bmus(run: Run, entry: SOMEntry, sp: _Split, grid: Grid, *, k: int | None, compute: bool = False) -> np.ndarray:
    p = run.bmus_path(sp.name, entry.layer, entry.m, entry.n)
    if p.is_file():
        b = np.load(p)
    elif compute and sp.store is not None:
        b = _compute_bmus(entry, sp, k or 10)
    else:
        raise AnalysisError(
            f"no BMUs of split {sp.name!r} for SOM {entry.key} ({p}): run `somprobe fit` "
            f"(it writes the BMUs of every split with a code store)"
        )
    b = check_bmus(b, grid, name=f"BMUs of {sp.name} for {entry.key}")
    if b.shape[0] != sp.n_rows:
        raise AnalysisError(
            f"BMUs of split {sp.name!r} for SOM {entry.key} have {b.shape[0]} rows but its code store "
            f"has {sp.n_rows}: the store was re-extracted after fitting; rerun `somprobe fit`"
        )
    if k is not None:
        if k > b.shape[1]:
            raise AnalysisError(f"asked for k={k} BMUs but {p} holds {b.shape[1]}: lower k or refit with more")
        b = b[:, :k]
    return b


def _compute_bmus(entry: SOMEntry, sp: _Split, k: int) -> np.ndarray:
    """BMUs of a split that ``fit`` never saw (e.g. attacked after fitting), kept in memory only."""
    try:
        from ..som.map import SOM
    except ImportError as e:
        raise AnalysisError(
            f"no BMUs of split {sp.name!r} for SOM {entry.key}: run `somprobe fit` to compute them"
        ) from e
    som = SOM.load(entry.path, device="cpu")
    idx, _ = som.bmus(sp.store.codes(entry.layer), k=k)
    return np.asarray(idx)


def write_table(run, name: str, df: pd.DataFrame) -> Path:
    """Write ``df`` as ``run.table(name)`` CSV atomically (temporary file + rename)."""
    run = Run(run) if not isinstance(run, Run) else run
    path = run.table(name)
    save_csv(path, df)
    return path


def _frame(name: str, parts: list[pd.DataFrame]) -> pd.DataFrame:
    cols = TABLE_COLUMNS[name]
    if not parts:
        return pd.DataFrame({c: [] for c in cols})
    return pd.concat(parts, ignore_index=True)[cols]


def _tag(df: pd.DataFrame, **cols) -> pd.DataFrame:
    for i, (c, v) in enumerate(cols.items()):
        df.insert(i, c, v)
    return df


# analyses -------------------------------------------------------------------------------------
def analyze_run(run, *, sizes=None, layers=None, splits=None, train_split: str = "som-tr",
                val_split: str = "som-val", method: str = "unfold", k: int | None = None,
                k_centre: int | None = None, classes=None, bandwidth: float | str = 1.0,
                resolution: int = 1, bmu_classes=None, n_bmu_classes: int = 4,
                n_centre_classes: int = 100, seed: int = 0, write: bool = True,
                progress: bool = False) -> dict[str, pd.DataFrame]:
    """All study-003 analyses of a run's fitted SOMs, as tidy tables.

    Parameters
    ----------
    run : Run or path
    sizes : int, str, tuple or list of them, optional
        SOM sizes to analyse (``20`` = 20×20, ``"20x30"``, ``"10,20"``); default all fitted.
    layers : list of str, optional
        Layers to analyse; default all fitted (CL1–CL4, CLS1–CLS12, … are plain names).
    splits : list of str, optional
        Splits whose BMUs enter D_class, density and class BMUs; default every split with BMUs
        for the SOM (``train_split`` always included).
    train_split : str
        Split the class centres come from (SOM-tr).
    val_split : str
        Split of the correct-vs-incorrect comparison (skipped when it has no BMUs).
    method : {"unfold", "circular"}
        Class-centre method (:func:`~somprobe.analysis.centres.class_centres`).
    k : int, optional
        BMUs per input for D_class, density and class BMUs (default all stored, 10).
    k_centre : int, optional
        BMUs per input in the centre of mass (default all ``k``).
    classes : list of int, optional
        Classes that must have a centre; one without SOM-tr samples raises AnalysisError.
    bandwidth, resolution
        Density kernel (:func:`~somprobe.analysis.density.bmu_density`).
    bmu_classes : list of int, optional
        Classes for ``class_bmus``; default ``n_bmu_classes`` drawn with ``seed``.
    n_centre_classes : int
        Classes compared in ``centre_similarity`` (≤ 100 in the paper), drawn with ``seed``;
        the same classes for every layer and size.
    seed : int
    write : bool
        Write every table to ``run.table(name)`` and the weight distances to
        ``run.weight_distances_path(layer, m, n)``; tables cover the SOMs analysed in this call
        and replace earlier ones.
    progress : bool
        tqdm bar over SOMs.

    Returns
    -------
    dict[str, pandas.DataFrame]
        ``centres, dclass_samples, dclass, density, class_bmus, weight_similarity,
        centre_similarity, correct_incorrect`` with the columns of docs/interfaces.md.

    Raises
    ------
    AnalysisError
        No fitted SOM (run ``somprobe fit``); SOM and code store of different layers or
        dimensions; a requested class without SOM-tr samples; labels of another split absent
        from SOM-tr; BMU files that do not match their store.
    """
    run = Run(run) if not isinstance(run, Run) else run
    soms = find_soms(run, sizes=sizes, layers=layers)
    cache: dict[str, _Split] = {}

    def split_info(name: str) -> _Split:
        if name not in cache:
            cache[name] = _load_split(run, name)
        return cache[name]

    parts: dict[str, list] = {name: [] for name in TABLE_COLUMNS if name not in ("shifts", "shift_summary")}
    tr = split_info(train_split)
    centre_cls = choose_classes(np.unique(tr.labels), n=n_centre_classes, seed=seed)
    bmu_cls = (np.unique(np.asarray(bmu_classes, dtype=np.int64)) if bmu_classes is not None
               else choose_classes(np.unique(tr.labels), n=n_bmu_classes, seed=seed))

    it = soms
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(soms, desc="analyse", unit="SOM")
    for entry in it:
        grid = Grid(entry.m, entry.n)
        W = _load_som_weights(entry)
        _check_som_store(entry, W.shape[1], tr)
        tag = {"layer": entry.layer, "size": entry.size}
        b_tr = _load_bmus(run, entry, tr, grid, k=k)
        cen = class_centres(b_tr, tr.labels, grid, method=method, k_centre=k_centre, classes=classes)
        parts["centres"].append(_tag(cen.copy(), **tag))

        names = list(splits) if splits is not None else _bmu_splits(run, entry)
        names = [train_split] + [s for s in names if s != train_split]
        for name in names:
            sp = split_info(name)
            _check_som_store(entry, W.shape[1], sp)
            b = b_tr if name == train_split else _load_bmus(run, entry, sp, grid, k=k)
            d = d_class(b, sp.labels, cen, grid, split=name)
            preds = sp.preds if sp.preds is not None else np.full(sp.n_rows, -1, np.int64)
            correct = preds == sp.labels
            parts["dclass_samples"].append(pd.DataFrame({
                **tag, "split": name, "sample_id": [str(i) for i in sp.ids], "label": sp.labels,
                "pred": preds, "correct": correct, "d_class": d}))
            parts["dclass"].append(_tag(class_means(d, sp.labels), **tag, split=name))
            dens = bmu_density(b, grid, bandwidth=bandwidth, resolution=resolution)
            rows, cols = density_points(grid, resolution=resolution)
            parts["density"].append(pd.DataFrame({
                **tag, "split": name, "row": np.repeat(rows, cols.size), "col": np.tile(cols, rows.size),
                "density": dens.reshape(-1)}))
            parts["class_bmus"].append(_tag(class_bmu_counts(b, sp.labels, grid, classes=bmu_cls), **tag, split=name))
            if name == val_split and sp.preds is not None:
                parts["correct_incorrect"].append(_tag(correct_vs_incorrect(d, correct), **tag))

        dist = weight_cosine_distances(W)
        if write:
            save_npy(run.weight_distances_path(entry.layer, entry.m, entry.n), dist)
        parts["weight_similarity"].append(pd.DataFrame([{**tag, **weight_similarity_summary(dist)}]))
        parts["centre_similarity"].append(_tag(centre_similarity(W, cen, grid, classes=centre_cls), **tag))

    tables = {name: _frame(name, p) for name, p in parts.items()}
    if write:
        for name, df in tables.items():
            write_table(run, name, df)
    return tables


def shift_run(run, *, clean_split: str = "som-val", perturbed_splits=None, sizes=None, layers=None,
              k: int | None = None, write: bool = True, progress: bool = False) -> dict[str, pd.DataFrame]:
    """BMU shifts between clean inputs and their perturbed twins, per layer and SOM size.

    Parameters
    ----------
    run : Run or path
    clean_split : str
        Split of the clean inputs the perturbations were made from.
    perturbed_splits : list of str, optional
        Code-store splits of perturbed inputs; default every split made by ``somprobe attack``
        (an ``attacks/<split>`` directory) or named ``adv*`` / ``noise*``.
        Perturbed inputs are matched to clean ones by sample id; the perturbed store may hold a
        subset in any order (only the shared ids are compared; the others are counted in
        ``shift_summary.n_missing``).
    sizes, layers
        Filters as in :func:`analyze_run`.
    k : int, optional
        Ranks compared (default all stored BMUs, 10).
    write : bool
        Write ``shifts`` and ``shift_summary`` tables.
    progress : bool

    Returns
    -------
    dict[str, pandas.DataFrame]
        ``shifts`` (``layer, size, perturbation, sample_id, rank, distance``) and
        ``shift_summary`` (``layer, size, perturbation, n, n_missing, mean, median, q25, q75``:
        ``n`` inputs compared, ``n_missing`` clean inputs the perturbed split does not hold).

    Raises
    ------
    AnalysisError
        No fitted SOM; no perturbed split; perturbed ids missing from the clean split (the first
        one is named); SOM/store mismatch.
    """
    run = Run(run) if not isinstance(run, Run) else run
    soms = find_soms(run, sizes=sizes, layers=layers)
    if perturbed_splits is None:
        cand = set(run.splits())
        root = run.soms_dir / "bmus"
        if root.is_dir():
            cand |= {d.name for d in root.iterdir() if d.is_dir()}
        perturbed_splits = sorted(s for s in cand if s != clean_split and (
            s.startswith(("adv", "noise")) or run.attack_dir(s).is_dir()))
        if not perturbed_splits:
            raise AnalysisError(
                f"no perturbed split (adv-*, noise*) in {run.root}: run `somprobe attack` first"
            )
    elif isinstance(perturbed_splits, str):
        perturbed_splits = [perturbed_splits]
    clean = _load_split(run, clean_split)
    pert = {}
    for name in perturbed_splits:
        sp = _load_split(run, name)
        pert[name] = (sp, align_ids(clean.ids, sp.ids, clean_name=clean_split, perturbed_name=name))

    rows, summ = [], []
    it = soms
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(soms, desc="shift", unit="SOM")
    for entry in it:
        grid = Grid(entry.m, entry.n)
        tag = {"layer": entry.layer, "size": entry.size}
        b_clean = _load_bmus(run, entry, clean, grid, k=k, compute=True)
        for name, (sp, idx) in pert.items():
            b_p = _load_bmus(run, entry, sp, grid, k=k, compute=True)
            dist = bmu_shifts(b_clean[idx], b_p[:, : b_clean.shape[1]], grid)
            rows.append(_tag(shift_table(dist, sp.ids), **tag, perturbation=name))
            # clean inputs without a perturbed twin (an attack of part of the split) are left out
            # of the comparison and counted, so a short attack is visible in the summary
            summ.append(pd.DataFrame([{**tag, "perturbation": name, **shift_summary(dist),
                                       "n_missing": len(clean.ids) - len(idx)}]))
    tables = {"shifts": _frame("shifts", rows), "shift_summary": _frame("shift_summary", summ)}
    if write:
        for name, df in tables.items():
            write_table(run, name, df)
    return tables

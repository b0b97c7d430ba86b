"""Study 003's functional-code figures: SOM curves, density, class BMUs, D_class, weight and
centre similarity, correct vs incorrect (Figs 3–7, Supp 1–3)."""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import AnalysisError
from ..run import Run
from .common import (
    read_table,
    sizes_of,
    _box,
    _COUNT_CMAP,
    _DENSITY_CMAP,
    _DISTANCE_CMAP,
    _GRID_UNIT,
    _PALETTE,
    _check,
    _empty_panel,
    _finite,
    _grid_matrix,
    _grid_shape,
    _grid_ticks,
    _heat,
    _new_figure,
    _range,
    _resolution,
    _select_size,
    _split_label,
    _split_order,
    _style,
    natural_key,
    natural_sorted,
)


def plot_curves(curves: pd.DataFrame, *, x: str = "samples") -> Figure:
    """SOM training loss per layer (study 003, Fig 3): one panel per SOM size, hue = layer.

    Parameters
    ----------
    curves : DataFrame
        ``run.curves_csv`` (layer, size, epoch, step, samples, loss, ...).
    x : {"samples", "step", "epoch"}
        Abscissa: training inputs seen, update steps or epochs.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if x not in ("samples", "step", "epoch"):
        raise ValueError(f"x={x!r}: choose 'samples', 'step' or 'epoch'")
    df = _finite(_check(curves, "curves", ["layer", "size", x, "loss"]), "loss")
    df = df.assign(size=df["size"].astype(str), layer=df["layer"].astype(str))
    sizes = natural_sorted(df["size"])
    layers = natural_sorted(df["layer"])
    if not sizes:
        raise AnalysisError("the SOM training curves table is empty: run `somprobe fit`")
    xlabel = {"samples": "training inputs seen", "step": "update step", "epoch": "epoch"}[x]
    with _style():
        fig = _new_figure(4.2 * len(sizes) + 1.2, 3.6)
        axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
        palette = dict(zip(layers, sns.color_palette(_PALETTE, len(layers))))
        for ax, size in zip(axes, sizes):
            sub = df[df["size"] == size].sort_values(["layer", x])
            if sub["loss"].notna().any():
                sns.lineplot(data=sub, x=x, y="loss", hue="layer", hue_order=layers,
                             palette=palette, ax=ax, errorbar=None, estimator=None,
                             units="layer", legend=ax is axes[-1], linewidth=1.4)
            else:
                _empty_panel(ax)
            ax.set_title(f"SOM {size}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("SOM training loss")
        if axes[-1].get_legend() is not None:
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.0, 1.0), title="layer")
    return fig


def plot_density(density: pd.DataFrame, *, size: str | None = None, col_wrap: int = 6) -> Figure:
    """BMU density per layer on the m×n grid (Fig 4 / Supp 1): columns = layers, rows = splits.

    Parameters
    ----------
    density : DataFrame
        Table ``density`` (layer, size, split, row, col, density).
    size : str, optional
        SOM size ``"<m>x<n>"``; needed when the table holds several.
    col_wrap : int
        Layers per row before wrapping (ViT has 12 CLS layers).

    Returns
    -------
    matplotlib.figure.Figure
        One shared colour scale, so panels compare directly.
    """
    df = _check(density, "density", ["layer", "size", "split", "row", "col", "density"])
    df, size = _select_size(df, "density", size)
    df = _finite(df, "density")
    m, n = _grid_shape(size, df)
    res = _resolution(df)
    layers = natural_sorted(df["layer"].astype(str))
    splits = _split_order(df["split"].astype(str))
    ncols = max(1, min(len(layers), col_wrap))
    per_block = int(np.ceil(len(layers) / ncols))
    vmin, vmax = _range(df["density"])
    panel = 2.3 * max(1.0, min(1.6, n / m))
    with _style():
        fig = _new_figure(panel * ncols + 1.0, 2.4 * per_block * len(splits) + 0.6)
        axes = fig.subplots(per_block * len(splits), ncols, squeeze=False)
        image = None
        for b, split in enumerate(splits):
            for i in range(per_block * ncols):
                ax = axes[b * per_block + i // ncols, i % ncols]
                if i >= len(layers):
                    ax.set_visible(False)
                    continue
                layer = layers[i]
                sub = df[(df["layer"].astype(str) == layer) & (df["split"].astype(str) == split)]
                ax.set_title(f"{layer} · {_split_label(split)}", fontsize="medium")
                if sub["density"].notna().any():
                    image = _heat(ax, _grid_matrix(sub, "density", m, n, resolution=res),
                                  cmap=_DENSITY_CMAP, vmin=vmin, vmax=vmax, resolution=res)
                    _grid_ticks(ax, m, n)
                    ax.tick_params(labelleft=i % ncols == 0)
                else:
                    _empty_panel(ax)
                if i % ncols == 0:
                    ax.set_ylabel("grid row")
                if b == len(splits) - 1 and i + ncols >= len(layers):
                    ax.set_xlabel("grid column")
        if image is not None:
            fig.colorbar(image, ax=[a for a in axes.ravel() if a.get_visible()], shrink=0.8,
                         label="BMU density (kernel estimate)")
        fig.suptitle(f"BMU density on the {size} torus")
    return fig


def plot_class_bmus(class_bmus: pd.DataFrame, *, size: str | None = None,
                    classes: Sequence[int] | None = None, max_classes: int = 5,
                    splits: Sequence[str] | None = ("som-tr", "som-val")) -> Figure:
    """Top-10 BMUs of the inputs of chosen classes (Fig 5 / Supp 2).

    Rows: for each layer, SOM-tr above SOM-val; columns: classes. Colour = number of BMU hits.

    Parameters
    ----------
    class_bmus : DataFrame
        Table ``class_bmus`` (layer, size, split, class, unit, row, col, count).
    size : str, optional
        SOM size; needed when the table holds several.
    classes : sequence of int, optional
        Classes to show; default the first ``max_classes`` classes present.
    max_classes : int
        Default number of classes.
    splits : sequence of str, optional
        Splits to show, as rows under each layer (default SOM-tr above SOM-val, as in the paper);
        ``None`` shows every split of the table (perturbed ones too). Splits absent from the
        table are left out; if none of them is present, every split is shown.

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(class_bmus, "class_bmus",
                ["layer", "size", "split", "class", "row", "col", "count"])
    df, size = _select_size(df, "class_bmus", size)
    df = _finite(df, "count")
    m, n = _grid_shape(size, df)
    present = natural_sorted(df["class"])
    if classes is None:
        classes = present[:max_classes]
    else:
        absent = [c for c in classes if c not in set(present)]
        if absent:
            raise AnalysisError(f"classes {absent} are not in table 'class_bmus'; present: {present}")
    if not len(classes):
        raise AnalysisError("table 'class_bmus' has no classes: run `somprobe analyze`")
    layers = natural_sorted(df["layer"].astype(str))
    present_splits = _split_order(df["split"].astype(str))
    chosen = [s for s in (splits or ()) if s in present_splits]
    splits = chosen or present_splits
    df = df[df["split"].astype(str).isin(splits)]
    rows = [(layer, split) for layer in layers for split in splits]
    _, vmax = _range(df["count"])
    with _style():
        # A fixed grid instead of constrained layout: its solver grows steeply with the number
        # of panels (12 CLS layers × 2 splits × classes) and the panels are all alike anyway.
        width, height = 1.8 * len(classes) + 1.6, 1.9 * len(rows) + 0.7
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(len(rows), len(classes), squeeze=False, gridspec_kw=dict(
            left=1.0 / width, right=1 - 1.3 / width, bottom=0.35 / height,
            top=1 - 0.55 / height, wspace=0.12, hspace=0.18))
        image = None
        for r, (layer, split) in enumerate(rows):
            for c, cls in enumerate(classes):
                ax = axes[r, c]
                sub = df[(df["layer"].astype(str) == layer) & (df["split"].astype(str) == split)
                         & (df["class"] == cls)]
                # A unit no input of this class hit has a count of zero, not "unknown".
                image = _heat(ax, _grid_matrix(sub, "count", m, n, fill=0.0), cmap=_COUNT_CMAP,
                              vmin=0.0, vmax=vmax)
                _grid_ticks(ax, m, n)
                # Tick labels on the outer panels only: all panels share the grid, and many
                # layers (12 CLS) make hundreds of labels that cost more than the images.
                ax.tick_params(labelbottom=r == len(rows) - 1, labelleft=c == 0)
                if r == 0:
                    ax.set_title(f"class {cls}", fontsize="medium")
                if c == 0:
                    ax.set_ylabel(f"{layer}\n{_split_label(split)}")
        bar_h = min(0.6, 4.0 / height)
        cax = fig.add_axes((1 - 1.0 / width, 0.5 - bar_h / 2, 0.18 / width, bar_h))
        fig.colorbar(image, cax=cax, label="top-10 BMU hits")
        fig.suptitle(f"Top-10 BMUs per class on the {size} torus", y=1 - 0.15 / height)
    return fig




def plot_dclass(dclass: pd.DataFrame, *, size: str | None = None) -> Figure:
    """Per-class D_class per layer, SOM-tr vs SOM-val, as box plots (Fig 6A/B).

    Parameters
    ----------
    dclass : DataFrame
        Table ``dclass`` (layer, size, split, class, d_class, n_samples).
    size : str, optional
        SOM size; needed when the table holds several.

    Returns
    -------
    matplotlib.figure.Figure
        One box per (layer, split); each box summarises the classes.
    """
    df = _check(dclass, "dclass", ["layer", "size", "split", "class", "d_class"])
    df, size = _select_size(df, "dclass", size)
    df = _finite(df, "d_class").assign(layer=lambda d: d["layer"].astype(str),
                                       split=lambda d: d["split"].astype(str))
    layers = natural_sorted(df["layer"])
    splits = _split_order(df["split"])
    df = df.assign(split=df["split"].map(_split_label))
    with _style():
        fig = _new_figure(1.1 * len(layers) * max(1, len(splits)) ** 0.5 + 2.5, 3.8)
        ax = fig.subplots()
        _box(ax, df, x="layer", y="d_class", hue="split", order=layers,
             hue_order=[_split_label(s) for s in splits])
        ax.set_xlabel("layer")
        ax.set_ylabel(f"D_class ({_GRID_UNIT})")
        ax.set_title(f"Distance of BMUs to their class centre, SOM {size}")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title=None)
    return fig


def load_weight_distances(run: Run | str | os.PathLike, size: str) -> dict[str, np.ndarray]:
    """The G×G unit-weight cosine-distance matrices of one SOM size, by layer (file stem).

    Reads ``run.analysis_dir / "weight_distances" / "<layer>-<size>.npy"``; returns ``{}`` when
    there are none.
    """
    run = run if isinstance(run, Run) else Run(run)
    folder = run.analysis_dir / "weight_distances"
    out = {}
    if folder.is_dir():
        suffix = f"-{size}"
        for p in sorted(folder.glob(f"*{suffix}.npy")):
            out[p.stem[: -len(suffix)]] = np.load(p, mmap_mode="r")
    return {k: out[k] for k in sorted(out, key=natural_key)}


def weight_distance_sizes(run: Run | str | os.PathLike) -> list[str]:
    """SOM sizes that have weight-distance matrices in ``run``."""
    run = run if isinstance(run, Run) else Run(run)
    folder = run.analysis_dir / "weight_distances"
    if not folder.is_dir():
        return []
    sizes = []
    for p in folder.glob("*.npy"):
        m = re.search(r"-(\d+x\d+)$", p.stem)
        if m:
            sizes.append(m.group(1))
    return natural_sorted(sizes)


def plot_weight_distances(matrices: Mapping[str, np.ndarray], *, size: str = "",
                          col_wrap: int = 6) -> Figure:
    """Heatmaps of the G×G cosine distances between unit weights, one per layer (Fig 6C/D).

    Parameters
    ----------
    matrices : mapping layer -> array [G, G]
        E.g. from :func:`load_weight_distances`.
    size : str
        SOM size for the title.
    col_wrap : int
        Panels per row.

    Returns
    -------
    matplotlib.figure.Figure
        Shared colour scale over all layers.
    """
    if not matrices:
        raise AnalysisError("no weight-distance matrices to plot: run `somprobe analyze`")
    layers = sorted(matrices, key=natural_key)
    mats = {}
    for layer in layers:
        a = np.asarray(matrices[layer], dtype=np.float32)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise AnalysisError(
                f"weight distances of layer {layer!r} have shape {a.shape}, expected a square "
                "G×G matrix: re-run `somprobe analyze`"
            )
        mats[layer] = np.where(np.isfinite(a), a, np.nan)
    vmin, vmax = _range(np.concatenate([a.ravel() for a in mats.values()]))
    ncols = max(1, min(len(layers), col_wrap))
    nrows = int(np.ceil(len(layers) / ncols))
    with _style():
        fig = _new_figure(2.6 * ncols + 1.0, 2.6 * nrows + 0.6)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        image = None
        for i, ax in enumerate(axes.ravel()):
            if i >= len(layers):
                ax.set_visible(False)
                continue
            a = mats[layers[i]]
            image = _heat(ax, a, cmap=_DISTANCE_CMAP, vmin=vmin, vmax=vmax)
            ax.set_title(layers[i], fontsize="medium")
            g = a.shape[0]
            ticks = np.arange(0, g, max(1, int(np.ceil(g / 4))))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(length=2, labelsize="small")
            ax.set_xlabel("unit")
            if i % ncols == 0:
                ax.set_ylabel("unit")
        fig.colorbar(image, ax=[a for a in axes.ravel() if a.get_visible()], shrink=0.8,
                     label="cosine distance between unit weights")
        fig.suptitle(f"Unit-weight cosine distances, SOM {size}" if size
                     else "Unit-weight cosine distances")
    return fig


def _interval_plot(ax, df, *, x, hue, mid, lo, hi, order, hue_order, outer=None):
    """Point at ``mid`` with a bar from ``lo`` to ``hi`` (precomputed), dodged by ``hue``."""
    palette = sns.color_palette(_PALETTE, len(hue_order))
    width = 0.6
    offsets = (np.arange(len(hue_order)) - (len(hue_order) - 1) / 2) * (
        width / max(1, len(hue_order)))
    pos = {k: i for i, k in enumerate(order)}
    for h, colour, off in zip(hue_order, palette, offsets):
        sub = df[df[hue] == h]
        sub = sub[sub[x].isin(pos)]
        sub = sub.iloc[np.argsort([pos[v] for v in sub[x]], kind="stable")]
        xs = np.array([pos[v] for v in sub[x]], dtype=float) + off
        y = sub[mid].to_numpy(float)
        if outer is not None:
            ax.vlines(xs, sub[outer[0]].to_numpy(float), sub[outer[1]].to_numpy(float),
                      color=colour, linewidth=0.8, alpha=0.6)
        yerr = np.vstack([y - sub[lo].to_numpy(float), sub[hi].to_numpy(float) - y])
        ax.errorbar(xs, y, yerr=np.abs(yerr), fmt="o-", color=colour, capsize=3, markersize=5,
                    linewidth=1.2, label=str(h))
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels([str(o) for o in order])
    ax.set_xlim(-0.6, len(order) - 0.4)


def plot_weight_similarity(weight_similarity: pd.DataFrame) -> Figure:
    """Median (IQR bar, 5–95 % line) cosine distance between unit weights per layer and size.

    Parameters
    ----------
    weight_similarity : DataFrame
        Table ``weight_similarity`` (layer, size, mean, median, std, q05, q25, q75, q95).

    Returns
    -------
    matplotlib.figure.Figure
    """
    cols = ["layer", "size", "median", "q25", "q75"]
    df = _check(weight_similarity, "weight_similarity", cols)
    df = df.assign(layer=df["layer"].astype(str), size=df["size"].astype(str))
    for c in ("median", "q25", "q75", "q05", "q95"):
        if c in df:
            df = _finite(df, c)
    if df.empty:
        raise AnalysisError("table 'weight_similarity' is empty: run `somprobe analyze`")
    layers = natural_sorted(df["layer"])
    sizes = natural_sorted(df["size"])
    outer = ("q05", "q95") if {"q05", "q95"} <= set(df.columns) else None
    with _style():
        fig = _new_figure(0.9 * len(layers) + 3.0, 3.6)
        ax = fig.subplots()
        _interval_plot(ax, df, x="layer", hue="size", mid="median", lo="q25", hi="q75",
                       order=layers, hue_order=sizes, outer=outer)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine distance between unit weights")
        ax.set_title("Unit-weight similarity (median, IQR" + (", 5–95 %)" if outer else ")"))
        ax.legend(title="SOM size", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_centre_similarity(centre_similarity: pd.DataFrame) -> Figure:
    """Cosine distance between the weights of class-centre units per layer, hue = SOM size
    (Fig 7 / Fig 10).

    Parameters
    ----------
    centre_similarity : DataFrame
        Table ``centre_similarity`` (layer, size, class_a, class_b, ..., cosine_distance).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(centre_similarity, "centre_similarity", ["layer", "size", "cosine_distance"])
    df = _finite(df, "cosine_distance").assign(layer=lambda d: d["layer"].astype(str),
                                               size=lambda d: d["size"].astype(str))
    if df.empty:
        raise AnalysisError("table 'centre_similarity' is empty: run `somprobe analyze`")
    layers = natural_sorted(df["layer"])
    sizes = natural_sorted(df["size"])
    with _style():
        fig = _new_figure(0.8 * len(layers) * max(1, len(sizes)) ** 0.5 + 2.8, 3.8)
        ax = fig.subplots()
        _box(ax, df, x="layer", y="cosine_distance", hue="size", order=layers, hue_order=sizes)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine distance between\nclass-centre unit weights")
        ax.set_title("Similarity of class-centre units")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="SOM size")
    return fig


def _correct_label(v) -> str | float:
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1", "yes", "correct"):
            return "correct"
        if s in ("false", "0", "no", "incorrect"):
            return "incorrect"
        return np.nan
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return np.nan
    return "correct" if bool(v) else "incorrect"


def plot_correct_incorrect(table: pd.DataFrame, *, size: str | None = None,
                           split: str = "som-val") -> Figure:
    """D_class to the label's centre per layer, correct vs incorrect predictions (Supp 3).

    Parameters
    ----------
    table : DataFrame
        Either ``dclass_samples`` (layer, size, split, correct, d_class; drawn as box plots) or
        the summary ``correct_incorrect`` (layer, size, correct, median, q25, q75; drawn as
        median with IQR bars).
    size : str, optional
        SOM size; needed when the table holds several.
    split : str
        Split of ``dclass_samples`` to show (the paper uses SOM-val).

    Returns
    -------
    matplotlib.figure.Figure
    """
    per_sample = "d_class" in table.columns
    if per_sample:
        df = _check(table, "dclass_samples", ["layer", "size", "split", "correct", "d_class"])
        df = df[df["split"].astype(str) == split]
        if df.empty:
            raise AnalysisError(
                f"table 'dclass_samples' has no rows for split {split!r}: run `somprobe analyze` "
                "with a SOM-val code store (`somprobe extract --split som-val`)"
            )
        df, size = _select_size(df, "dclass_samples", size)
        df = _finite(df, "d_class")
    else:
        df = _check(table, "correct_incorrect", ["layer", "size", "correct", "median", "q25", "q75"])
        df, size = _select_size(df, "correct_incorrect", size)
        for c in ("median", "q25", "q75"):
            df = _finite(df, c)
    df = df.assign(layer=df["layer"].astype(str), correct=df["correct"].map(_correct_label))
    df = df[df["correct"].notna()]
    layers = natural_sorted(df["layer"])
    hue_order = [h for h in ("correct", "incorrect") if h in set(df["correct"])]
    if not layers:
        raise AnalysisError("no correct/incorrect rows to plot: run `somprobe analyze`")
    with _style():
        fig = _new_figure(0.9 * len(layers) + 3.0, 3.8)
        ax = fig.subplots()
        if per_sample:
            _box(ax, df, x="layer", y="d_class", hue="correct", order=layers, hue_order=hue_order)
        else:
            _interval_plot(ax, df, x="layer", hue="correct", mid="median", lo="q25", hi="q75",
                           order=layers, hue_order=hue_order)
            ax.legend()
        ax.set_xlabel("layer")
        ax.set_ylabel(f"D_class to label centre\n({_GRID_UNIT})")
        ax.set_title(f"{_split_label(split)}: correct vs incorrect predictions, SOM {size}")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="prediction")
    return fig



def figure_jobs(run: Run, *, want: set[str] | None = None,
                classes: Sequence[int] | None = None, **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for every study-003 figure whose table exists in ``run``."""
    def pick(df):
        return [s for s in sizes_of(df) if want is None or s in want]

    jobs: list[tuple[str, callable]] = []
    curves = read_table(run.curves_csv)
    if curves is not None:
        if want is not None and "size" in curves.columns:
            curves = curves[curves["size"].astype(str).isin(want)]
        if not curves.empty:
            jobs.append(("curves", lambda d=curves: plot_curves(d)))
    tables = {name: read_table(run.table(name)) for name in (
        "density", "class_bmus", "dclass", "dclass_samples", "correct_incorrect",
        "weight_similarity", "centre_similarity")}
    per_size = [
        ("density", "density", lambda d, s: plot_density(d, size=s)),
        ("class_bmus", "class-bmus", lambda d, s: plot_class_bmus(d, size=s, classes=classes)),
        ("dclass", "dclass", lambda d, s: plot_dclass(d, size=s)),
    ]
    for table, prefix, fn in per_size:
        df = tables[table]
        if df is not None:
            for s in pick(df):
                jobs.append((f"{prefix}-{s}", lambda d=df, s=s, fn=fn: fn(d, s)))
    for s in weight_distance_sizes(run):
        if want is None or s in want:
            jobs.append((f"weight-distances-{s}",
                         lambda s=s: plot_weight_distances(load_weight_distances(run, s), size=s)))
    for table, name, fn in (("weight_similarity", "weight-similarity", plot_weight_similarity),
                            ("centre_similarity", "centre-similarity", plot_centre_similarity)):
        df = tables[table]
        if df is not None and want is not None and "size" in df.columns:
            df = df[df["size"].astype(str).isin(want)]
        if df is not None and not df.empty:
            jobs.append((name, lambda d=df, fn=fn: fn(d)))
    samples = tables["dclass_samples"]
    if samples is not None and "split" in samples.columns:
        samples = samples[samples["split"].astype(str) == "som-val"]
    ci = samples if samples is not None and not samples.empty else tables["correct_incorrect"]
    if ci is not None:
        for s in pick(ci):
            jobs.append((f"correct-incorrect-{s}", lambda d=ci, s=s: plot_correct_incorrect(d, size=s)))
    return jobs

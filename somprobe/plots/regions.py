"""Barrier-bypass and region-path figures (studies 000 and 002) and the convexity curve.

Drawn from the tables of ``somprobe connect`` (``paths/<name>/paths.csv``, ``pairs.csv``,
``profiles.csv``) and ``somprobe convexity`` (``paths/<name>/convexity_summary.csv``). Pairs are
grouped by *setting*, the pair source of their experiment: natural–natural (``same-class``),
natural–adversarial (``adversarial:<attack>``), natural–noise-adversarial, noise-optimal.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..run import Run
from .common import _PALETTE, _check, _empty_panel, _finite, _new_figure, _style, natural_sorted, read_table

__all__ = ["plot_barrier_profiles", "plot_barrier_gaps", "plot_barrier_rounds", "plot_region_paths",
           "plot_convexity", "setting_label", "method_rows", "figure_jobs", "GAP_FLOOR"]

#: Barrier gaps are drawn on a log axis; gaps at or below this (a flat line) are drawn at it.
GAP_FLOOR = 1e-6
_DELTA = 1e-3   # study 000's threshold, drawn as a reference line


def setting_label(source) -> str:
    """Readable name of a pair source: ``same-class`` → ``natural–natural`` ..."""
    s = str(source)
    if s == "same-class":
        return "natural–natural"
    if s.startswith("adversarial:"):
        return f"natural–adversarial ({s.split(':', 1)[1]})"
    if s == "noise-adversarial":
        return "natural–adversarial from noise"
    if s == "noise-optimal":
        return "noise-optimal (class-optimal from noise)"
    return s


def _settings(df: pd.DataFrame) -> list[str]:
    vals = natural_sorted(df["setting"])
    first = [v for v in vals if v.startswith("natural–natural")]
    return first + [v for v in vals if v not in first]


def plot_barrier_profiles(profiles: pd.DataFrame, *, max_pairs: int = 4) -> Figure:
    """Loss along the straight line and along the found paths, one panel per pair (study 000 Fig 3).

    Parameters
    ----------
    profiles : DataFrame
        ``profiles.csv`` of one experiment (pair, space, method, t, loss).
    max_pairs : int
        Panels drawn (the first pairs of the table).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(profiles, "profiles", ["pair", "space", "method", "t", "loss"])
    df = _finite(df, "loss")
    df = df.assign(loss=df["loss"].clip(lower=GAP_FLOOR), method=df["method"].astype(str))
    pairs = list(dict.fromkeys(df["pair"].astype(str)))[:max_pairs]
    spaces = natural_sorted(df["space"].astype(str))
    methods = natural_sorted(df["method"])
    palette = dict(zip(methods, sns.color_palette(_PALETTE, len(methods))))
    with _style():
        fig = _new_figure(3.4 * max(len(pairs), 1) + 1.5, 2.9 * len(spaces))
        axes = np.atleast_2d(fig.subplots(len(spaces), max(len(pairs), 1), squeeze=False))
        for i, space in enumerate(spaces):
            for j, pair in enumerate(pairs or [None]):
                ax = axes[i, j]
                d = df[(df["space"].astype(str) == space) & (df["pair"].astype(str) == str(pair))]
                if d.empty:
                    _empty_panel(ax)
                    continue
                sns.lineplot(data=d, x="t", y="loss", hue="method", hue_order=methods, palette=palette,
                             style="method", ax=ax, estimator=None, sort=True, legend=(i == 0 and j == 0))
                ax.set_yscale("log")
                ax.axhline(_DELTA, color="0.6", lw=0.7, ls=":")
                ax.set_xlabel("position along the path (arc length)")
                ax.set_ylabel(f"cross-entropy ({space})" if j == 0 else "")
                ax.set_title(str(pair)[:40], fontsize="small")
        if pairs and axes[0, 0].get_legend() is not None:
            sns.move_legend(axes[0, 0], "upper left", bbox_to_anchor=(0.0, -0.25), ncol=len(methods),
                            title=None)
        fig.suptitle("Loss along the straight line and the found paths")
    return fig


def plot_barrier_gaps(barriers: pd.DataFrame) -> Figure:
    """Barrier gap of the straight segment per setting (study 000 Fig 5–6 left).

    Parameters
    ----------
    barriers : DataFrame
        ``paths.csv`` rows of method ``barrier`` with a ``setting`` column (space, barrier_gap).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(barriers, "barriers", ["setting", "space", "barrier_gap"])
    df = _finite(df, "barrier_gap")
    df = df.assign(barrier_gap=df["barrier_gap"].clip(lower=GAP_FLOOR), space=df["space"].astype(str))
    settings = _settings(df)
    spaces = natural_sorted(df["space"])
    with _style():
        fig = _new_figure(1.6 * len(spaces) * max(1, len(settings)) ** 0.5 + 3.5, 3.8)
        ax = fig.subplots()
        if df["barrier_gap"].notna().any():
            palette = dict(zip(settings, sns.color_palette(_PALETTE, len(settings))))
            sns.boxplot(data=df, x="space", y="barrier_gap", hue="setting", order=spaces,
                        hue_order=settings, palette=palette, ax=ax, fliersize=0, linewidth=0.9)
            sns.stripplot(data=df, x="space", y="barrier_gap", hue="setting", order=spaces,
                          hue_order=settings, palette=palette, ax=ax, dodge=True, size=2.5,
                          alpha=0.6, legend=False)
            ax.set_yscale("log")
            ax.axhline(_DELTA, color="0.4", lw=0.8, ls="--")
            ax.text(1.0, _DELTA, " δ = 0.001", transform=ax.get_yaxis_transform(), va="center",
                    fontsize="small", color="0.3")
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.08, 1.0), title="pairs")
        else:
            _empty_panel(ax)
        ax.set_xlabel("space")
        ax.set_ylabel(f"barrier gap of the straight line\n(log; ≤ {GAP_FLOOR:g} drawn at it)")
        ax.set_title("Barrier gap: highest loss − max(L(A), L(C))")
    return fig


def plot_barrier_rounds(barriers: pd.DataFrame) -> Figure:
    """How many rounds and segments the bypass needed, per setting (study 000 Fig 5).

    Parameters
    ----------
    barriers : DataFrame
        ``paths.csv`` rows of method ``barrier`` with a ``setting`` column (rounds, segments).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(barriers, "barriers", ["setting", "rounds", "segments"]).copy()
    settings = _settings(df)
    palette = dict(zip(settings, sns.color_palette(_PALETTE, len(settings))))
    with _style():
        fig = _new_figure(9.5, 3.6)
        axes = fig.subplots(1, 2)
        for ax, col, label in ((axes[0], "rounds", "rounds of bypassing"),
                               (axes[1], "segments", "segments of the final path")):
            vals = pd.to_numeric(df[col], errors="coerce")
            d = df.assign(**{col: vals}).dropna(subset=[col])
            if d.empty:
                _empty_panel(ax)
                continue
            d[col] = d[col].astype(int)
            order = list(range(int(d[col].min()), int(d[col].max()) + 1))
            sns.countplot(data=d, x=col, hue="setting", order=order, hue_order=settings,
                          palette=palette, ax=ax, legend=ax is axes[1])
            ax.set_xlabel(label)
            ax.set_ylabel("pairs")
        if axes[1].get_legend() is not None:
            sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.0, 1.0), title="pairs")
        fig.suptitle("Barrier bypass: rounds and segments")
    return fig


def plot_region_paths(regions: pd.DataFrame) -> Figure:
    """Anchors and length ratio D(p) of region paths per scenario (study 002).

    Parameters
    ----------
    regions : DataFrame
        ``paths.csv`` rows of method ``regions`` with a ``setting`` column (anchors,
        length_ratio, success).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(regions, "regions", ["setting", "anchors", "length_ratio"])
    df = _finite(_finite(df, "anchors"), "length_ratio")
    df = df.assign(excess=(df["length_ratio"] - 1.0).clip(lower=1e-12))
    settings = _settings(df)
    palette = dict(zip(settings, sns.color_palette(_PALETTE, len(settings))))
    with _style():
        fig = _new_figure(3.2 * 2 + 1.2 * len(settings), 4.2)
        axes = fig.subplots(1, 2)
        for ax, col, label, log in ((axes[0], "anchors", "anchor points (ends included)", False),
                                    (axes[1], "excess", "D(p) − 1 (log; ≤ 1e-12 drawn at it)", True)):
            if df[col].notna().any():
                sns.boxplot(data=df, x="setting", y=col, hue="setting", order=settings,
                            hue_order=settings, palette=palette, ax=ax, fliersize=0, linewidth=0.9,
                            legend=False)
                sns.stripplot(data=df, x="setting", y=col, order=settings, color="0.25", size=2.5,
                              alpha=0.6, ax=ax)
                if log:
                    ax.set_yscale("log")
            else:
                _empty_panel(ax)
            ax.set_xlabel("")
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=20)
        fig.suptitle("Region paths (Algorithm 1): anchors and length ratio per scenario")
    return fig


def plot_convexity(summary: pd.DataFrame) -> Figure:
    """Share of convex combinations of k same-class inputs that keep the class (study 002).

    Parameters
    ----------
    summary : DataFrame
        ``convexity_summary.csv`` (space, k, share_in_class).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(summary, "convexity_summary", ["space", "k", "share_in_class"])
    df = df.assign(space=df["space"].astype(str))
    spaces = natural_sorted(df["space"])
    with _style():
        fig = _new_figure(5.8, 3.8)
        ax = fig.subplots()
        sns.lineplot(data=df, x="k", y="share_in_class", hue="space", hue_order=spaces, marker="o",
                     palette=_PALETTE, ax=ax, estimator=None)
        ax.set_ylim(0, 1.04)
        ax.set_xlabel("k (images combined)")
        ax.set_ylabel("share labelled in the class")
        ax.set_title("Convex combinations of k same-class inputs")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "lower left", title="space")
    return fig


def _experiments(run: Run) -> list[tuple[str, pd.DataFrame | None, pd.DataFrame | None]]:
    root = run.paths_root
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        out.append((d.name, read_table(d / "paths.csv"), read_table(d / "pairs.csv")))
    return out


def method_rows(run: Run, method: str) -> pd.DataFrame | None:
    """``paths.csv`` rows of ``method`` from every ``connect`` experiment of ``run``, with the
    ``setting`` of their pair source and the ``experiment`` name (None when there are none)."""
    frames = []
    for name, paths, pairs in _experiments(run):
        if paths is None or "method" not in paths.columns:
            continue
        rows = paths[paths["method"].astype(str) == method]
        if rows.empty:
            continue
        source = pairs["source"].iloc[0] if pairs is not None and "source" in pairs.columns else name
        frames.append(rows.assign(setting=setting_label(source), experiment=name))
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    # Two experiments with the same setting stay apart.
    dup = df.groupby("setting")["experiment"].transform("nunique") > 1
    df.loc[dup, "setting"] = df.loc[dup, "setting"] + " [" + df.loc[dup, "experiment"] + "]"
    return df


def figure_jobs(run: Run, **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for every barrier / region / convexity figure whose tables exist."""
    jobs = []
    for name, paths, _pairs in _experiments(run):
        prof = read_table(run.paths_dir(name) / "profiles.csv")
        if paths is not None and prof is not None and "method" in prof.columns and \
                prof["method"].astype(str).isin(["barrier", "regions"]).any():
            jobs.append((f"barrier-profiles-{name}", lambda d=prof: plot_barrier_profiles(d)))
    barriers = method_rows(run, "barrier")
    if barriers is not None and {"barrier_gap", "rounds", "segments"} <= set(barriers.columns):
        jobs.append(("barrier-gaps", lambda d=barriers: plot_barrier_gaps(d)))
        jobs.append(("barrier-rounds", lambda d=barriers: plot_barrier_rounds(d)))
    regions = method_rows(run, "regions")
    if regions is not None and {"anchors", "length_ratio"} <= set(regions.columns):
        jobs.append(("region-paths", lambda d=regions: plot_region_paths(d)))
    summaries = []
    if run.paths_root.is_dir():
        for d in sorted(p for p in run.paths_root.iterdir() if p.is_dir()):
            s = read_table(d / "convexity_summary.csv")
            if s is not None:
                summaries.append(s.assign(space=s["space"].astype(str) + ("" if d.name == "convexity" else f" [{d.name}]")))
    if summaries:
        jobs.append(("convexity", lambda d=pd.concat(summaries, ignore_index=True): plot_convexity(d)))
    return jobs

"""Connectivity figures (study 001): softmax bars along a straight vs an NEB path, the loss along
the paths, and Table 1 as bars.

Drawn only from what ``somprobe connect`` wrote under ``paths/<name>/``: ``profiles.csv``,
``table1.csv`` and ``images/<space>__<method>.npz`` (pixels in the input space, decoded latents
where a decoder exists).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import AnalysisError
from ..run import Run
from .common import _PALETTE, _check, _new_figure, _style, natural_sorted, read_table

__all__ = ["plot_path_softmax", "plot_path_loss", "plot_table1", "read_images", "pick_pair",
           "figure_jobs"]

_TABLE1_PARTS = (("linear", "linear path"), ("nonlinear_only", "non-linear path only"),
                 ("no_path", "no path found"))
_TARGET_COLOUR = "#d62728"  # the study's red for the target class
_OTHER_COLOUR = "#9aa5b1"


def _spaces(values) -> list[str]:
    vals = list(dict.fromkeys(str(v) for v in values))
    return (["input"] if "input" in vals else []) + natural_sorted(v for v in vals if v != "input")


def read_images(directory: str | Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """The images along paths saved by ``somprobe connect`` (``(space key, method) → arrays``)."""
    d = Path(directory) / "images"
    out = {}
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*__*.npz")):
        space, method = f.stem.rsplit("__", 1)
        try:
            with np.load(f, allow_pickle=False) as z:
                out[(space, method)] = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise AnalysisError(f"cannot read {f}: {e}; re-run `somprobe connect` with --overwrite") from e
    return out


def pick_pair(profiles: pd.DataFrame, space: str) -> str | None:
    """The pair to show for ``space``: the first whose straight line leaves the class while a
    non-linear path stays in it (the study's examples), else the first pair."""
    df = profiles[profiles["space"].astype(str) == space]
    if df.empty:
        return None
    for pair in dict.fromkeys(df["pair"]):
        rows = df[df["pair"] == pair]
        target = _target_of(rows)
        lin = rows[rows["method"] == "linear"]
        other = rows[rows["method"] != "linear"]
        if lin.empty or other.empty:
            continue
        if (lin["pred"] != target).any() and other.groupby("method")["pred"].apply(
                lambda s: bool((s == target).all())).any():
            return str(pair)
    return str(df["pair"].iloc[0])


def _target_of(rows: pd.DataFrame) -> int:
    if "class" in rows.columns:
        return int(rows["class"].iloc[0])
    # Older tables: at t = 0 the path sits on the first image, correctly classified by
    # construction, so the prediction there is the target.
    return int(rows.sort_values("t")["pred"].iloc[0])


def plot_path_softmax(profiles: pd.DataFrame, *, space: str, pair: str | None = None,
                      images: dict | None = None, n_show: int = 8,
                      class_names=None) -> Figure:
    """Softmax bars at points along the straight line and along each other path of one pair
    (study 001 Figs. 2–3), target class in red; images above the bars when given.

    Parameters
    ----------
    profiles : DataFrame
        ``profiles.csv`` (pair, space, method, t, pred, p_target, loss, p_0..p_{C-1}).
    space : str
    pair : str, optional
        Default :func:`pick_pair`.
    images : dict, optional
        ``{method: {"images": uint8 [P, n, 3, S, S], "t": [P, n], "pair": [P]}}`` (from
        :func:`read_images`); rows without images for the pair are drawn without.
    n_show : int
        Points per path when there are no images (evenly spaced in t).
    class_names : sequence of str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(profiles, "profiles", ["pair", "space", "method", "t", "pred", "p_target"])
    df = df[df["space"].astype(str) == str(space)]
    if df.empty:
        raise AnalysisError(f"no profiles for space {space!r}: run `somprobe connect --space {space}`")
    pair = pair or pick_pair(df, space)
    df = df[df["pair"].astype(str) == str(pair)]
    if df.empty:
        raise AnalysisError(f"no profiles for pair {pair!r} in space {space!r}")
    cols = sorted((c for c in df.columns if c.startswith("p_") and c[2:].isdigit()), key=lambda c: int(c[2:]))
    if not cols:
        raise AnalysisError("profiles.csv has no per-class columns p_0.. : re-run `somprobe connect`")
    target = _target_of(df)
    methods = ["linear"] + [m for m in dict.fromkeys(df["method"].astype(str)) if m != "linear"]
    methods = [m for m in methods if (df["method"] == m).any()]
    images = images or {}
    rows = []
    for m in methods:
        im = images.get(m)
        sel = None
        if im is not None:
            hit = np.flatnonzero(np.asarray(im["pair"]).astype(str) == str(pair))
            sel = (im["images"][hit[0]], im["t"][hit[0]]) if len(hit) else None
        rows.append((m, sel))
    n = max([len(s[1]) for _, s in rows if s is not None] + [n_show])
    has_img = any(s is not None for _, s in rows)
    with _style():
        fig = _new_figure(1.25 * n + 1.2, sum(2.4 if s is not None else 1.3 for _, s in rows) + 0.6)
        heights = []
        for _, s in rows:
            heights += [1.0, 0.9] if s is not None else [0.9]
        axes = fig.subplots(len(heights), n, squeeze=False, gridspec_kw={"height_ratios": heights})
        r = 0
        for m, s in rows:
            prof = df[df["method"] == m].sort_values("t")
            ts = s[1] if s is not None else np.linspace(0, 1, n)
            if s is not None:
                for j in range(n):
                    ax = axes[r, j]
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if j < len(ts):
                        img = np.asarray(s[0][j])
                        img = img.transpose(1, 2, 0) if img.ndim == 3 else img
                        if img.ndim == 3 and img.shape[2] == 3 and np.ptp(img.astype(np.int16), axis=2).max() == 0:
                            img = img[..., 0]
                        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255,
                                  interpolation="nearest")
                    else:
                        ax.axis("off")
                r += 1
            for j in range(n):
                ax = axes[r, j]
                if j >= len(ts):
                    ax.axis("off")
                    continue
                row = prof.iloc[int(np.argmin(np.abs(prof["t"].to_numpy() - ts[j])))]
                probs = row[cols].to_numpy(dtype=float)
                colours = [_TARGET_COLOUR if int(c[2:]) == target else _OTHER_COLOUR for c in cols]
                ax.bar(np.arange(len(cols)), probs, color=colours, width=0.85)
                ax.set_ylim(0, 1.02)
                ax.set_xticks([])
                ax.set_yticks([0, 1] if j == 0 else [])
                ok = int(row["pred"]) == target
                ax.set_title(f"t={row['t']:.2f}" + ("" if ok else " ✗"), fontsize="x-small",
                             color="black" if ok else _TARGET_COLOUR)
                if j == 0:
                    ax.set_ylabel(m, fontsize="small")
            r += 1
        name = class_names[target] if class_names is not None and target < len(class_names) else target
        fig.suptitle(f"{space}: softmax along the paths of pair {pair} (target {name} in red"
                     + ("; images decoded" if has_img and space != "input" else "") + ")", fontsize="small")
    return fig


def plot_path_loss(profiles: pd.DataFrame) -> Figure:
    """Cross-entropy of the target along t, one panel per space, one line per pair and method."""
    df = _check(profiles, "profiles", ["pair", "space", "method", "t", "loss"]).copy()
    if df.empty:
        raise AnalysisError("profiles.csv is empty: run `somprobe connect`")
    df["space"] = df["space"].astype(str)
    spaces = _spaces(df["space"])
    methods = list(dict.fromkeys(["linear"] + list(df["method"].astype(str))))
    methods = [m for m in methods if (df["method"] == m).any()]
    with _style():
        fig = _new_figure(3.0 * len(spaces) + 1.8, 3.4)
        axes = fig.subplots(1, len(spaces), squeeze=False, sharey=True)[0]
        for ax, sp in zip(axes, spaces):
            sns.lineplot(data=df[df["space"] == sp], x="t", y="loss", hue="method", hue_order=methods,
                         units="pair", estimator=None, palette=sns.color_palette(_PALETTE, len(methods)), lw=1, ax=ax,
                         legend=sp == spaces[-1])
            ax.axhline(np.log(2), color="0.5", lw=0.8, ls=":")
            ax.set_title(sp)
            ax.set_xlabel("t (arc length)")
            ax.set_ylabel("cross-entropy of the target")
        if axes[-1].get_legend() is not None:
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.0, 1.0), title=None)
        fig.suptitle("Loss along the paths (dotted: ln 2, above it the target may lose)", fontsize="small")
    return fig


def plot_table1(table1: pd.DataFrame, *, study: dict | None = None) -> Figure:
    """Study 001's Table 1 as stacked bars per space: linear / non-linear only / no path."""
    df = _check(table1, "table1", ["space", "pairs", "linear", "nonlinear_only", "no_path"]).copy()
    if df.empty:
        raise AnalysisError("table1.csv is empty: run `somprobe connect`")
    df["space"] = df["space"].astype(str)
    order = _spaces(df["space"])
    df = df.set_index("space").loc[order]
    with _style():
        fig = _new_figure(1.0 * len(order) + 3.0, 3.4)
        ax = fig.subplots()
        bottom = np.zeros(len(order))
        for (col, label), colour in zip(_TABLE1_PARTS, sns.color_palette(_PALETTE, len(_TABLE1_PARTS))):
            vals = pd.to_numeric(df[col], errors="coerce").fillna(0).to_numpy(dtype=float)
            ax.bar(order, vals, bottom=bottom, label=label, color=colour)
            for x, (v, b) in enumerate(zip(vals, bottom)):
                if v:
                    ax.text(x, b + v / 2, f"{int(v)}", ha="center", va="center", fontsize="small", color="white")
            bottom += vals
        ax.set_ylabel("pairs")
        ax.set_xlabel("space")
        ax.set_title("Table 1: are same-class pairs connected?")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def _experiments(run: Run) -> list[Path]:
    root = run.paths_root
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "table1.csv").is_file()]


def figure_jobs(run: Run, **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for the connectivity figures of every ``connect`` experiment."""
    jobs = []
    classes = None
    if run.model_meta.is_file():
        import json

        classes = json.loads(run.model_meta.read_text()).get("classes")
    for d in _experiments(run):
        name = d.name
        t1 = read_table(d / "table1.csv")
        if t1 is not None and {"nonlinear_only", "no_path"} <= set(t1.columns):
            jobs.append((f"paths-{name}-table1", lambda t=t1: plot_table1(t)))
        prof = read_table(d / "profiles.csv")
        if prof is None or "method" not in prof.columns:
            continue
        prof = prof[prof["method"].astype(str).isin(["linear", "neb"])]
        if prof.empty:
            continue
        jobs.append((f"paths-{name}-loss", lambda p=prof: plot_path_loss(p)))
        imgs = read_images(d)
        for sp in _spaces(prof["space"]):
            key = sp.replace(":", "-").replace("/", "-")
            per_method = {m: v for (s, m), v in imgs.items() if s == key}
            jobs.append((f"paths-{name}-softmax-{key}",
                         lambda p=prof, s=sp, im=per_method: plot_path_softmax(p, space=s, images=im,
                                                                                class_names=classes)))
    return jobs

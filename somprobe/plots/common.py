"""Shared style, ordering, validation and saving for every figure module of :mod:`somprobe.plots`.

Figures are built on bare :class:`~matplotlib.figure.Figure` objects (the Agg canvas), never
through pyplot, so no window can open and no global figure registry fills up in long runs.
"""
from __future__ import annotations

import io
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import AnalysisError
from ..run import atomic_output


DPI = 180
# report size (issue 8): dense heat maps and huge figures are drawn coarser, see _dpi_for
DENSE_DPI = 110
DENSE_CELLS = 200 * 200
MAX_PIXELS = 6_000_000
MIN_DPI = 90
_PALETTE = "colorblind"
_DENSITY_CMAP = "viridis"
_COUNT_CMAP = "mako_r"      # light at zero: empty units stay pale
_DISTANCE_CMAP = "rocket_r"
_SPLIT_LABELS = {"som-tr": "SOM-tr", "som-val": "SOM-val"}
_GRID_UNIT = "torus distance, grid units"


# ordering -------------------------------------------------------------------------------------
def natural_key(value) -> list:
    """Sort key that orders embedded numbers by value: ``CL2`` before ``CL10``, ``10x10`` before
    ``20x20``. Even positions are text, odd positions integers, so any two keys compare."""
    parts = re.split(r"(\d+)", str(value))
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(parts)]


def natural_sorted(values: Iterable) -> list:
    """Unique ``values`` (NaN dropped) in natural order (see :func:`natural_key`)."""
    uniq = pd.unique(pd.Series(list(values)).dropna())
    return sorted(uniq, key=natural_key)


def _split_order(values: Iterable) -> list:
    # SOM-tr is the reference (centres come from it) so it always comes first, SOM-val next.
    vals = natural_sorted(values)
    first = [s for s in ("som-tr", "som-val") if s in vals]
    return first + [s for s in vals if s not in first]


def _perturbation_order(values: Iterable) -> list:
    vals = natural_sorted(values)
    adv = [v for v in vals if str(v).lower().startswith("adv")]
    noise = [v for v in vals if "noise" in str(v).lower() and v not in adv]
    return adv + noise + [v for v in vals if v not in adv and v not in noise]


def _split_label(split) -> str:
    return _SPLIT_LABELS.get(str(split), str(split))


# style and saving -----------------------------------------------------------------------------
def _rc() -> dict:
    rc = dict(sns.axes_style("ticks"))
    rc.update(sns.plotting_context("paper", font_scale=1.25))
    rc.update({
        "savefig.dpi": DPI, "figure.dpi": 100, "axes.spines.top": False,
        "axes.spines.right": False, "axes.titleweight": "bold", "legend.frameon": False,
        "image.cmap": _DENSITY_CMAP,
    })
    return rc


@contextmanager
def _style():
    # rc_context instead of sns.set_theme: the caller's global matplotlib state stays untouched.
    with mpl.rc_context(_rc()):
        yield


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(max(width, 3.0), max(height, 2.5)), layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (temporary file + rename) and close it.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure; it is cleared afterwards, even when writing fails.
    path : path-like
        Target ``.png``; parent folders are created.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    try:
        with atomic_output(path) as tmp, _style():
            buf = io.BytesIO()
            # fast, large intermediate PNG; the palette PNG below is what is kept
            fig.savefig(buf, format="png", dpi=_dpi_for(fig), bbox_inches="tight",
                        facecolor="white", pil_kwargs={"compress_level": 1})
            _write_palette_png(buf, tmp)
    finally:
        _close(fig)
    return path


def _dpi_for(fig: Figure) -> float:
    """Resolution of ``fig``: :data:`DPI`, lower for dense heat maps and very large figures.

    Heat maps with more cells than their panel has pixels (the G×G unit-weight distances) hold
    fine, noise-like detail that PNG cannot compress: drawn at :data:`DENSE_DPI` they cost a
    third of the bytes and show the same structure. No figure exceeds :data:`MAX_PIXELS`.
    """
    dpi = float(DPI)
    for ax in fig.axes:
        if any(np.size(im.get_array()) > DENSE_CELLS for im in ax.get_images()):
            dpi = min(dpi, DENSE_DPI)
    w, h = fig.get_size_inches()
    dpi = min(dpi, (MAX_PIXELS / max(w * h, 1e-9)) ** 0.5)
    return max(dpi, MIN_DPI)


def _write_palette_png(png: io.BytesIO, target) -> None:
    """Re-encode a rendered PNG with an adaptive 256-colour palette (no dithering).

    Figures use a few flat colours, anti-aliased text and 256-entry colour maps, so the palette
    loses nothing visible while the file shrinks three- to fivefold (reports stay small).
    """
    from PIL import Image

    png.seek(0)
    with Image.open(png) as im:
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                                         dither=Image.Dither.NONE)
    pal.save(target, format="PNG")


def _close(fig: Figure) -> None:
    if "matplotlib.pyplot" in sys.modules and getattr(fig.canvas, "manager", None) is not None:
        sys.modules["matplotlib.pyplot"].close(fig)
    else:
        fig.clear()


# validation -----------------------------------------------------------------------------------
def _check(df: pd.DataFrame, table: str, columns: Sequence[str]) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"table {table!r} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnalysisError(
            f"table {table!r} lacks column(s) {missing} (has {list(df.columns)}); it was written "
            "by another version of somprobe: re-run `somprobe analyze` to rewrite it"
        )
    return df


def _select_size(df: pd.DataFrame, table: str, size: str | None) -> tuple[pd.DataFrame, str]:
    sizes = natural_sorted(df["size"].astype(str))
    if not sizes:
        raise AnalysisError(f"table {table!r} has no rows: run `somprobe analyze` to fill it")
    if size is None:
        if len(sizes) > 1:
            raise AnalysisError(
                f"table {table!r} holds SOM sizes {sizes}: pass size= one of them"
            )
        size = sizes[0]
    size = str(size)
    out = df[df["size"].astype(str) == size]
    if out.empty:
        raise AnalysisError(
            f"table {table!r} has no rows for SOM size {size!r}; sizes present: {sizes}"
        )
    return out, size


def _finite(df: pd.DataFrame, column: str) -> pd.DataFrame:
    # inf would stretch the axis to nothing useful; seaborn drops NaN itself, so map inf to NaN.
    vals = pd.to_numeric(df[column], errors="coerce").replace([np.inf, -np.inf], np.nan)
    return df.assign(**{column: vals})


def _grid_shape(size: str, df: pd.DataFrame | None = None) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(size))
    if m:
        return int(m.group(1)), int(m.group(2))
    if df is not None and {"row", "col"} <= set(df.columns) and len(df):
        return int(df["row"].max()) + 1, int(df["col"].max()) + 1
    raise AnalysisError(f"SOM size {size!r} is not of the form '<m>x<n>' (e.g. '20x20')")


def _empty_panel(ax, text="no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _resolution(df: pd.DataFrame) -> int:
    """Evaluation points per grid unit of a density table (``row``/``col`` at multiples of 1/r,
    see ``analysis.density.density_points``); 1 for unit centres."""
    pos = np.unique(np.concatenate([pd.to_numeric(df["row"], errors="coerce").to_numpy(float),
                                    pd.to_numeric(df["col"], errors="coerce").to_numpy(float)]))
    pos = pos[np.isfinite(pos)]
    step = np.diff(pos)
    step = step[step > 1e-9]
    return max(1, int(round(1.0 / step.min()))) if step.size and step.min() < 1 else 1


def _grid_matrix(df: pd.DataFrame, value: str, m: int, n: int, fill=np.nan,
                 resolution: int = 1) -> np.ndarray:
    """Place ``value`` at (row, col) on an (m·r)×(n·r) array, r = ``resolution``; positions
    absent from ``df`` get ``fill``."""
    k = int(resolution)
    mat = np.full((m * k, n * k), fill, dtype=float)
    if len(df):
        rf = pd.to_numeric(df["row"], errors="coerce").to_numpy(float) * k
        cf = pd.to_numeric(df["col"], errors="coerce").to_numpy(float) * k
        r = np.rint(np.nan_to_num(rf, nan=-1.0)).astype(np.int64)
        c = np.rint(np.nan_to_num(cf, nan=-1.0)).astype(np.int64)
        ok = ((r >= 0) & (r < m * k) & (c >= 0) & (c < n * k)
              & (np.abs(rf - r) < 1e-6) & (np.abs(cf - c) < 1e-6))
        if not ok.all():
            bad = np.flatnonzero(~ok)[0]
            raise AnalysisError(
                f"row/col ({df['row'].iloc[bad]}, {df['col'].iloc[bad]}) is not a point of the "
                f"{m}x{n} grid (at {k} point(s) per unit): the table and the SOM size disagree; "
                "re-run `somprobe analyze`"
            )
        v = pd.to_numeric(df[value], errors="coerce").to_numpy(dtype=float)
        keep = np.isfinite(v)
        # Several rows on one unit (not expected in a tidy table) are summed, not dropped.
        total = np.zeros(mat.shape)
        np.add.at(total, (r[keep], c[keep]), v[keep])
        seen = np.zeros(mat.shape, dtype=bool)
        seen[r[keep], c[keep]] = True
        mat[seen] = total[seen]
    return mat


def _grid_ticks(ax, m: int, n: int) -> None:
    step_r = max(1, int(np.ceil(m / 4)))
    step_c = max(1, int(np.ceil(n / 4)))
    ax.set_yticks(np.arange(0, m, step_r))
    ax.set_xticks(np.arange(0, n, step_c))
    ax.tick_params(length=2, labelsize="small")


def _heat(ax, mat, *, cmap, vmin, vmax, resolution: int = 1):
    # origin="upper": row 0 at the top, as the grid is indexed row-major like a matrix. The extent
    # keeps the axes in grid units whatever the number of evaluation points per unit.
    h = 0.5 / resolution
    rows, cols = mat.shape
    # SOM grids: one crisp square per unit. Dense matrices (G×G unit distances) have more cells
    # than the panel has pixels: averaged ("antialiased"), not decimated, which would alias
    # into noise that is both misleading and incompressible.
    interp = "nearest" if np.size(mat) <= DENSE_CELLS else "antialiased"
    return ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation=interp,
                     origin="upper", aspect="equal",
                     extent=(-h, cols / resolution - h, rows / resolution - h, -h))


def _range(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)




def _box(ax, df, *, x, y, hue, order, hue_order, kind="box"):
    palette = dict(zip(hue_order, sns.color_palette(_PALETTE, len(hue_order))))
    if df[y].notna().any():
        if kind == "violin":
            sns.violinplot(data=df, x=x, y=y, hue=hue, order=order, hue_order=hue_order,
                           palette=palette, ax=ax, cut=0, inner="quartile", linewidth=0.8)
        else:
            sns.boxplot(data=df, x=x, y=y, hue=hue, order=order, hue_order=hue_order,
                        palette=palette, ax=ax, fliersize=1.5, linewidth=0.9)
    else:
        _empty_panel(ax)



def read_table(path: Path) -> pd.DataFrame | None:
    """A tidy CSV table, or None when it is absent or empty (its figure is then skipped)."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise AnalysisError(f"cannot read table {path}: {e}; re-run the command that wrote it") from e
    return None if df.empty else df


def sizes_of(df: pd.DataFrame) -> list[str]:
    """SOM sizes (``"20x20"``) of a table, in natural order."""
    return natural_sorted(df["size"].astype(str)) if "size" in df.columns else []

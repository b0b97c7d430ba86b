"""Geometry figures (``somprobe geometry``, study 002): curvature near natural / boundary /
adversarial points, the principal-curvature profile, noise in S vs S⊥ (Fig. 7), projections on S
(Table 1) and the finite-difference step sweep. Drawn from the tables in ``run.geometry_dir``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..run import Run
from .common import _PALETTE, _check, _new_figure, _style, read_table

__all__ = ["plot_geometry_curvature", "plot_geometry_noise", "plot_geometry_projections",
           "plot_geometry_hsweep", "figure_jobs"]

_POINTS = ["natural", "boundary", "adversarial"]
_KINDS = ["random", "adversarial", "x2 - x1", "gradient"]


def plot_geometry_curvature(curvature: pd.DataFrame, eigenvalues: pd.DataFrame | None = None) -> Figure:
    """Mean curvature ρ per point kind (left) and the principal-curvature profile (right).

    Parameters
    ----------
    curvature : DataFrame
        Table ``geometry/curvature`` (columns point, rho, converged).
    eigenvalues : DataFrame, optional
        Table ``geometry/eigenvalues`` (columns id, side, rank, value).
    """
    df = _check(curvature, "geometry/curvature", ["point", "rho", "converged"])
    df = df[df["converged"].astype(bool)]
    order = [p for p in _POINTS if p in set(df["point"])]
    with _style():
        panels = 2 if eigenvalues is not None and len(eigenvalues) else 1
        fig = _new_figure(4.2 * panels + 0.5, 3.4)
        axes = fig.subplots(1, panels, squeeze=False)[0]
        ax = axes[0]
        sns.boxplot(data=df, x="point", y="rho", order=order, hue="point", hue_order=order,
                    palette=_PALETTE, ax=ax, showfliers=False, legend=False)
        sns.stripplot(data=df, x="point", y="rho", order=order, color="0.25", size=2.5, ax=ax,
                      alpha=0.6)
        ax.axhline(0, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("")
        ax.set_ylabel("mean curvature ρ (random directions)")
        ax.set_title("Curvature near the points")
        if panels == 2:
            ev = _check(eigenvalues, "geometry/eigenvalues", ["id", "side", "rank", "value"]).copy()
            # plot the spectrum ends in order: bottom 1..k on the left, top k..1 on the right
            k = int(ev["rank"].max())
            ev["position"] = np.where(ev["side"] == "bottom", ev["rank"], 2 * k + 1 - ev["rank"])
            ax = axes[1]
            sns.lineplot(data=ev, x="position", y="value", hue="side", hue_order=["bottom", "top"],
                         palette=_PALETTE, marker="o", errorbar=("pi", 50), ax=ax)
            ax.axhline(0, color="0.5", lw=0.8, ls="--")
            ax.set_xticks([1, k, k + 1, 2 * k], ["min", f"min+{k - 1}", f"max-{k - 1}", "max"])
            ax.set_xlabel("principal curvature (sorted ends of the spectrum)")
            ax.set_ylabel("eigenvalue of P H P / ||∇F|| at z")
            ax.set_title("Principal curvatures at z = x + r(x)")
    return fig


def plot_geometry_noise(noise: pd.DataFrame) -> Figure:
    """Misclassification under random noise in S vs S⊥ vs noise magnitude (study 002 Fig. 7)."""
    df = _check(noise, "geometry/noise", ["subspace", "magnitude", "misclassification"])
    with _style():
        fig = _new_figure(4.4, 3.3)
        ax = fig.subplots()
        sns.lineplot(data=df, x="magnitude", y="misclassification", hue="subspace",
                     hue_order=[s for s in ("S", "S_perp") if s in set(df["subspace"])],
                     palette=_PALETTE, marker="o", ax=ax)
        ax.set_xlabel("noise norm / mean image norm")
        ax.set_ylabel("fraction of labels changed")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Noise in S vs S⊥")
    return fig


def plot_geometry_projections(projections: pd.DataFrame, table1: pd.DataFrame | None = None) -> Figure:
    """``||P_S v|| / ||v||`` per kind of vector, with study 002's LeNet values as crosses."""
    df = _check(projections, "geometry/projections", ["kind", "ratio"])
    order = [k for k in _KINDS if k in set(df["kind"])] + sorted(set(df["kind"]) - set(_KINDS))
    with _style():
        fig = _new_figure(4.8, 3.4)
        ax = fig.subplots()
        sns.boxplot(data=df, x="kind", y="ratio", order=order, hue="kind", hue_order=order,
                    palette=_PALETTE, ax=ax, showfliers=False, legend=False)
        if table1 is not None and "study_lenet" in table1:
            ref = table1.dropna(subset=["study_lenet"])
            xs = [order.index(k) for k in ref["kind"] if k in order]
            ys = [v for k, v in zip(ref["kind"], ref["study_lenet"]) if k in order]
            ax.scatter(xs, ys, marker="x", color="black", s=50, zorder=5, label="study 002 (LeNet)")
            ax.legend(loc="upper right")
        ax.set_xlabel("")
        ax.set_ylabel("||P_S v|| / ||v||")
        ax.set_ylim(0, 1)
        ax.set_title("Projection on the shared subspace S")
    return fig


def plot_geometry_hsweep(hsweep: pd.DataFrame) -> Figure:
    """Mean directional curvature at boundary points vs the finite-difference step h."""
    df = _check(hsweep, "geometry/hsweep", ["id", "method", "h", "curvature", "abs_curvature"])
    fd = df[df["method"] == "fd"]
    exact = df[df["method"] == "exact"]
    with _style():
        fig = _new_figure(8.6, 3.3)
        axes = fig.subplots(1, 2)
        for ax, col, label in ((axes[0], "curvature", "mean vᵀGv"), (axes[1], "abs_curvature", "mean |vᵀGv|")):
            sns.lineplot(data=fd, x="h", y=col, units="id", estimator=None, color="0.7", lw=0.8, ax=ax)
            sns.lineplot(data=fd, x="h", y=col, color="C0", marker="o", errorbar=None, ax=ax,
                         label="finite differences (mean)")
            if len(exact):
                ax.axhline(float(exact[col].mean()), color="C3", ls="--", lw=1,
                           label="double backprop (mean)")
            ax.set_xscale("log")
            ax.set_xlabel("step h (L2, pixel units)")
            ax.set_ylabel(label)
            ax.legend(loc="best", fontsize="small")
        axes[0].axhline(0, color="0.5", lw=0.6)
        fig.suptitle("Curvature estimate vs finite-difference step")
    return fig


def figure_jobs(run: Run, *, want=None, **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for the geometry figures whose tables exist in ``run``."""
    g = run.geometry_dir
    jobs = []
    curv = read_table(g / "curvature.csv")
    if curv is not None:
        ev = read_table(g / "eigenvalues.csv")
        jobs.append(("geometry-curvature", lambda c=curv, e=ev: plot_geometry_curvature(c, e)))
    noise = read_table(g / "noise.csv")
    if noise is not None:
        jobs.append(("geometry-noise", lambda d=noise: plot_geometry_noise(d)))
    proj = read_table(g / "projections.csv")
    if proj is not None:
        t1 = read_table(g / "table1.csv")
        jobs.append(("geometry-projections", lambda d=proj, t=t1: plot_geometry_projections(d, t)))
    hs = read_table(g / "hsweep.csv")
    if hs is not None:
        jobs.append(("geometry-hsweep", lambda d=hs: plot_geometry_hsweep(d)))
    return jobs

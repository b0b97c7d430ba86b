"""Detection figures: ROC curves per attack and AUC per attack × detector (``somprobe detect``)."""
from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import AnalysisError
from ..run import Run
from .common import _PALETTE, _check, _new_figure, _style, read_table

__all__ = ["plot_detect_roc", "plot_detect_auc", "figure_jobs"]


def _order(values, canonical) -> list:
    present = list(dict.fromkeys(str(v) for v in values))
    return [v for v in canonical if v in present] + [v for v in present if v not in canonical]


def _canon():
    from ..detect.job import ATTACKS, DETECTORS

    return ATTACKS, DETECTORS


def plot_detect_roc(roc: pd.DataFrame, *, seed: int | None = None) -> Figure:
    """ROC curves, one panel per attack, one line per detector (table ``detect/roc``).

    Parameters
    ----------
    roc : DataFrame
        Columns attack, detector, seed, fpr, tpr (the test-side ROC of every split).
    seed : int, optional
        Split to draw (default the smallest seed in the table).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(roc, "detect/roc", ["attack", "detector", "seed", "fpr", "tpr"])
    if df.empty:
        raise AnalysisError("table 'detect/roc' is empty: run `somprobe detect`")
    seed = int(df["seed"].min()) if seed is None else int(seed)
    df = df[df["seed"] == seed]
    attacks, detectors = _canon()
    a_order = _order(df["attack"], attacks)
    d_order = _order(df["detector"], detectors)
    colors = dict(zip(d_order, sns.color_palette(_PALETTE, len(d_order))))
    with _style():
        fig = _new_figure(2.9 * len(a_order) + 1.8, 3.3)
        axes = fig.subplots(1, len(a_order), sharex=True, sharey=True, squeeze=False)[0]
        for ax, a in zip(axes, a_order):
            sub = df[df["attack"] == a]
            for d in d_order:
                g = sub[sub["detector"] == d]
                if len(g):
                    ax.plot(g["fpr"], g["tpr"], drawstyle="steps-post", color=colors[d], label=d,
                            lw=1.4)
            ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
            ax.axvline(0.05, ls="--", color="0.75", lw=0.8)
            ax.set_title(a)
            ax.set_xlabel("false positive rate")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
        axes[0].set_ylabel("true positive rate")
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        fig.legend(handles, labels, loc="outside right center", title="detector")
        fig.suptitle(f"ROC on the test pairs, split seed {seed} (dashed: 5 % FPR)")
    return fig


def plot_detect_auc(scores: pd.DataFrame) -> Figure:
    """AUC per attack and detector: bars at the mean over split seeds, error bars ± 1 sd.

    Parameters
    ----------
    scores : DataFrame
        Table ``detect/scores`` (attack, detector, seed, auc, ...); attacks without successes
        (empty AUC) are left out.

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(scores, "detect/scores", ["attack", "detector", "seed", "auc"])
    df = df[pd.to_numeric(df["auc"], errors="coerce").notna()]
    if df.empty:
        raise AnalysisError("table 'detect/scores' has no AUC: no attack succeeded; run "
                            "`somprobe detect` with stronger attacks")
    attacks, detectors = _canon()
    a_order = _order(df["attack"], attacks)
    d_order = _order(df["detector"], detectors)
    with _style():
        fig = _new_figure(1.1 * len(a_order) * max(1, len(d_order)) ** 0.5 + 3.0, 3.6)
        ax = fig.subplots()
        sns.barplot(data=df, x="attack", y="auc", hue="detector", order=a_order,
                    hue_order=d_order, palette=_PALETTE, errorbar="sd", ax=ax)
        ax.axhline(0.5, ls=":", color="0.5", lw=1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("ROC AUC (test pairs)")
        ax.set_title("Adversarial detection: AUC per attack (mean ± sd over split seeds)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="detector")
    return fig


def figure_jobs(run: Run, *, want=None, **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for the detection figures whose tables exist in ``run``."""
    jobs = []
    roc = read_table(run.detect_dir / "roc.csv")
    if roc is not None:
        jobs.append(("detect-roc", lambda d=roc: plot_detect_roc(d)))
    scores = read_table(run.detect_dir / "scores.csv")
    if scores is not None and pd.to_numeric(scores["auc"], errors="coerce").notna().any():
        jobs.append(("detect-auc", lambda d=scores: plot_detect_auc(d)))
    return jobs

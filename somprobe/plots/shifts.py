"""Perturbation figures: clean → perturbed BMU shifts (study 003 Figs 11–12) and attack accuracies."""
from __future__ import annotations

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
    _GRID_UNIT,
    _PALETTE,
    _check,
    _finite,
    _new_figure,
    _perturbation_order,
    _select_size,
    _style,
    natural_sorted,
)


def plot_shifts(shifts: pd.DataFrame, *, size: str | None = None, kind: str = "box") -> Figure:
    """Distribution of BMU shift distances per layer, adversarial vs noise (Fig 11–12).

    Parameters
    ----------
    shifts : DataFrame
        Table ``shifts`` (layer, size, perturbation, sample_id, rank, distance).
    size : str, optional
        SOM size; needed when the table holds several.
    kind : {"box", "violin"}

    Returns
    -------
    matplotlib.figure.Figure
    """
    if kind not in ("box", "violin"):
        raise ValueError(f"kind={kind!r}: choose 'box' or 'violin'")
    df = _check(shifts, "shifts", ["layer", "size", "perturbation", "distance"])
    df, size = _select_size(df, "shifts", size)
    df = _finite(df, "distance").assign(layer=lambda d: d["layer"].astype(str),
                                        perturbation=lambda d: d["perturbation"].astype(str))
    layers = natural_sorted(df["layer"])
    perts = _perturbation_order(df["perturbation"])
    with _style():
        fig = _new_figure(0.9 * len(layers) * max(1, len(perts)) ** 0.5 + 2.8, 3.8)
        ax = fig.subplots()
        _box(ax, df, x="layer", y="distance", hue="perturbation", order=layers,
             hue_order=perts, kind=kind)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"BMU shift ({_GRID_UNIT})")
        ax.set_title(f"Clean → perturbed BMU shifts, SOM {size}")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="perturbation")
    return fig


def _attack_label(row) -> str:
    parts = [str(row["attack"])]
    if "norm" in row and pd.notna(row["norm"]) and str(row["norm"]):
        parts.append(str(row["norm"]))
    if "eps" in row and pd.notna(row["eps"]):
        eps = float(row["eps"])
        # eps of k/255 is how the paper and users speak about pixel budgets.
        k = eps * 255
        parts.append(f"ε={k:.3g}/255" if abs(k - round(k)) < 1e-6 else f"ε={eps:.3g}")
    if "steps" in row and pd.notna(row["steps"]):
        try:
            if int(row["steps"]) > 1:
                parts.append(f"{int(row['steps'])} steps")
        except (TypeError, ValueError):
            pass
    return "\n".join(parts)


def plot_attacks(attacks: pd.DataFrame) -> Figure:
    """Clean vs perturbed accuracy per attack (bars, one pair per row of table ``attacks``).

    Parameters
    ----------
    attacks : DataFrame
        Table ``attacks`` (attack, norm, eps, steps, n, clean_acc, perturbed_acc, success_rate).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _check(attacks, "attacks", ["attack", "clean_acc", "perturbed_acc"])
    if df.empty:
        raise AnalysisError("table 'attacks' is empty: run `somprobe attack`")
    df = df.reset_index(drop=True)
    labels = [_attack_label(r) for _, r in df.iterrows()]
    # The same attack at the same settings twice would merge into one bar: keep them apart.
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} (#{seen[lab]})"
    long = pd.DataFrame({
        "attack": labels * 2,
        "accuracy": np.concatenate([pd.to_numeric(df["clean_acc"], errors="coerce"),
                                    pd.to_numeric(df["perturbed_acc"], errors="coerce")]),
        "inputs": ["clean"] * len(df) + ["perturbed"] * len(df),
    })
    with _style():
        fig = _new_figure(1.3 * len(df) + 2.8, 3.8)
        ax = fig.subplots()
        sns.barplot(data=long, x="attack", y="accuracy", hue="inputs", order=labels,
                    hue_order=["clean", "perturbed"], palette=_PALETTE, errorbar=None, ax=ax)
        for cont in ax.containers:
            ax.bar_label(cont, fmt="%.2f", fontsize="small", padding=1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("attack")
        ax.set_ylabel("accuracy (fraction correct)")
        ax.set_title("Accuracy on clean and perturbed inputs")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title=None)
    return fig



def figure_jobs(run: Run, *, want: set[str] | None = None, shift_kind: str = "box",
                **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for every perturbation figure whose table exists in ``run``."""
    jobs = []
    shifts = read_table(run.table("shifts"))
    if shifts is not None:
        for s in sizes_of(shifts):
            if want is None or s in want:
                jobs.append((f"shifts-{s}", lambda d=shifts, s=s: plot_shifts(d, size=s, kind=shift_kind)))
    attacks = read_table(run.table("attacks"))
    if attacks is not None:
        jobs.append(("attacks", lambda d=attacks: plot_attacks(d)))
    return jobs

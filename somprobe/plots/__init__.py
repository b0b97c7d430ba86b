"""Seaborn figures from the tidy tables of a run, one module per report section.

Every ``plot_*`` function takes DataFrames with the schemas pinned in ``docs/interfaces.md``
("Tidy tables") and returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes one
PNG atomically and :func:`plot_run` makes every figure whose tables exist. Plots never compute
statistics beyond what seaborn does for display (box plots); summaries come from the analyses.

Sections: :mod:`.som` (study 003's functional codes), :mod:`.shifts` (attacks and BMU shifts).
A new section is a module with its ``plot_*`` functions and a ``figure_jobs(run, *, want, **opts)``
listed in :data:`SECTIONS`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..run import Run
from . import shifts as _shifts, som as _som
from . import detect as _detect  # somprobe detect (issue 11)
from . import geometry as _geometry  # somprobe geometry (issue 11)
from . import decoders as _decoders  # somprobe decoder (issue 9)
from . import regions as _regions  # barrier bypass, region paths, convexity (issue 10)
from . import paths as _paths  # somprobe connect: linear and NEB paths (issue 9)
from .common import DPI, natural_key, natural_sorted, save_figure
from .shifts import plot_attacks, plot_shifts
from .som import (
    load_weight_distances,
    plot_centre_similarity,
    plot_class_bmus,
    plot_correct_incorrect,
    plot_curves,
    plot_dclass,
    plot_density,
    plot_weight_distances,
    plot_weight_similarity,
    weight_distance_sizes,
)

__all__ = [
    "DPI", "natural_key", "natural_sorted", "save_figure", "plot_curves", "plot_density",
    "plot_class_bmus", "plot_dclass", "plot_weight_distances", "load_weight_distances",
    "weight_distance_sizes",
    "plot_weight_similarity", "plot_centre_similarity", "plot_correct_incorrect", "plot_shifts",
    "plot_attacks", "plot_run", "SECTIONS",
]

#: Report sections in report order; each module's ``figure_jobs`` lists the figures it can draw.
SECTIONS = [_som, _shifts]
SECTIONS.append(_geometry)  # boundary curvature, shared subspace (issue 11)
SECTIONS.append(_detect)  # detection ROC / AUC (issue 11)
SECTIONS.append(_decoders)  # latent decoders (issue 9, somprobe decoder)
SECTIONS.append(_paths)  # connectivity: linear and NEB paths (issue 9, somprobe connect)
SECTIONS.append(_regions)  # barriers, region paths, convexity (issue 10)


def plot_run(run: Run | str | os.PathLike, *, sizes: Sequence[str] | None = None,
             classes: Sequence[int] | None = None, shift_kind: str = "box",
             progress: bool = False) -> list[Path]:
    """Make every figure whose tables exist in ``run`` and write them to ``run.figures_dir``.

    Figures whose tables are absent or empty are skipped; a table with a wrong schema raises
    :class:`~somprobe.errors.AnalysisError`.

    Parameters
    ----------
    run : Run or path
        The run directory.
    sizes : sequence of str, optional
        SOM sizes (``"20x20"``) to plot per-size figures for; default all in the tables.
    classes : sequence of int, optional
        Classes for the class-BMU figure (default: the first five).
    shift_kind : {"box", "violin"}
        Style of the shift distributions.
    progress : bool
        Show a tqdm bar over figures.

    Returns
    -------
    list of pathlib.Path
        The PNGs written, in the order made.
    """
    run = run if isinstance(run, Run) else Run(run)
    want = None if sizes is None else {str(s) for s in sizes}
    jobs: list[tuple[str, callable]] = []
    for section in SECTIONS:
        jobs += section.figure_jobs(run, want=want, classes=classes, shift_kind=shift_kind)

    it = jobs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(jobs, desc="figures", unit="fig")
    written = []
    for name, make in it:
        written.append(save_figure(make(), run.figure(name)))
    return written

"""Decoder figures: val images next to their reconstructions from each layer's latent, and the
decoder cards (val MSE against the least-squares linear decoder, class kept).

Drawn only from what ``somprobe decoder`` saved: ``decoders/<layer>-samples.npz`` and
``decoders/cards.csv``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import AnalysisError
from ..run import Run
from .common import _PALETTE, _check, _new_figure, _style, natural_sorted, read_table

__all__ = ["plot_reconstructions", "plot_decoder_cards", "read_samples", "figure_jobs"]

_SAMPLE_KEYS = ("original", "decoded", "ids", "labels")


def read_samples(run: Run, layers=None) -> dict[str, dict[str, np.ndarray]]:
    """The saved sample images of every decoder of ``run`` (layer → arrays), in natural order."""
    out = {}
    layers = layers if layers is not None else [c for c in _card_layers(run)]
    for layer in layers:
        path = run.decoder_samples(layer)
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as f:
                out[layer] = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise AnalysisError(f"cannot read {path}: {e}; re-run `somprobe decoder --out {run.root} "
                                f"--layer {layer} --overwrite`") from e
    return out


def _card_layers(run: Run) -> list[str]:
    cards = read_table(run.decoder_cards_csv)
    return [] if cards is None else natural_sorted(cards["layer"].astype(str))


def _show(ax, img: np.ndarray) -> None:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[2] == 3 and np.ptp(img.astype(np.int16), axis=2).max() == 0:
        img = img[..., 0]  # grey images (MNIST, Fashion-MNIST) drawn with a grey colour map
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_reconstructions(samples: Mapping[str, Mapping[str, np.ndarray]], *, n: int = 8,
                         cards: pd.DataFrame | None = None) -> Figure:
    """Val images (top row) and their reconstructions from each layer's latent (one row per layer).

    Parameters
    ----------
    samples : mapping layer → arrays
        ``original``/``decoded`` uint8 ``[k, 3, S, S]``, ``ids``, ``labels`` (and optionally
        ``classes``, ``pred_decoded``), as saved in ``decoders/<layer>-samples.npz``.
    n : int
        Images per row.
    cards : DataFrame, optional
        ``cards.csv``; adds each layer's val MSE and PSNR to its row label.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not samples:
        raise AnalysisError("no decoder samples to draw: run `somprobe decoder --out RUN` first")
    layers = natural_sorted(samples)
    for layer in layers:
        missing = [k for k in _SAMPLE_KEYS if k not in samples[layer]]
        if missing:
            raise AnalysisError(f"decoder samples of {layer} lack {missing}; re-run `somprobe decoder "
                                f"--layer {layer} --overwrite`")
    # one originals row when every layer shows the same val images, else one per layer
    first = samples[layers[0]]
    shared = all(np.array_equal(samples[l]["ids"], first["ids"]) for l in layers)
    rows = ([("original", first["original"], first)] if shared else [])
    for layer in layers:
        s = samples[layer]
        if not shared:
            rows.append((f"{layer} input", s["original"], s))
        label = layer
        if cards is not None and "layer" in cards.columns:
            row = cards[cards["layer"].astype(str) == layer]
            if len(row):
                label = f"{layer}\nMSE {float(row['val_mse'].iloc[0]):.3g}\n{float(row['psnr'].iloc[0]):.1f} dB"
        rows.append((label, s["decoded"], s))
    k = min(n, min(len(r[1]) for r in rows))
    with _style():
        fig = _new_figure(1.05 * k + 1.4, 1.1 * len(rows) + 0.6)
        axes = np.asarray(fig.subplots(len(rows), max(k, 1), squeeze=False))
        for i, (label, imgs, s) in enumerate(rows):
            classes = s.get("classes")
            for j in range(k):
                ax = axes[i, j]
                _show(ax, imgs[j])
                if i == 0:
                    y = int(s["labels"][j])
                    ax.set_title(str(classes[y]) if classes is not None and y < len(classes) else str(y),
                                 fontsize="small")
            axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
        fig.suptitle("Val images and their reconstructions from each layer's latent")
    return fig


def plot_decoder_cards(cards: pd.DataFrame) -> Figure:
    """Val MSE of each layer's decoder next to the least-squares linear decoder's (log scale),
    and the class kept (model accuracy on decoded images / clean accuracy).

    Parameters
    ----------
    cards : DataFrame
        ``decoders/cards.csv`` (layer, val_mse, linear_val_mse, class_kept).
    """
    df = _check(cards, "decoders/cards", ["layer", "val_mse", "linear_val_mse", "class_kept"]).copy()
    df["layer"] = df["layer"].astype(str)
    layers = natural_sorted(df["layer"])
    df = df.set_index("layer").loc[layers]
    x = np.arange(len(layers))
    colors = sns.color_palette(_PALETTE)
    with _style():
        fig = _new_figure(1.2 * len(layers) + 4.5, 3.6)
        ax1, ax2 = fig.subplots(1, 2)
        w = 0.38
        ax1.bar(x - w / 2, pd.to_numeric(df["val_mse"], errors="coerce"), w, label="decoder",
                color=colors[0])
        ax1.bar(x + w / 2, pd.to_numeric(df["linear_val_mse"], errors="coerce"), w,
                label="linear (least squares)", color=colors[1])
        ax1.set_yscale("log")
        ax1.set_xticks(x, layers)
        ax1.set_ylabel("val MSE")
        ax1.set_title("Reconstruction error")
        ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, fontsize="small")
        kept = pd.to_numeric(df["class_kept"], errors="coerce")
        ax2.bar(x, kept, 0.6, color=colors[2])
        for xi, v in zip(x, kept):
            if np.isfinite(v):
                ax2.text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize="small")
        ax2.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax2.set_xticks(x, layers)
        ax2.set_ylim(0, max(1.1, float(np.nanmax(kept)) * 1.1 if kept.notna().any() else 1.1))
        ax2.set_ylabel("accuracy decoded / clean")
        ax2.set_title("Class kept")
    return fig


def figure_jobs(run: Run, **_) -> list[tuple[str, callable]]:
    """(figure name, maker) for the decoder figures whose files exist in ``run``."""
    cards = read_table(run.decoder_cards_csv)
    if cards is None:
        return []
    jobs = [("decoders-cards", lambda d=cards: plot_decoder_cards(d))]
    samples = read_samples(run, natural_sorted(cards["layer"].astype(str)))
    if samples:
        jobs.append(("decoders-samples", lambda s=samples, d=cards: plot_reconstructions(s, cards=d)))
    return jobs

"""Report size: the figures and ``report.html`` of a run, drawn the project's way (palette PNGs,
coarser dense heat maps, a pixel cap) and the previous way (RGBA PNGs at 180 dpi, nearest-neighbour
heat maps), in the same process. Target (issue 8): any report under 5 MB.

The run needs its analysis tables (``somprobe analyze`` and ``shift``); the figures and report it
holds are replaced by the project's. Example (a random-init 12-block ViT on digits):

    somprobe extract --out runs/vit12 --model vit_tiny_patch16_224 --data digits --per-class 30 \\
        --image-size 32
    somprobe fit --out runs/vit12 --size 20 --epochs 2
    somprobe attack --out runs/vit12 --attack noise --eps 8/255
    somprobe attack --out runs/vit12 --attack fgsm --eps 8/255
    somprobe analyze --out runs/vit12 --no-figures && somprobe shift --out runs/vit12 --no-figures
    python benchmarks/report_size.py --out runs/vit12
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from unittest import mock

import somprobe.plots.common as common
from somprobe.plots import plot_run
from somprobe.report import write_report
from somprobe.run import Run


@contextmanager
def previous_style():
    """save_figure and heat maps as they were before issue 8."""
    def save(fig, tmp):
        fig.savefig(tmp, format="png", dpi=common.DPI, bbox_inches="tight", facecolor="white")

    def plain_png(png, target):
        with open(target, "wb") as f:
            f.write(png.getvalue())

    with mock.patch.object(common, "_dpi_for", lambda fig: float(common.DPI)), \
            mock.patch.object(common, "_write_palette_png", plain_png), \
            mock.patch.object(common, "DENSE_CELLS", float("inf")):
        yield


def measure(run: Run) -> dict:
    t = time.perf_counter()
    figs = plot_run(run)
    t_fig = time.perf_counter() - t
    report = write_report(run)
    return {"figures": len(figs), "figure_bytes": sum(p.stat().st_size for p in figs),
            "largest": max(figs, key=lambda p: p.stat().st_size).name,
            "largest_bytes": max(p.stat().st_size for p in figs),
            "report_bytes": report.stat().st_size, "figures_s": t_fig}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run directory with analysis tables")
    a = ap.parse_args()
    run = Run(a.out)
    with previous_style():
        before = measure(run)
    after = measure(run)
    for name, r in (("previous", before), ("somprobe", after)):
        print(f"{name:9s}: {r['figures']} figures {r['figure_bytes'] / 1e6:6.2f} MB (largest "
              f"{r['largest']} {r['largest_bytes'] / 1e6:.2f} MB), report.html "
              f"{r['report_bytes'] / 1e6:6.2f} MB, figures drawn in {r['figures_s']:.1f} s")
    print(f"report size ratio previous/somprobe: {before['report_bytes'] / after['report_bytes']:.1f}x; "
          f"figure time ratio somprobe/previous: {after['figures_s'] / before['figures_s']:.2f}")


if __name__ == "__main__":
    main()

"""Study 002's boundary geometry on trained resnet18s (issue 11): curvature near natural vs
adversarial points per trained seed, the shared subspace (Fig. 7) and Table 1's projections.

For every source run (``somprobe train`` output with a complete ``model/``), the model is copied
into its own run under ``--out-root`` and ``somprobe geometry``'s job runs there with the
settings below; the script then prints one row per model:

    python benchmarks/geometry.py \\
        --runs /work/runs-shared/fmnist-resnet18,/work/runs-shared/mnist5k-s0,... \\
        --out-root /work/runs-shared/geometry --samples 40 --directions 10

Columns: mean / median of Algorithm 2's ρ at natural images and at DeepFool's adversarial images,
the fraction of natural points with ρ < 0 and of adversarial points with ρ > 0, Algorithm 2's
accuracy with threshold 0 and its label recovery on the adversarial images, the mean curvature at
the boundary points z = x + r(x), the extreme principal curvatures, Table 1's projection ratios
(study 002 LeNet: random 0.25, adversarial 0.64, x2 - x1 0.10, gradient 0.22) and Fig. 7's
misclassification under noise in S and in S⊥ at one magnitude.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _real_run import copy_model, model_meta, set_threads  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="comma-separated trained runs")
    p.add_argument("--out-root", default="runs/geometry")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--subspace-samples", type=int, default=100)
    p.add_argument("--directions", type=int, default=10)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--h", type=float, default=None)
    p.add_argument("--hsweep", default=None,
                   help="comma-separated steps of the h sweep ('' to skip; default the job's)")
    p.add_argument("--noise-at", type=float, default=0.2, help="magnitude reported from noise.csv")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redo", action="store_true", help="recompute runs that already have a summary")
    a = p.parse_args(argv)
    threads = set_threads(a.threads)

    import pandas as pd

    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset
    from somprobe.geometry import DEFAULT_H
    from somprobe.geometry.job import DEFAULT_HSWEEP, geometry_run
    from somprobe.run import Run

    rows = []
    for src in [Path(r) for r in a.runs.split(",") if r]:
        src_run = Run(src)
        meta = model_meta(src_run)
        if meta is None or not meta.get("complete", True):
            print(f"skip {src}: no complete trained model (still training?)", file=sys.stderr)
            continue
        dst = Run(Path(a.out_root) / src.name)
        copy_model(src_run, dst)
        summary_path = dst.geometry_dir / "summary.json"
        if a.redo or not summary_path.is_file():
            t = time.perf_counter()
            model = load_trained(dst, device=a.device)
            ds = load_dataset(meta["dataset"], split=meta.get("val_split") or "test",
                              image_size=meta.get("image_size"))
            geometry_run(dst, model=model, dataset=ds, samples=a.samples,
                         subspace_samples=a.subspace_samples, directions=a.directions, k=a.k,
                         h=a.h or DEFAULT_H, device=a.device, seed=a.seed, progress=True,
                         hsweep=DEFAULT_HSWEEP if a.hsweep is None else
                         [float(v) for v in a.hsweep.split(",") if v.strip()])
            print(f"{src.name}: geometry in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        from somprobe.plots.common import save_figure
        from somprobe.plots.geometry import figure_jobs

        for name, make in figure_jobs(dst):
            save_figure(make(), dst.figure(name))
        s = json.loads(summary_path.read_text())
        curv = pd.read_csv(dst.geometry_dir / "curvature.csv")
        noise = pd.read_csv(dst.geometry_dir / "noise.csv")
        nat = curv[(curv["point"] == "natural") & curv["converged"]]["rho"]
        adv = curv[curv["point"] == "adversarial"]["rho"]
        bnd = curv[(curv["point"] == "boundary") & curv["converged"]]
        at = noise[(noise["magnitude"] - a.noise_at).abs() < 1e-9].set_index("subspace")["misclassification"]
        rows.append({
            "model": src.name, "seed": meta.get("seed"), "n": len(nat),
            "rho_nat_mean": nat.mean(), "rho_nat_median": nat.median(), "nat_rho<0": (nat < 0).mean(),
            "rho_adv_mean": adv.mean(), "rho_adv_median": adv.median(), "adv_rho>0": (adv > 0).mean(),
            "alg2_acc_t0": s["algorithm2_accuracy_t0"], "label_recovery": s["label_recovery_adversarial"],
            "rho_boundary_mean": bnd["rho"].mean(), "lam_max_med": bnd["lam_max"].median(),
            "lam_min_med": bnd["lam_min"].median(),
            **{f"P_S {k}": v for k, v in s["table1"].items()},
            f"noise S @{a.noise_at}": at.get("S"), f"noise S_perp @{a.noise_at}": at.get("S_perp"),
            "subspace_dim": s["subspace_dim"], "seconds": s["seconds"],
        })
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(f"threads {threads}, samples {a.samples}, T {a.directions}, k {a.k}, h {a.h or DEFAULT_H}")
    print(table.T.to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()

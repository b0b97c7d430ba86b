"""Study 003's layer trends on real data, honestly reported (issue 4, "Real data").

A resnet18 trained with ``somprobe train`` (defaults) on Fashion-MNIST; SOM-tr / SOM-val of
``--per-class`` samples per class (50, as the paper; try ``--per-class 200`` too); one 20×20 torus
SOM per composite layer CL1–CL4 with the paper's defaults (cosine, σ0 10, α0 0.1, 5 epochs,
batch 10). Nothing here is tuned: the settings are fixed before looking at the results.

Per layer it prints

* the median over classes of the per-class mean D_class, on SOM-tr and on SOM-val (centres
  always from SOM-tr),
* the mean cosine distance between all pairs of SOM unit weights (``weight_similarity``),
* the correct-vs-incorrect gap on SOM-val: D_class to the label's centre of wrongly classified
  inputs minus that of correctly classified ones (mean and median, with n of each, and a
  one-sided Mann–Whitney p-value that the wrong ones are farther),

then, for each of the paper's three findings, whether it holds here, with the rule used:

1. D_class is shorter in CL4 than in CL1 (median over classes, SOM-tr and SOM-val both);
2. CL1/CL2 weights are more alike than CL3/CL4 (both mean cosine distances of CL1, CL2 below
   both of CL3, CL4);
3. wrong predictions lie farther from their label's centre (mean gap > 0 in every layer; the
   paper says "ED is bigger on average when ResNets make mistakes").

The reference is the paper (ResNet18 on ImageNet): all three hold there. A control runs the same
draws, maps and analyses on the same architecture with untrained (timm-initialised) weights
(``<out>-random-init``; ``--no-control`` skips it), to show which trends need training at all.

Runs: codes and maps of ``--per-class 50`` go into ``--run`` itself (default
``runs/fmnist-resnet18``); any other ``--per-class`` goes into ``<run>-pc<N>`` with a copy of the
model, so the two settings never overwrite each other. ``--train`` trains the model first if the
run has none (``somprobe train --out runs/fmnist-resnet18 --data fashion-mnist``).

    OMP_NUM_THREADS=2 python benchmarks/paper_trends.py --markdown
    OMP_NUM_THREADS=2 python benchmarks/paper_trends.py --per-class 200 --markdown
    python benchmarks/paper_trends.py --quick          # 10 per class, 10x10 SOMs, plumbing check
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_run import (add_run_arguments, ensure_codes_and_soms, prepare, md_table, set_threads,  # noqa: E402
                       text_table)

from somprobe.run import Run  # noqa: E402

LAYERS = ["CL1", "CL2", "CL3", "CL4"]


def shuffled_dclass(run: Run, layer: str, m: int, *, seed: int) -> float:
    """Median over classes of SOM-val D_class with labels shuffled (in SOM-tr and SOM-val alike).

    The same statistic with no class information left: how close BMUs sit to *a* centre made
    of random inputs, i.e. how far the whole data set spreads on the map. D_class below it means
    classes cluster; D_class near it means the layer maps everything to one place.
    """
    from somprobe.analysis.centres import class_centres, class_means, d_class
    from somprobe.som.grid import Grid
    from somprobe.store import open_store

    grid = Grid(m, m)
    rng = np.random.default_rng(seed)
    lab = {s: rng.permutation(open_store(run.codes_dir(s)).labels) for s in ("som-tr", "som-val")}
    b = {s: np.load(run.bmus_path(s, layer, m, m)) for s in ("som-tr", "som-val")}
    cen = class_centres(b["som-tr"], lab["som-tr"], grid)
    d = d_class(b["som-val"], lab["som-val"], cen, grid)
    return float(np.median(class_means(d, lab["som-val"]).d_class))


def layer_rows(tables: dict, size: str, run: Run, m: int, seed: int) -> list[dict]:
    from scipy.stats import mannwhitneyu

    dc = tables["dclass"]
    ws = tables["weight_similarity"]
    ds = tables["dclass_samples"]
    out = []
    for layer in LAYERS:
        r = {"layer": layer}
        for split, key in (("som-tr", "tr"), ("som-val", "val")):
            v = dc[(dc.layer == layer) & (dc["size"] == size) & (dc.split == split)].d_class
            r[f"dclass_{key}"] = float(np.median(v))
        r["dclass_shuf"] = shuffled_dclass(run, layer, m, seed=seed)
        r["cos_mean"] = float(ws[(ws.layer == layer) & (ws["size"] == size)]["mean"].iloc[0])
        s = ds[(ds.layer == layer) & (ds["size"] == size) & (ds.split == "som-val")]
        ok, bad = s[s.correct].d_class.to_numpy(), s[~s.correct].d_class.to_numpy()
        r["n_ok"], r["n_bad"] = ok.size, bad.size
        if ok.size and bad.size:
            r["gap_mean"] = float(bad.mean() - ok.mean())
            r["gap_median"] = float(np.median(bad) - np.median(ok))
            r["p"] = float(mannwhitneyu(bad, ok, alternative="greater").pvalue)
        else:
            r["gap_mean"] = r["gap_median"] = r["p"] = float("nan")
        out.append(r)
    return out


def verdicts(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    by = {r["layer"]: r for r in rows}
    tr = by["CL4"]["dclass_tr"] < by["CL1"]["dclass_tr"]
    va = by["CL4"]["dclass_val"] < by["CL1"]["dclass_val"]
    f1 = (tr and va, f"CL1 → CL4 median D_class: SOM-tr {by['CL1']['dclass_tr']:.2f} → "
          f"{by['CL4']['dclass_tr']:.2f}, SOM-val {by['CL1']['dclass_val']:.2f} → "
          f"{by['CL4']['dclass_val']:.2f}" + ("" if tr == va else " (holds on one split only)"))
    cos = [by[lay]["cos_mean"] for lay in LAYERS]
    strict = max(cos[:2]) < min(cos[2:])
    loose = np.mean(cos[:2]) < np.mean(cos[2:])
    f2 = (strict, "mean cosine distance CL1..CL4: " + ", ".join(f"{c:.3f}" for c in cos) +
          ("" if strict == loose else
           f" (the CL1/CL2 average {'is' if loose else 'is not'} below the CL3/CL4 average)"))
    gaps = [by[lay]["gap_mean"] for lay in LAYERS]
    if any(np.isnan(gaps)):
        f3 = (None, "cannot tell: SOM-val has no correctly or no wrongly classified inputs")
    else:
        n_pos = sum(g > 0 for g in gaps)
        f3 = (n_pos == 4, "mean gap (wrong − right) CL1..CL4: " + ", ".join(f"{g:+.2f}" for g in gaps) +
              f"; positive in {n_pos}/4 layers; n wrong = {by['CL1']['n_bad']} of "
              f"{by['CL1']['n_bad'] + by['CL1']['n_ok']}")
    return [("(1) D_class shorter in CL4 than CL1", *f1),
            ("(2) CL1/CL2 weights more alike than CL3/CL4", *f2),
            ("(3) wrong predictions farther from their label's centre", *f3)]


def fmt_rows(rows):
    return [[r["layer"], f"{r['dclass_tr']:.2f}", f"{r['dclass_val']:.2f}",
             f"{r['dclass_shuf']:.2f} ({r['dclass_val'] / r['dclass_shuf']:.2f})", f"{r['cos_mean']:.3f}",
             f"{r['gap_mean']:+.2f}", f"{r['gap_median']:+.2f}", f"{r['n_bad']} / {r['n_ok']}",
             f"{r['p']:.2g}"] for r in rows]


HEADER = ["layer", "median D_class SOM-tr", "median D_class SOM-val",
          "SOM-val, shuffled labels (ratio)", "mean weight cos dist",
          "gap mean (wrong−right)", "gap median", "n wrong / right", "p (MWU, wrong>right)"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--quick", action="store_true", help="10 per class, 10x10 SOMs (plumbing check).")
    p.add_argument("--no-control", action="store_true",
                   help="Skip the control: the same architecture with untrained weights.")
    a = p.parse_args(argv)
    if a.quick:
        a.per_class, a.size = 10, 10
    threads = set_threads(a.threads)
    say = lambda m: print(f"[paper_trends] {m}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()

    run, meta, net, draws, timings = prepare(a, say)
    from somprobe.analysis.job import analyze_run

    say("analysing (centres, D_class, weight similarity, correct vs incorrect)")
    t = time.perf_counter()
    tables = analyze_run(run, sizes=a.size, layers=LAYERS, splits=["som-tr", "som-val"], seed=a.seed)
    timings["analyze_s"] = time.perf_counter() - t
    size = f"{a.size}x{a.size}"
    rows = layer_rows(tables, size, run, a.size, a.seed)
    ctrl_rows = ctrl_run = None
    if not a.no_control:
        # Same draws, SOM settings and analyses on the untrained architecture: which trends come
        # from training and which from the network's structure (or the SOM) alone.
        ctrl_run = Run(f"{str(run.root).rstrip('/')}-random-init")
        say(f"control: untrained {meta.get('model')} in {ctrl_run.root}")
        t = time.perf_counter()
        ensure_codes_and_soms(ctrl_run, meta, per_class=a.per_class, size=a.size,
                              som_epochs=a.som_epochs, seed=a.seed, device=a.device,
                              fresh=a.fresh, say=say, random_init=True)
        ctrl_tables = analyze_run(ctrl_run, sizes=a.size, layers=LAYERS,
                                  splits=["som-tr", "som-val"], seed=a.seed)
        timings["control_s"] = time.perf_counter() - t
        ctrl_rows = layer_rows(ctrl_tables, size, ctrl_run, a.size, a.seed)
        cds = ctrl_tables["dclass_samples"]
        ctrl_acc = float(cds[(cds.layer == "CL1") & (cds.split == "som-val")].correct.mean())
    val_acc = meta.get("final_val_accuracy")
    ds = tables["dclass_samples"]
    som_val_acc = float(ds[(ds.layer == "CL1") & (ds["size"] == size) & (ds.split == "som-val")].correct.mean())

    print(f"\nStudy 003 layer trends — {meta.get('model')} trained on {meta.get('dataset')} "
          f"(val accuracy {val_acc:.4f}; SOM-val accuracy {som_val_acc:.4f}), "
          f"{a.per_class} per class, {size} torus SOMs, seed {a.seed}; run {run.root}")
    print(text_table(HEADER, fmt_rows(rows)))
    print("\nD_class: per-class mean torus distance of the top-10 BMUs to the class centre (SOM-tr "
          "centres), median over the classes; its floor is about 1.17 (the 10 BMUs of every input "
          "on the same 3x3+1 patch of units). Shuffled labels: the same median with SOM-tr and SOM-val "
          "labels permuted (no class information; ratio = D_class SOM-val / shuffled; near 1 means "
          "the layer maps all inputs to one place rather than clustering classes). Gap and p: per input on SOM-val; the one-sided "
          "Mann-Whitney p tests ordering, not size (ties and tiny consistent offsets give small p "
          "for a negligible gap).")
    print("\nDoes the paper's finding hold here?")
    vs = verdicts(rows)
    for name, ok, why in vs:
        word = {True: "HOLDS", False: "DOES NOT HOLD", None: "UNDECIDED"}[ok]
        print(f"  {name}: {word} — {why}")
    if ctrl_rows is not None:
        print(f"\nControl — the same {meta.get('model')} with untrained (timm-initialised, seed "
              f"{a.seed}) weights, same draws and SOM settings (SOM-val accuracy {ctrl_acc:.3f}); "
              f"run {ctrl_run.root}")
        print(text_table(HEADER, fmt_rows(ctrl_rows)))
        print("Does the same pattern appear without training?")
        ctrl_vs = verdicts(ctrl_rows)
        for name, ok, why in ctrl_vs:
            word = {True: "YES", False: "NO", None: "UNDECIDED"}[ok]
            print(f"  {name}: {word} — {why}")
    total = time.perf_counter() - t0
    print(f"\ntime: {total:.0f} s total ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}); "
          f"torch threads {threads}")
    if a.markdown:
        print(f"\n**{meta.get('model')} / {meta.get('dataset')}, {a.per_class} per class, {size} torus, "
              f"seed {a.seed}** (val accuracy {val_acc:.3f}, SOM-val accuracy {som_val_acc:.3f})\n")
        print(md_table(HEADER, fmt_rows(rows)))
        print()
        print(md_table(["paper finding (ResNet18/ImageNet: holds)", "here", "numbers"],
                       [[n, {True: "holds", False: "does not hold", None: "undecided"}[ok], why]
                        for n, ok, why in vs]))
        if ctrl_rows is not None:
            print(f"\nControl: untrained {meta.get('model')} (timm init, seed {a.seed}), same draws "
                  f"and SOMs (SOM-val accuracy {ctrl_acc:.3f})\n")
            print(md_table(HEADER, fmt_rows(ctrl_rows)))
            print()
            print(md_table(["pattern", "untrained control", "numbers"],
                           [[n, {True: "appears", False: "does not appear", None: "undecided"}[ok], why]
                            for n, ok, why in ctrl_vs]))
        cmd = "OMP_NUM_THREADS=2 python benchmarks/paper_trends.py"
        if a.run != "runs/fmnist-resnet18":
            cmd += f" --run {a.run}"
        if a.per_class != 50:
            cmd += f" --per-class {a.per_class}"
        if a.size != 20:
            cmd += f" --size {a.size}"
        print(f"\nCommand: `{cmd} --markdown` (model: `somprobe train --out {a.run} "
              f"--model {meta.get('model')} --data {meta.get('dataset')}`, or add `--train`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

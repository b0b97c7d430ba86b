"""Adversarial detection on real data: every attack × detector, and scoring speed (issue 11).

For one trained run (default the resnet18 of ``somprobe train`` on Fashion-MNIST) this script
gives a run of its own the model (a copy), SOM-tr/SOM-val codes and one 20×20 torus SOM per
CL1–CL4 (study 003's defaults, through ``_real_run.prepare``, shared with the other real-data
benchmarks), then runs ``somprobe detect``'s job (:func:`somprobe.detect.job.detect_run`):
``--samples`` clean validation images, only the correctly classified ones attacked, only the
successful attacks kept, a paired 80/20 split per seed, each detector fitted on the training
pairs and scored on the test pairs.

Printed:

1. per attack: successes, and per detector AUC / accuracy / TPR at 5 % FPR (mean ± sd over the
   split seeds) and label recovery where the detector recovers labels; the winner by mean AUC
   (ties within one sd said so);
2. where the studies' claims hold, by rules fixed before running: study 000 ("the loss-curve
   detector outperforms the baselines under advanced attacks": loss-curve AUC above InputMFS and
   Mahalanobis on PGD/BIM/CW); study 002 (curvature: AUC > 0.5 and label recovery above chance);
3. speed: scoring 1,000 inputs by each fitted detector from cached characteristics (the
   benchmark's claim: seconds, not minutes), the throughput of computing characteristics
   (images/s), and somprobe's ROC AUC against ``sklearn.metrics.roc_auc_score`` on the same
   scores (same value; time ratio).

    OMP_NUM_THREADS=2 python benchmarks/detection.py --run /work/runs-shared/fmnist-resnet18 \\
        --out /work/runs-shared/detect-fmnist --samples 300 --markdown
    python benchmarks/detection.py --quick      # digits-sized plumbing check on a tiny sample
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_run import add_run_arguments, md_table, prepare, set_threads, text_table  # noqa: E402


def _pm(mean, sd, digits=3) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--samples", type=int, default=300, help="Clean validation images drawn.")
    p.add_argument("--attacks", default="fgsm,bim,pgd,deepfool,cw")
    p.add_argument("--detectors",
                   default="curvature,loss_curve,som_distance,input_mfs,mahalanobis,max_softmax")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eps", type=float, default=8 / 255,
                   help="Linf budget of FGSM/BIM/PGD (BIM 10 steps of eps/8, PGD 20 of eps/4).")
    p.add_argument("--directions", type=int, default=20,
                   help="T, random directions of the curvature detector (Algorithm 2).")
    p.add_argument("--resume", action="store_true", help="Reuse attacks and cached characteristics.")
    p.add_argument("--quick", action="store_true", help="60 images, 2 seeds, fgsm+pgd: plumbing only.")
    a = p.parse_args(argv)
    threads = set_threads(a.threads)

    from somprobe.detect import metrics as M
    from somprobe.detect.job import build_detector, detect_run, linf_attack_options, som_context

    if a.quick:
        a.samples, a.seeds, a.attacks = 60, "0,1", "fgsm,pgd"

    def say(msg):
        print(f"» {msg}", file=sys.stderr, flush=True)

    run, meta, _net, _draws, timings = prepare(a, say)
    print(f"run {run.root}: {meta['model']} on {meta['dataset']} (val accuracy "
          f"{meta.get('final_val_accuracy') or float('nan'):.4f}); torch threads {threads}; "
          f"machine shared with other jobs")

    t0 = time.perf_counter()
    res = detect_run(run, attacks=a.attacks, detectors=a.detectors,
                     seeds=[int(s) for s in a.seeds.split(",")], n=a.samples, device=a.device,
                     detector_options={"curvature": {"n_directions": a.directions}},
                     attack_options=linf_attack_options(a.eps),
                     resume=a.resume, on_stage=say)
    wall = time.perf_counter() - t0
    print(f"Linf budget of FGSM/BIM/PGD: {a.eps:.4g} ({a.eps * 255:.3g}/255)")
    print(f"\ndetect_run: {wall:.0f} s (attacks + characteristics + {len(res['scores'])} fits)\n")

    # ---- 1. the table per attack
    summ = res["summary"]
    att = res["attacks"].set_index("attack")
    header = ["attack", "detector", "pairs", "AUC", "accuracy", "TPR@5%FPR", "label recovery"]
    rows, winners = [], {}
    for attack, g in summ.groupby("attack", sort=False):
        for _, r in g.iterrows():
            rows.append([attack, r["detector"], int(r["n_pairs"]), _pm(r["auc_mean"], r["auc_sd"]),
                         _pm(r["accuracy_mean"], r["accuracy_sd"]),
                         _pm(r["tpr_at_5fpr_mean"], r["tpr_at_5fpr_sd"]),
                         _pm(r["label_recovery_mean"], r["label_recovery_sd"])])
        ok = g.dropna(subset=["auc_mean"]).sort_values("auc_mean", ascending=False)
        if len(ok):
            best = ok.iloc[0]
            tied = [d for _, d in ok.iloc[1:].iterrows()
                    if best["auc_mean"] - d["auc_mean"] <= np.nan_to_num(best["auc_sd"])]
            winners[attack] = (best["detector"], best["auc_mean"], [d["detector"] for d in tied])
    for attack, r in att.iterrows():
        print(f"{attack}: {r['n_success']} successful of {r['n_correct']} correctly classified "
              f"(success rate {r['success_rate']:.3f})" + ("  → n=0, metrics empty" if r["n_success"] == 0 else ""))
    print()
    print(text_table(header, rows))
    print("\nwinner per attack (mean AUC over seeds):")
    for attack, (det, auc, tied) in winners.items():
        print(f"  {attack:<9} {det} (AUC {auc:.3f})" + (f"; within one sd: {', '.join(tied)}" if tied else ""))

    # ---- 2. the studies' claims
    print("\nclaims (rules fixed before running):")
    s = summ.set_index(["attack", "detector"])

    def auc(attack, det):
        return s["auc_mean"].get((attack, det), np.nan)
    for attack in [x for x in ("pgd", "bim", "cw") if x in att.index]:
        lc, mfs, mah = auc(attack, "loss_curve"), auc(attack, "input_mfs"), auc(attack, "mahalanobis")
        if not np.isnan(lc):
            held = lc > np.nanmax([mfs, mah]) if not (np.isnan(mfs) and np.isnan(mah)) else None
            print(f"  study 000 on {attack}: loss curve {lc:.3f} vs InputMFS {mfs:.3f}, Mahalanobis "
                  f"{mah:.3f} → {'holds' if held else 'does not hold'}")
    for attack in att.index:
        cv = auc(attack, "curvature")
        if not np.isnan(cv):
            rec = s["label_recovery_mean"].get((attack, "curvature"), np.nan)
            chance = 1.0 / max(int(meta.get("num_classes", 10)) - 1, 1)
            print(f"  study 002 on {attack}: curvature AUC {cv:.3f} (> 0.5: "
                  f"{'yes' if cv > 0.5 else 'no'}), label recovery {rec:.3f} (chance {chance:.3f}: "
                  f"{'above' if rec > chance else 'not above'})")

    # ---- 3. speed: scoring 1,000 inputs from cached characteristics
    import torch

    from somprobe.classifier import load_trained
    from somprobe.detect.job import _load_features  # noqa: F401  (cache format documented there)

    print("\nspeed (1,000 inputs, characteristics cached):")
    model = load_trained(run, device=a.device)
    feat_root = run.detect_dir / "features"
    first_attack = next(iter(att.index[att["n_success"] > 1]), None)
    speed_rows = []
    som = None
    for det_name in summ["detector"].unique():
        if first_attack is None:
            break
        fc = np.load(feat_root / det_name / "clean.npz")["features"]
        fa = np.load(feat_root / det_name / f"{first_attack}.npz")["features"]
        if det_name == "som_distance" and som is None:
            som = som_context(run)
        refs = None
        if det_name == "loss_curve":
            refs = torch.zeros(1)  # scoring from characteristics never touches the references
        opts = {"n_directions": a.directions} if det_name == "curvature" else None
        det = build_detector(det_name, model=model, references=refs, som=som, device=a.device,
                             options=opts)
        det.fit_features(fc[: len(fa)], fa)
        f1000 = np.resize(np.concatenate([fc, fa]), (1000, fc.shape[1]))
        t = time.perf_counter()
        det.score_features(f1000)
        if det.recovers_labels:
            det.recover_labels_features(f1000)
        dt = time.perf_counter() - t
        speed_rows.append([det_name, f"{dt * 1e3:.1f} ms", "yes" if dt < 10 else "NO"])
    print(text_table(["detector", "score 1,000", "seconds, not minutes"], speed_rows))
    fs = res["feature_seconds"]
    if len(fs):
        g = fs.groupby("detector", sort=False)[["n", "seconds"]].sum()
        print("characteristics computed in this run (images/s, all sets): " + ", ".join(
            f"{d} {r['n'] / max(r['seconds'], 1e-9):.0f}" for d, r in g.iterrows()))

    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100_000)
    sc = rng.normal(size=100_000) + y
    t = time.perf_counter(); ours = M.roc_auc(y, sc); t_ours = time.perf_counter() - t
    t = time.perf_counter(); ref = roc_auc_score(y, sc); t_ref = time.perf_counter() - t
    print(f"\nROC AUC on 100,000 scores: somprobe {ours:.6f} in {t_ours * 1e3:.1f} ms, sklearn "
          f"{ref:.6f} in {t_ref * 1e3:.1f} ms (ratio somprobe/sklearn {t_ours / t_ref:.2f}); "
          f"equal: {abs(ours - ref) < 1e-12}")

    if a.markdown:
        print("\n" + md_table(header, rows))
        print("\n" + md_table(["detector", "score 1,000", "seconds, not minutes"], speed_rows))
    if timings:
        print(f"\nset-up timings: {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Studies 000 and 002 on a trained network: barrier gaps, region paths, convexity.

On the fashion-mnist resnet18 of ``somprobe train`` (copied into a run of this benchmark), with
the same library calls as ``somprobe attack`` / ``connect`` / ``convexity``:

1. natural–natural vs natural–adversarial (Linf PGD) pairs: barrier gap of the straight line
   (mean, median, share above δ), rounds and success of the barrier bypass (study 000: adversarial
   pairs have higher, more complex barriers);
2. an *untrained* resnet18 with class-optimal inputs from Gaussian noise (study 000: paths found
   after two rounds);
3. Fawzi's three scenarios with Algorithm 1 — natural–natural, natural–adversarial,
   natural–adversarial-from-noise (study 002: a path always exists, ≈ 10 anchors, D(p) ≈ 1 + 1e-4);
4. the convexity curve, k = 2…10 (study 002: regions are not convex).

    python benchmarks/barriers_regions.py --source-run /work/runs-shared/fmnist-resnet18 \\
        --run /work/runs-shared/barrier-fmnist --pairs 50

Prints one JSON object (also written to RUN/paths/benchmark.json) and a markdown summary.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_run import set_threads  # noqa: E402

DELTA = 1e-3


def ensure_copy(source: Path, run: Path, allow_incomplete: bool) -> dict:
    """Copy ``source/model/{checkpoint.pt, meta.json}`` into ``run/model`` (once)."""
    dst = run / "model"
    if not (dst / "checkpoint.pt").is_file():
        meta = json.loads((source / "model" / "meta.json").read_text())
        if not meta.get("complete") and not allow_incomplete:
            raise SystemExit(f"{source} is still training (epochs done: {meta.get('epochs_done')}); "
                             "wait, or pass --allow-incomplete to use its last finished epoch")
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("checkpoint.pt", "meta.json"):
            shutil.copy2(source / "model" / f, dst / f)
    return json.loads((dst / "meta.json").read_text())


def barrier_summary(rows: pd.DataFrame) -> dict:
    gap = rows["barrier_gap"].astype(float)
    ok = ~rows["failed"].astype(bool)
    return {"pairs": int(len(rows)), "skipped_or_failed": int((~ok).sum()),
            "gap_mean": float(gap[ok].mean()), "gap_median": float(gap[ok].median()),
            "share_gap_above_delta": float((gap[ok] >= DELTA).mean()),
            "rounds_mean": float(rows.loc[ok, "rounds"].mean()),
            "rounds_max": int(rows.loc[ok, "rounds"].max()) if ok.any() else None,
            "segments_mean": float(rows.loc[ok, "segments"].mean()),
            "success": float(rows.loc[ok, "success"].astype(bool).mean()),
            "max_loss_median": float(rows.loc[ok, "max_loss"].median())}


def region_summary(rows: pd.DataFrame) -> dict:
    ok = rows["success"].astype(bool)
    return {"pairs": int(len(rows)), "success": float(ok.mean()),
            "anchors_mean": float(rows.loc[ok, "anchors"].mean()),
            "anchors_median": float(rows.loc[ok, "anchors"].median()),
            "depth_max": int(rows.loc[ok, "depth"].max()) if ok.any() else None,
            "length_ratio_minus_1_mean": float((rows.loc[ok, "length_ratio"] - 1).mean()),
            "length_ratio_minus_1_median": float((rows.loc[ok, "length_ratio"] - 1).median()),
            "length_ratio_minus_1_max": float((rows.loc[ok, "length_ratio"] - 1).max()),
            "anchors_max": int(rows.loc[ok, "anchors"].max()) if ok.any() else None,
            "share_projected": float((rows["projections"] > 0).mean()),
            "projections_mean": float(rows["projections"].mean()),
            "anchors_mean_projected": float(rows.loc[ok & (rows["projections"] > 0), "anchors"].mean()),
            "length_ratio_minus_1_median_projected":
                float((rows.loc[ok & (rows["projections"] > 0), "length_ratio"] - 1).median()),
            "projection_steps_mean": float(rows["iterations"].sum() / max(1, rows["projections"].sum())),
            "depth_mean": float(rows.loc[ok, "depth"].mean()),
            "reasons": rows.loc[~ok, "reason"].astype(str).value_counts().head(3).to_dict()}


def merged(path: Path, out: dict) -> dict:
    """``out`` over the results already in ``path`` (a run of other ``--only`` stages keeps them)."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    new = dict(old)
    for k, v in out.items():
        new[k] = {**old[k], **v} if isinstance(v, dict) and isinstance(old.get(k), dict) else v
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-run", type=Path, default=Path("/work/runs-shared/fmnist-resnet18"))
    ap.add_argument("--run", type=Path, default=Path("/work/runs-shared/barrier-fmnist"))
    ap.add_argument("--allow-incomplete", action="store_true",
                    help="Use the source's last finished epoch while it is still training.")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--pool", type=int, default=1000, help="Test images the pairs are drawn from.")
    ap.add_argument("--iters", type=int, default=64, help="Adam budget per barrier point.")
    ap.add_argument("--max-depth", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=1e-3, help="Region-path check spacing.")
    ap.add_argument("--points", type=int, default=100, help="Points per segment of the job's dense re-check.")
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--eps", type=float, default=4 / 255)
    ap.add_argument("--untrained-pairs", type=int, default=20)
    ap.add_argument("--untrained-iters", type=int, default=512, help="Adam steps for the noise-optimal ends.")
    ap.add_argument("--untrained-lr", type=float, default=0.05,
                    help="Adam step of the noise-optimal ends and of their barrier points.")
    ap.add_argument("--trials", type=int, default=100, help="Convex combinations per k.")
    ap.add_argument("--only", default="barrier,regions,untrained,convexity",
                    help="Stages; 'summary' re-reads the stages' paths.csv already in the run and "
                         "recomputes their summaries (no new paths).")
    ap.add_argument("--reuse-attack", action="store_true",
                    help="Keep RUN/attacks/adv-pgd when it was made with the same pool, eps, steps and seed.")
    ap.add_argument("--projection", default="leading", help="Region paths' projection: leading or deepfool.")
    ap.add_argument("--settings", default="", help="Pair settings to run (nat, adv, noiseadv); default all.")
    ap.add_argument("--tag", default="", help="Suffix of the stage names and summary keys (no '-'), "
                                              "e.g. sp1em4 for a second spacing.")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    only = set(args.only.split(","))
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731

    from somprobe.attacks.job import attack_run
    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset
    from somprobe.models import build_model
    from somprobe.paths.barrier import find_barrier
    from somprobe.paths.convexity_job import convexity_run
    from somprobe.paths.job import connect_run
    from somprobe.paths.spaces import make_space
    from somprobe.paths.synthetic import calibrate_untrained_batchnorm, noise_optimal_pairs
    from somprobe.run import Run, atomic_write_json

    meta = ensure_copy(args.source_run, args.run, args.allow_incomplete)
    run = Run(args.run)
    net = load_trained(run, device="cpu").eval()
    size = int(meta["image_size"])
    test = load_dataset(meta["dataset"], split="test", image_size=size)
    pool = np.sort(np.random.default_rng(args.seed).permutation(len(test))[:args.pool])
    out = {"source_run": str(args.source_run), "run": str(run.root), "model": meta["model"],
           "dataset": meta["dataset"], "epochs_done": meta.get("epochs_done"),
           "complete": meta.get("complete"), "val_accuracy": (meta.get("val_accuracy") or [None])[-1],
           "threads": threads, "args": {k: str(v) for k, v in vars(args).items()}, "seconds": {}}
    opts = {"iters": args.iters, "max_depth": args.max_depth, "spacing": args.spacing, "points": args.points,
            "projection": args.projection}

    if "summary" in only:
        for stage_dir in sorted(run.paths_root.glob("*-*")):
            name, _, methods = stage_dir.name.partition("-")
            if not (stage_dir / "paths.csv").is_file():
                continue
            paths = pd.read_csv(stage_dir / "paths.csv")
            if "barrier" in methods.split("-"):
                out.setdefault("barrier", {})[name] = barrier_summary(paths[paths["method"] == "barrier"])
            if "regions" in methods.split("-"):
                out.setdefault("regions", {})[name] = region_summary(paths[paths["method"] == "regions"])

    if only & {"barrier", "regions"}:
        t = time.perf_counter()
        say(f"PGD Linf eps={args.eps:.4g}, {args.pgd_steps} steps on {len(pool)} test images")
        done = run.root / "attacks" / "adv-pgd" / "summary.json"
        want = {"n": len(pool), "eps": args.eps, "steps": args.pgd_steps, "seed": args.seed}
        prev = json.loads(done.read_text()) if done.is_file() else {}
        if args.reuse_attack and all(prev.get(k) == v for k, v in want.items()):
            atk = prev                                     # same attack already in the run
        else:
            atk = attack_run(run, model=net, dataset=test, indices=pool, name="adv-pgd", attack="pgd",
                             eps=args.eps, steps=args.pgd_steps, seed=args.seed, device="cpu",
                             extract=False, overwrite=True)
        out["attack"] = {k: atk[k] for k in ("n", "clean_acc", "perturbed_acc", "success_rate")}
        out["seconds"]["attack"] = time.perf_counter() - t
        settings = [("nat", "same-class", ["linear"] + [m for m in ("barrier", "regions") if m in only]),
                    ("adv", "adversarial:adv-pgd", ["linear"] + [m for m in ("barrier", "regions") if m in only])]
        if "regions" in only:
            settings.append(("noiseadv", "noise-adversarial", ["linear", "regions"]))
        if args.settings:
            keep = set(args.settings.split(","))
            settings = [st for st in settings if st[0] in keep]
        for name, source, methods in settings:
            if args.tag:
                name = f"{name}_{args.tag}"
            t = time.perf_counter()
            say(f"connect {name}: {source}, {', '.join(methods)}, {args.pairs} pairs")
            # One connect run per stage, so that a later --only regions keeps the barrier tables.
            stage = f"{name}-{'-'.join(m for m in methods if m != 'linear')}"
            connect_run(run, model=net, dataset=test, indices=pool, name=stage, pair_source=source,
                        n_pairs=args.pairs, methods=methods, options=opts, seed=args.seed,
                        device="cpu", overwrite=True, progress=False)
            out["seconds"][stage] = time.perf_counter() - t
            paths = pd.read_csv(run.paths_dir(stage) / "paths.csv")
            lin = paths[paths["method"] == "linear"]
            out.setdefault("linear_ok", {})[name] = float(lin["path_ok"].astype(bool).mean())
            if "barrier" in methods:
                out.setdefault("barrier", {})[name] = barrier_summary(paths[paths["method"] == "barrier"])
            if "regions" in methods:
                out.setdefault("regions", {})[name] = region_summary(paths[paths["method"] == "regions"])
            atomic_write_json(run.paths_root / "benchmark.json", merged(run.paths_root / "benchmark.json", out))  # partial results survive

    if "untrained" in only:
        t = time.perf_counter()
        say(f"untrained {meta['model']}: {args.untrained_pairs} noise-optimal pairs")
        raw = build_model(meta["model"], num_classes=int(meta.get("num_classes", 10)), image_size=size,
                          seed=args.seed).eval()
        # As `somprobe connect --pair-source noise-optimal` does (noise_sources.draw_noise_pairs).
        calibrated = calibrate_untrained_batchnorm(raw, (3, size, size), seed=args.seed + 1, std=0.1)
        for p in raw.parameters():
            p.requires_grad_(False)
        a, b, target, res = noise_optimal_pairs(raw, int(meta.get("num_classes", 10)), args.untrained_pairs,
                                                (3, size, size), seed=args.seed, iters=args.untrained_iters,
                                                lr=args.untrained_lr, tol=1e-3, std=0.1, lambda_hf=0.05)
        bb = find_barrier(make_space(raw, "input"), a, b, target, iters=args.iters, lr=args.untrained_lr,
                          max_depth=args.max_depth, ends="keep")
        rounds = bb.stats["rounds"]
        ok = bb.stats["success"].astype(bool)
        out["untrained"] = {"pairs": int(len(target)), "batchnorm_calibrated": bool(calibrated),
                            "lr": args.untrained_lr, "end_iters": args.untrained_iters,
                            "ends_converged": float(res.converged.mean()),
                            "end_loss_median": float(np.nanmedian(res.loss)),
                            "end_loss_max": float(np.nanmax(res.loss)),
                            "barrier_gap_mean": float(np.mean(bb.stats["barrier_gap"])),
                            "rounds_mean_success": float(rounds[ok].mean()) if ok.any() else None,
                            "segments_mean_success": float(bb.stats["segments"][ok].mean()) if ok.any() else None,
                            "reasons": pd.Series(bb.stats["reason"][~ok]).astype(str).str.slice(0, 40)
                                         .value_counts().to_dict(),
                            "barrier_gap_median": float(np.median(bb.stats["barrier_gap"])),
                            "share_gap_above_delta": float((bb.stats["barrier_gap"] >= DELTA).mean()),
                            "success": float(bb.stats["success"].mean()),
                            "rounds_hist": {int(r): int((rounds == r).sum()) for r in np.unique(rounds)},
                            "success_within_2_rounds": float((bb.stats["success"] & (rounds <= 2)).mean())}
        out["seconds"]["untrained"] = time.perf_counter() - t
        atomic_write_json(run.paths_root / "benchmark.json", merged(run.paths_root / "benchmark.json", out))

    if "convexity" in only:
        t = time.perf_counter()
        say("convexity, k = 2..10")
        conv = convexity_run(run, model=net, dataset=test, indices=pool, ks=range(2, 11),
                             trials=args.trials, per_class=30, seed=args.seed, device="cpu", overwrite=True)
        out["convexity"] = {str(r["k"]): round(r["share_in_class"], 3) for r in conv["summary"]}
        out["seconds"]["convexity"] = time.perf_counter() - t

    out = merged(run.paths_root / "benchmark.json", out)
    atomic_write_json(run.paths_root / "benchmark.json", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

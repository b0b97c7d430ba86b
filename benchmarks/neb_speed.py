"""NEB batched over pairs vs the same NEB one pair at a time; linear checks vs bare forwards.

Both sides run in the same process on the same model, pairs and settings:

* NEB: ``find_neb`` on all pairs at once (somprobe) against two references, same code, same
  settings, results asserted equal (anchors within a tolerance, same iterations and path_ok):

  - ``pivot`` — **one pair at a time, one pivot at a time**: ``find_neb`` per pair with
    ``chunk=1``, i.e. one forward/backward pass per pivot and one forward per point of the
    dense check. This is how PyTorch-AutoNEB runs (``torch_autoneb/neb_model.py``,
    ``NEB.apply``: ``for i in range(npivots): self.model.set_coords_no_grad(...);
    self.model.apply(gradient)``; ``iterate_densely`` yields one point at a time) and how study
    001's code, built on it, evaluates a band. The faithful reference for the ≥ 5× target.
  - ``pair`` — one pair per call with its pivots batched (one forward/backward for the band):
    a stricter reference than AutoNEB itself.

  The batched run should be at least 5× faster than the faithful reference.
* Linear: ``linear_profile`` points per second against the model's bare forward throughput
  (``space.logits`` on a ready batch of the same size, no interpolation, no bookkeeping); the
  target is ≥ 80 %. Where the space's tail is affine (``Space.affine``: a ResNet's CL4, average
  pooling + linear layer) ``linear_profile`` interpolates the ends' logits; the script then also
  times the general route (every point through the tail) and checks that both give the same
  ``linear_ok`` for every pair (the largest loss difference is printed).

Usage::

    python benchmarks/neb_speed.py --run /work/runs-shared/mnist5k-s0 --pairs 25 --steps 20 \
        --points 10 --spaces input,CL2,CL3,CL4 --references pivot,pair
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch


def _model(run):
    from somprobe.classifier import load_trained
    from somprobe.models import build_model

    if run:
        return load_trained(run).eval(), json.loads(open(f"{run}/model/meta.json").read())["dataset"]
    return build_model("resnet18", num_classes=10, image_size=32, seed=0).eval(), "mnist5k"


def _pairs(model, dataset, n_pairs, seed):
    from somprobe.attacks.core import predict_labels
    from somprobe.data import load_dataset
    from somprobe.paths import same_class_pairs

    ds = load_dataset(dataset, split="test", image_size=model.image_size)
    idx = np.random.default_rng(seed).permutation(len(ds))[:600]
    x = ds.images(idx, model.image_size)
    with torch.no_grad():
        preds = predict_labels(model, x).numpy()
    df, _ = same_class_pairs(np.asarray(ds.labels)[idx], preds, n_pairs=n_pairs, seed=seed)
    return x[df["a"].to_numpy()], x[df["b"].to_numpy()], torch.as_tensor(df["class"].to_numpy())


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="Run with a trained model (default: untrained resnet18, 32 px).")
    ap.add_argument("--pairs", type=int, default=25)
    ap.add_argument("--steps", type=int, default=30, help="NEB step budget.")
    ap.add_argument("--pivots", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="NEB tolerance; small, so bands of a trained model really move.")
    ap.add_argument("--points", type=int, default=20, help="Dense-check points per segment.")
    ap.add_argument("--spaces", default="input,CL2,CL4")
    ap.add_argument("--linear-points", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=500, help="Points per forward pass (both sides).")
    ap.add_argument("--references", default="pivot,pair",
                    help="pivot: one pair and one pivot per pass (AutoNEB); pair: one pair per call, "
                         "pivots batched.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from somprobe.paths import find_neb, linear_profile, make_space
    from somprobe.paths.spaces import encode_images

    model, dataset = _model(args.run)
    xa, xb, target = _pairs(model, dataset, args.pairs, args.seed)
    kw = dict(steps=args.steps, pivots=args.pivots, points=args.points, chunk=args.chunk, tol=args.tol)
    print(f"model {model.name} on {dataset}, {len(target)} same-class pairs, torch threads {args.threads}")
    rows = []
    for name in args.spaces.split(","):
        space = make_space(model, name)
        za, zb = encode_images(space, xa), encode_images(space, xb)
        # untimed warm-up: the first autograd pass of a process pays one-off loading costs
        find_neb(space, za[:1], zb[:1], target[:1], **dict(kw, steps=1))
        t_batch, res = _best(lambda: find_neb(space, za, zb, target, **kw), 1)
        row = {"space": space.name, "neb_batched_s": round(t_batch, 2)}
        same_all = True
        for ref in [r.strip() for r in args.references.split(",") if r.strip()]:
            ref_kw = dict(kw, chunk=1) if ref == "pivot" else kw
            if ref not in ("pivot", "pair"):
                raise SystemExit(f"unknown reference {ref!r}: use pivot and/or pair")
            t0 = time.perf_counter()
            ones = [find_neb(space, za[i:i + 1], zb[i:i + 1], target[i:i + 1], **ref_kw)
                    for i in range(len(target))]
            t_loop = time.perf_counter() - t0
            anchors = torch.cat([o.anchors for o in ones])
            diff = float((anchors - res.anchors).abs().max() / res.anchors.abs().max().clamp(min=1e-12))
            same_it = all(o.stats["iterations"][0] == res.stats["iterations"][i] for i, o in enumerate(ones))
            same_ok = all(o.stats["path_ok"][0] == res.stats["path_ok"][i] for i, o in enumerate(ones))
            same = same_it and same_ok and diff < 1e-3
            same_all &= same
            row.update({f"{ref}_s": round(t_loop, 2), f"{ref}_speedup": round(t_loop / t_batch, 2),
                        f"{ref}_max_rel_anchor_diff": f"{diff:.1e}", f"{ref}_same": same})
            if not same:
                print(f"WARNING: {space.name}, reference {ref}: results differ (iterations same: "
                      f"{same_it}, path_ok same: {same_ok}, max relative anchor difference {diff:.1e})")

        # Linear: same number of points per forward pass on both sides.
        P, T = len(target), args.linear_points
        n_points = P * T
        t_lin, prof = _best(lambda: linear_profile(space, za, zb, target, T, chunk=args.chunk), 3)
        batch = (za[:1] + torch.rand(args.chunk, *za.shape[1:]) * (zb[:1] - za[:1]))
        reps = -(-n_points // args.chunk)

        def bare():
            with torch.no_grad():
                for _ in range(reps):
                    space.logits(batch)
        t_bare, _ = _best(bare, 3)
        bare_rate = reps * args.chunk / t_bare
        general = {}
        if space.affine:
            # The affine route (end logits interpolated) against every point through the tail.
            plain = dataclasses.replace(space, affine=False)
            t_gen, prof_gen = _best(lambda: linear_profile(plain, za, zb, target, T, chunk=args.chunk), 3)
            same_ok = bool((prof_gen["linear_ok"] == prof["linear_ok"]).all())
            dloss = float(np.nanmax(np.abs(prof_gen["loss"] - prof["loss"])))
            general = {"general_route_over_bare": round((n_points / t_gen) / bare_rate, 3),
                       "affine_same_linear_ok": same_ok, "affine_max_loss_diff": f"{dloss:.1e}"}
            same_all &= same_ok
            if not same_ok:
                print(f"WARNING: {space.name}: the affine route's linear_ok differs from evaluating every point")
        rows.append({
            **row, "same_results": same_all,
            "neb_iterations_mean": float(np.mean(res.stats["iterations"])),
            "linear_points_per_s": round(n_points / t_lin), "bare_forward_points_per_s": round(bare_rate),
            "linear_over_bare": round((n_points / t_lin) / bare_rate, 3), **general,
            "linear_ok": int(prof["linear_ok"].sum()), "neb_path_ok": int(res.stats["path_ok"].sum()),
        })
        print(json.dumps(rows[-1]))
    print()
    refs = [r.strip() for r in args.references.split(",") if r.strip()]
    head = {"pivot": "one pair, one pivot per pass (AutoNEB)", "pair": "one pair per call, pivots batched"}
    print("| space | NEB batched (s) | " + " | ".join(f"{head[r]} (s) | speed-up" for r in refs)
          + " | same results | linear pts/s | bare fwd pts/s | linear/bare | general route/bare |")
    print("|---|---|" + "---|---|" * len(refs) + "---|---|---|---|---|")
    for r in rows:
        refs_txt = " | ".join(f"{r[f'{x}_s']} | {r[f'{x}_speedup']}×" for x in refs)
        diffs = ", ".join(f"{x} {r[f'{x}_max_rel_anchor_diff']}" for x in refs)
        gen = (f"{r['general_route_over_bare']:.0%} (affine route: same linear_ok "
               f"{'yes' if r['affine_same_linear_ok'] else 'NO'}, max loss diff {r['affine_max_loss_diff']})"
               if "general_route_over_bare" in r else "— (tail not affine)")
        print(f"| {r['space']} | {r['neb_batched_s']} | {refs_txt} | "
              f"{'yes' if r['same_results'] else 'NO'} (max rel. anchor diff {diffs}) | "
              f"{r['linear_points_per_s']} | {r['bare_forward_points_per_s']} | {r['linear_over_bare']:.0%} | {gen} |")
    if not all(r["same_results"] for r in rows):
        raise SystemExit("batched and one-at-a-time NEB disagree (see the WARNING lines)")


if __name__ == "__main__":
    main()

"""Targeted projection into a given class region: the cheap one of the region paths vs DeepFool.

Region paths (study 002, Algorithm 1) project every midpoint that left the class back into it
with a logit margin. Targeted DeepFool (``somprobe.attacks.deepfool.deepfool(target=...)``)
differentiates all C − 1 competitors at every step and steps-then-clips in the pixel box;
``somprobe.paths.projection.project_leading`` differentiates one soft-leading competitor and leaves
pixels at a bound out of the step. This script projects test images of a trained run into another
class (seeded) with each and prints, per method, the share that arrived, the steps, the L2 move and
the seconds (same images, same process).

    OMP_NUM_THREADS=1 python benchmarks/region_projection.py --run /work/runs-shared/barrier-fmnist-final
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_run import set_threads  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/work/runs-shared/barrier-fmnist-final", help="Run with a trained model/.")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)

    from somprobe.attacks.deepfool import deepfool
    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset
    from somprobe.paths.projection import project_leading

    net = load_trained(args.run, device="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    size = int(net.meta["image_size"])
    ds = load_dataset(net.meta["dataset"], split="test", image_size=size)
    idx = np.sort(np.random.default_rng(args.seed).permutation(len(ds))[:args.images])
    x = ds.images(idx, size)
    with torch.no_grad():
        pred = net(x).argmax(1)
    gen = torch.Generator().manual_seed(args.seed)
    n_cls = int(net.meta.get("num_classes", 10))
    target = (pred + torch.randint(1, n_cls, (len(idx),), generator=gen)) % n_cls
    kw = dict(margin=args.margin)
    runs = {
        "deepfool": lambda: deepfool(net, x, target=target, max_iter=args.steps, clip=(0.0, 1.0), **kw),
        "leading_step_then_clip": lambda: project_leading(net, x, target, max_steps=args.steps, clip=(0.0, 1.0),
                                                          box_aware=False, **kw),
        "leading": lambda: project_leading(net, x, target, max_steps=args.steps, clip=(0.0, 1.0), **kw),
    }
    out = {"run": str(args.run), "images": int(len(idx)), "threads": threads, "margin": args.margin,
           "steps": args.steps}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        res = fn()
        sec = time.perf_counter() - t0
        move = res.r.flatten(1).norm(dim=1)
        with torch.no_grad():
            logits = net(res.images)
        lead = logits.gather(1, target[:, None])[:, 0] - logits.scatter(1, target[:, None], float("-inf")).amax(1)
        out[name] = {"arrived": float(res.converged.float().mean()),
                     "margin_checked": float((lead >= args.margin - 1e-5).float().mean()),
                     "steps_mean": float(res.iterations.float().mean()), "steps_max": int(res.iterations.max()),
                     "move_median": float(move.median()), "move_mean": float(move.mean()),
                     "seconds": round(sec, 2)}
        print(f"{name}: {out[name]}", file=sys.stderr, flush=True)
    out["speedup_leading_vs_deepfool"] = round(out["deepfool"]["seconds"] / out["leading"]["seconds"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Study 001's Table 1 on a real model: resnet18 trained by ``somprobe train`` on Fashion-MNIST.

Copies the trained ``model/`` (checkpoint + meta only) of ``--src`` into the run ``--run``, joins
``--pairs`` same-class pairs of correctly classified test images by straight lines and NEB paths
in pixel space and in CL1–CL4, and prints Table 1 next to the study's (ResNet50 on CIFAR10,
25 pairs: original 19/6/0, intermediate 14/11/0, last 25/0/0).

It also checks what the tail after CL4 is: global average pooling then one linear layer, so
logits are an affine function of the CL4 latent and each class region there is an intersection
of half-spaces (convex): every straight line between two points of a class stays in it. The
script verifies the tail is affine (tail of a mixture = mixture of tails) and that random
convex combinations of same-class CL4 latents keep the class, and prints the CL latent shapes at
32 and 64 px.

Usage::

    python benchmarks/connectivity.py --src /work/runs-shared/fmnist-resnet18 \\
        --run /work/runs-shared/paths-fmnist --pairs 25
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

STUDY = {"input": (19, 6, 0), "intermediate": (14, 11, 0), "last": (25, 0, 0)}


def _copy_model(src: Path, run: Path, allow_incomplete: bool) -> dict:
    meta = json.loads((src / "model" / "meta.json").read_text())
    if not meta.get("complete") and not allow_incomplete:
        raise SystemExit(f"{src}/model is not completely trained yet (epochs_done "
                         f"{meta.get('epochs_done')}/{meta.get('epochs')}); wait or pass --allow-incomplete")
    (run / "model").mkdir(parents=True, exist_ok=True)
    for f in ("checkpoint.pt", "meta.json"):
        if not (run / "model" / f).is_file() or (src / "model" / f).stat().st_mtime > (run / "model" / f).stat().st_mtime:
            shutil.copy2(src / "model" / f, run / "model" / f)
    return json.loads((run / "model" / "meta.json").read_text())


def _latent_shapes(model) -> dict:
    from somprobe.paths import make_space

    out = {}
    for size in (32, 64):
        x = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            out[size] = {f"CL{k}": list(make_space(model, f"CL{k}").encode(x).shape[1:]) for k in range(1, 5)}
    return out


def _cl4_convexity(model, dataset, seed: int, n: int = 400) -> dict:
    """The tail after CL4 is affine and its class regions convex: checked numerically."""
    from somprobe.attacks.core import predict_labels
    from somprobe.paths import make_space

    space = make_space(model, "CL4")
    g = torch.Generator().manual_seed(seed)
    idx = np.random.default_rng(seed).permutation(len(dataset))[:n]
    x = dataset.images(idx, model.image_size)
    labels = torch.as_tensor(np.asarray(dataset.labels)[idx])
    with torch.no_grad():
        z = space.encode(x)
        pred = predict_labels(model, x)
        keep = pred == labels
        z, labels = z[keep], labels[keep]
        # Affine: tail(a z1 + (1-a) z2) = a tail(z1) + (1-a) tail(z2).
        i, j = torch.randperm(len(z), generator=g)[:2 * 100].reshape(2, -1)
        a = torch.rand(len(i), 1, generator=g)
        mix = a[..., None, None] * z[i] + (1 - a[..., None, None]) * z[j]
        lhs = space.logits(mix)
        rhs = a * space.logits(z[i]) + (1 - a) * space.logits(z[j])
        affine_err = float((lhs - rhs).abs().max() / rhs.abs().max())
        # Convex combinations of 2..10 same-class latents keep the class.
        trials, kept = 0, 0
        for c in labels.unique():
            zc = z[labels == c]
            if len(zc) < 2:
                continue
            for k in range(2, 11):
                w = torch.distributions.Dirichlet(torch.ones(min(k, len(zc)))).sample((20,))
                pick = torch.stack([torch.randperm(len(zc), generator=g)[:w.shape[1]] for _ in range(20)])
                comb = (w[..., None, None, None] * zc[pick]).sum(1)
                kept += int((space.logits(comb).argmax(1) == c).sum())
                trials += 20
    tail = [n for n, _ in model.net.named_children() if n in ("global_pool", "fc", "head_drop")]
    return {"tail_modules_after_layer4": tail, "affine_max_rel_error": affine_err,
            "convex_combinations": trials, "convex_combinations_kept": kept}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="/work/runs-shared/fmnist-resnet18")
    ap.add_argument("--run", default="/work/runs-shared/paths-fmnist")
    ap.add_argument("--name", default="study001")
    ap.add_argument("--pairs", type=int, default=25)
    ap.add_argument("--spaces", default="input,CL1,CL2,CL3,CL4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--points", type=int, default=100, help="Dense-check points per segment.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--allow-incomplete", action="store_true",
                    help="Use the source model even if its training has not finished.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from somprobe.classifier import load_trained
    from somprobe.data import load_dataset
    from somprobe.paths.job import connect_run
    from somprobe.run import Run

    run = Run(args.run)
    meta = _copy_model(Path(args.src), run.root, args.allow_incomplete)
    model = load_trained(run).eval()
    ds = load_dataset(meta["dataset"], split="test", image_size=meta["image_size"])
    print(f"{meta['model']} on {meta['dataset']} at {meta['image_size']} px, val accuracy "
          f"{meta.get('final_val_accuracy', (meta.get('val_accuracy') or [None])[-1])}, "
          f"epochs {meta.get('epochs_done')}/{meta.get('epochs')} (complete: {meta.get('complete')})")
    shapes = _latent_shapes(model)
    print("CL latent shapes (C, H, W):", json.dumps(shapes))
    t0 = time.perf_counter()
    summary = connect_run(run, model=model, dataset=ds, name=args.name, spaces=args.spaces.split(","),
                          n_pairs=args.pairs, methods=("linear", "neb"),
                          options={"steps": args.steps, "points": args.points}, seed=args.seed,
                          resume=args.resume, overwrite=not args.resume, progress=True)
    seconds = time.perf_counter() - t0
    conv = _cl4_convexity(model, ds, args.seed)
    print(f"\nconnect: {summary['pairs']} pairs in {seconds:.0f} s; skipped: {summary['counts']}")
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in summary["timings"].items()}))
    print("\n| space | linear | non-linear only | no path | failed | study 001 (ResNet50, CIFAR10) |")
    print("|---|---|---|---|---|---|")
    for row in summary["table1"]:
        ref = {"input": STUDY["input"], "CL4": STUDY["last"]}.get(row["space"], STUDY["intermediate"])
        which = {"input": "original", "CL4": "last"}.get(row["space"], "intermediate")
        print(f"| {row['space']} | {row['linear']} | {row['nonlinear_only']} | {row['no_path']} | "
              f"{row['failed']} | {which}: {ref[0]}/{ref[1]}/{ref[2]} |")
    print("\nCL4 tail:", json.dumps(conv))
    out = run.paths_dir(args.name) / "benchmark.json"
    out.write_text(json.dumps({"summary": summary, "latent_shapes": shapes, "cl4": conv,
                               "seconds": seconds, "args": vars(args)}, indent=2, default=str))
    print(f"results in {out}")


if __name__ == "__main__":
    main()

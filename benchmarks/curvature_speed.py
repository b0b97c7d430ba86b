"""Curvature speed: batched over samples (and classes × directions) vs a per-sample loop, one run.

Two measurements on the same model, points and random directions (study 002 / issue 11):

1. principal curvatures of the boundary at ``z`` (k = 10 largest and smallest eigenvalues of
   ``P H P / ||∇F||``, batched Lanczos, finite-difference Hessian-vector products; ``--tol``
   lets each sample stop early): one call for all samples vs a Python loop calling it for one
   sample at a time (same start vector and iterations, so all 2k eigenvalues agree to float
   rounding — checked, and the products per sample are printed); scipy's ``eigsh`` on a
   per-sample ``LinearOperator`` (which='BE', 2k eigenvalues) as the library reference. Printed
   first: the model's own batching gain for one gradient pass (2 points vs 2·samples points per
   call), the ceiling of any batched-vs-loop ratio that does the same products;
2. Algorithm 2 (``class_curvatures``, T = 20 directions, every class i != k̂): one batched call vs
   the plain loop over samples × classes × directions (one Hessian-vector product per call).

    python benchmarks/curvature_speed.py              # resnet18 (random init), 32 px, 16 samples
    python benchmarks/curvature_speed.py --quick      # test_resnet, 16 px, 4 samples

Ratio = loop time / batched time (wall clock; CPU time of this process too, which a busy
machine disturbs less). The model is a randomly initialised resnet18 behind somprobe's
wrapper: timings do not depend on the weights.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--run", help="a run whose trained model/ to use instead of an untrained --model "
                                 "(an untrained network's eval-mode BatchNorm makes it nearly "
                                 "constant: finite-difference Hessians can vanish)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--directions", type=int, default=20)
    p.add_argument("--loop-samples", type=int, default=None,
                   help="samples timed in the loops (default all; fewer → time scaled per sample)")
    p.add_argument("--eigsh-samples", type=int, default=2, help="samples timed with scipy eigsh (0: skip)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", default="deepfool,principal,algorithm2",
                   help="which measurements (comma separated)")
    p.add_argument("--tol", type=float, default=-1.0,
                   help="principal curvatures: relative residual at which a sample stops early "
                        "(default <0: never, every sample runs the full Lanczos iterations; early "
                        "stopping misses late eigenvalues of the finite-difference operator)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.image_size, a.samples, a.directions, a.k = "test_resnet", 16, 4, 4, 3
    if a.threads:
        torch.set_num_threads(a.threads)

    from somprobe.geometry import (DEFAULT_H, Margin, class_curvatures, default_iters,
                                   directional_curvature, principal_curvatures, projected_hvp,
                                   random_directions)
    from somprobe.models import build_model, resolve_device

    dev = resolve_device(a.device)
    if a.run:
        from somprobe.classifier import load_trained

        model = load_trained(a.run, device=dev).eval()
        a.model, a.image_size = f"{model.meta.get('model')} ({a.run})", int(model.image_size)
    else:
        model = build_model(a.model, num_classes=10, image_size=a.image_size, device=dev, seed=0).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(a.samples, 3, a.image_size, a.image_size, generator=g).to(dev)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    F = Margin(model, top2[:, 1], top2[:, 0])
    d = x[0].numel()
    iters = default_iters(a.k, d)
    n_loop = a.samples if a.loop_samples is None else min(a.loop_samples, a.samples)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"model {a.model} {a.image_size}px, d={d}, device {dev}, threads {torch.get_num_threads()}, "
          f"{a.samples} samples, k={a.k} ({iters} Lanczos iterations), T={a.directions}")

    parts = set(a.parts.split(","))
    # 0. DeepFool: batched vs torchattacks' per-sample loop -------------------------------
    if "deepfool" in parts:
        import torchattacks

        from somprobe.attacks import deepfool

        y = top2[:, 0]
        sync(); t = time.perf_counter()
        ours = deepfool(model, x, y, max_iter=50)
        sync(); t_o = time.perf_counter() - t
        sync(); t = time.perf_counter()
        ref = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y)
        sync(); t_r = time.perf_counter() - t
        print(f"DeepFool (50 steps, all classes): somprobe batched {t_o:.2f} s, torchattacks {t_r:.2f} s "
              f"→ ratio {t_r / t_o:.1f}x; max |difference| {float((ours.images - ref).abs().max()):.1e}, "
              f"converged {float(ours.converged.float().mean()):.2f}")

    # 1. principal curvatures ------------------------------------------------------------
    if "principal" in parts:
        from somprobe.geometry import margin_grad

        tol = None if a.tol < 0 else a.tol
        # The ceiling of any batched-vs-loop ratio at equal work: the model's own gain from
        # batching one finite-difference product (2 points per sample) over all samples.
        def per_point(n, reps):
            xs = x[torch.arange(n) % a.samples]
            Fn = Margin(model, top2[torch.arange(n) % a.samples, 1], top2[torch.arange(n) % a.samples, 0])
            margin_grad(Fn, xs)
            sync(); t = time.perf_counter(); c = time.process_time()
            for _ in range(reps):
                margin_grad(Fn, xs)
            sync()
            return (time.perf_counter() - t) / (reps * n), (time.process_time() - c) / (reps * n)
        small, big = per_point(2, 8), per_point(2 * a.samples, 2)
        print(f"model batching ceiling: one gradient pass costs {small[0] * 1e3:.1f} ms/point at 2 points, "
              f"{big[0] * 1e3:.1f} ms/point at {2 * a.samples} → {small[0] / big[0]:.1f}x wall "
              f"({small[1] / big[1]:.1f}x CPU time)")
        sync(); t = time.perf_counter(); c = time.process_time()
        batched = principal_curvatures(F, x, k=a.k, seed=0, tol=tol)
        sync(); t_b = time.perf_counter() - t; c_b = time.process_time() - c
        sync(); t = time.perf_counter(); c = time.process_time()
        loop_top, loop_bottom, loop_steps = [], [], []
        for b in range(n_loop):
            Fb = Margin(model, top2[b:b + 1, 1], top2[b:b + 1, 0])
            r = principal_curvatures(Fb, x[b:b + 1], k=a.k, seed=0, tol=tol)
            loop_top.append(r.top)
            loop_bottom.append(r.bottom)
            loop_steps.append(r.steps)
        sync(); t_l = (time.perf_counter() - t) * a.samples / n_loop
        c_l = (time.process_time() - c) * a.samples / n_loop
        # same start vector for every sample (alone or batched): all 2k eigenvalues must agree
        lt, lb = torch.cat(loop_top), torch.cat(loop_bottom)
        scale = batched.top[:n_loop, 0].abs().max().clamp_min(1e-30)
        diff = float(torch.maximum((batched.top[:n_loop] - lt).abs().max(),
                                   (batched.bottom[:n_loop] - lb).abs().max()) / scale)
        steps_b = batched.steps.float()
        print(f"principal curvatures (tol {tol}): batched {t_b:.2f} s ({t_b / a.samples:.3f} s/sample, "
              f"CPU {c_b:.2f} s), per-sample loop {t_l:.2f} s (CPU {c_l:.2f} s) → ratio "
              f"{t_l / t_b:.1f}x wall, {c_l / c_b:.1f}x CPU time; Hessian-vector products per sample "
              f"{steps_b.mean():.1f} (min {steps_b.min():.0f}, max {steps_b.max():.0f}, cap {iters}), "
              f"loop {torch.cat(loop_steps).float().mean():.1f}; all 2k eigenvalues batched vs loop: "
              f"max relative difference {diff:.1e}")
        if a.eigsh_samples:
            from scipy.sparse.linalg import LinearOperator, eigsh

            n_e = min(a.eigsh_samples, a.samples)
            t = time.perf_counter()
            rel = []
            # samples whose operator is not zero (a ReLU net can have a constant gradient over the
            # whole finite-difference ball; ARPACK refuses a zero operator)
            from scipy.sparse.linalg import ArpackError

            live = [b for b in range(a.samples) if float(batched.top[b, 0]) != 0.0]
            used = []
            for b in live:
                if len(used) == n_e:
                    break
                Fb = Margin(model, top2[b:b + 1, 1], top2[b:b + 1, 0])
                zb = x[b:b + 1]
                calls = [0]

                def mv(v, Fb=Fb, zb=zb):
                    calls[0] += 1
                    u = torch.as_tensor(np.asarray(v).reshape(1, 1, *zb.shape[1:]), dtype=zb.dtype, device=dev)
                    return projected_hvp(Fb, zb, u, h=DEFAULT_H).reshape(-1).double().cpu().numpy()

                op = LinearOperator((d, d), matvec=mv, dtype=np.float64)
                try:
                    vals = eigsh(op, k=2 * a.k, which="BE", tol=1e-4, return_eigenvectors=False,
                                 v0=np.random.default_rng(0).standard_normal(d))
                except ArpackError as e:  # e.g. the operator maps the start vector to zero
                    print(f"  scipy eigsh: sample {b} skipped ({e})")
                    continue
                used.append(b)
                rel.append(float(np.abs(np.sort(vals)[-1] - float(batched.top[b, 0])) / abs(float(batched.top[b, 0]))))
            live = used
            t_e = (time.perf_counter() - t) * a.samples / max(len(live), 1)
            print(f"  scipy eigsh per sample (which='BE', tol 1e-4, {calls[0]} matvecs for the last): "
                  f"{t_e:.2f} s for {a.samples} samples (extrapolated from {n_e}) → ratio {t_e / t_b:.1f}x; "
                  f"largest eigenvalue vs batched Lanczos: max relative difference {max(rel):.1e}")

    # 2. Algorithm 2 ----------------------------------------------------------------------
    if "algorithm2" in parts:
        dirs = random_directions(a.samples, a.directions, x.shape[1:], seed=3, device=dev)
        sync(); t = time.perf_counter()
        cc = class_curvatures(model, x, directions=dirs)
        sync(); t_b2 = time.perf_counter() - t
        sync(); t = time.perf_counter()
        with torch.no_grad():
            k_hat = model(x).argmax(1)
        loop_pc = torch.full((n_loop, 10), float("nan"))
        for b in range(n_loop):
            for i in range(10):
                if i == int(k_hat[b]):
                    continue
                Fi = Margin(model, torch.tensor([i], device=dev), k_hat[b:b + 1])
                vals = [directional_curvature(Fi, x[b:b + 1], dirs[b:b + 1, j:j + 1]) for j in range(a.directions)]
                loop_pc[b, i] = torch.cat(vals, 1).mean().cpu()
        sync(); t_l2 = (time.perf_counter() - t) * a.samples / n_loop
        diff2 = float(torch.nanmean((loop_pc - cc.per_class[:n_loop].cpu()).abs()) /
                      torch.nanmean(cc.per_class[:n_loop].abs().cpu()))
        print(f"Algorithm 2 (T={a.directions}, 9 classes): batched {t_b2:.2f} s ({t_b2 / a.samples:.3f} s/sample), "
              f"loop over samples x classes x directions {t_l2:.2f} s → ratio {t_l2 / t_b2:.1f}x "
              f"(mean relative difference {diff2:.1e})")


if __name__ == "__main__":
    main()

"""The run-level geometry job behind ``somprobe geometry`` (study 002's curvature and subspace).

Files written in ``run.geometry_dir`` (each atomically; ``summary.json`` last, so its presence
means the job finished)::

    curvature.csv     one row per sample × point (natural x, boundary z = x + r(x), DeepFool's
                      adversarial image): r norm, DeepFool convergence, the extreme principal
                      curvatures at z, Algorithm 2's mean curvature ρ and recovered label
    eigenvalues.csv   the k largest and k smallest principal curvatures at every boundary point
    subspace.npz      basis of the shared subspace S, its singular values, the samples it came from
    projections.csv   ||P_S v|| / ||v|| for random, adversarial (DeepFool r), x2 - x1, gradient v
    table1.csv        their means beside study 002's Table 1 (LeNet)
    noise.csv         misclassification under random noise in S vs S⊥ vs magnitude (Fig. 7)
    hsweep.csv        mean directional curvature at boundary points vs finite-difference step h
    summary.json      parameters, counts, headline statistics, timings
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..attacks.core import _attack_mode
from ..device import resolve_device
from ..errors import GeometryError
from ..run import Run, atomic_output, atomic_write_json, save_csv
from .boundary import boundary_points
from .hessian import DEFAULT_H, METHODS, check_h, class_curvatures, directional_curvature, random_directions
from .lanczos import principal_curvatures
from .margin import Margin
from .subspace import projection_ratio, shared_subspace, subspace_noise_flips

__all__ = ["geometry_run", "DEFAULT_MAGNITUDES", "DEFAULT_HSWEEP", "STUDY_TABLE1"]

DEFAULT_MAGNITUDES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
DEFAULT_HSWEEP = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
# Study 002, Table 1 (LeNet on MNIST): ||P_S v|| / ||v||.
STUDY_TABLE1 = {"random": 0.25, "adversarial": 0.64, "x2 - x1": 0.10, "gradient": 0.22}


def _int(name, v, low=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise GeometryError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def geometry_run(
    run,
    *,
    model: torch.nn.Module,
    dataset,
    samples: int = 50,
    subspace_samples: int = 100,
    directions: int = 20,
    k: int = 10,
    h: float = DEFAULT_H,
    method: str = "fd",
    smooth_beta: float | None = None,
    subspace_dim: int | None = None,
    magnitudes=DEFAULT_MAGNITUDES,
    hsweep=DEFAULT_HSWEEP,
    hsweep_samples: int = 8,
    overshoot: float = 0.02,
    max_iter: int = 50,
    batch_size: int = 25,
    chunk: int = 2048,
    device="auto",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Study 002's boundary geometry on a run's model: curvature, shared subspace, noise, h sweep.

    Parameters
    ----------
    run : Run or path
        Where ``geometry/`` is written.
    model : nn.Module
        Classifier on pixels in [0, 1].
    dataset : ImageDataset
        Images to probe (``.images(idx)``, ``.labels``, ``.ids``). Two disjoint random draws
        (seeded): ``subspace_samples`` images build S, ``samples`` other images are measured.
    samples, subspace_samples : int
        Number of measured images and of images whose principal directions span S (study: 100).
    directions : int
        T, random directions per point for the mean curvature / Algorithm 2 (study: 20).
    k : int
        Principal curvatures at each end of the spectrum (Lanczos).
    h : float
        Finite-difference step (L2, pixel units) of the Hessian-vector products.
    method : {"fd", "exact"}
        Finite differences (ReLU networks) or double backprop (smooth networks).
    smooth_beta : float, optional
        Measure the softplus surrogate of the network instead (every ReLU → ``Softplus(beta)``,
        :func:`~somprobe.geometry.softplus_surrogate`) with exact Hessians: on a ReLU network the
        finite-difference product is not linear in the direction, so Lanczos eigenvalues depend on
        the start vector; the surrogate's do not. Everything (DeepFool, curvature, noise) then uses
        the surrogate.
    subspace_dim : int, optional
        Dimension of S; default ``d // 16`` (so a random direction projects ≈ 0.25, as in the
        study's Table 1), at most ``subspace_samples * k``.
    magnitudes : sequence of float
        Noise L2 norms as fractions of the mean image norm (Fig. 7's x axis).
    hsweep : sequence of float
        Steps of the h sweep (empty: skip it); ``hsweep_samples`` boundary points.
    overshoot, max_iter : DeepFool's.
    batch_size : int
        Samples processed together; ``chunk`` the most points through the model at once.
    device, seed, progress
        As everywhere.

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run(run)
    samples, subspace_samples = _int("samples", samples), _int("subspace_samples", subspace_samples)
    directions, k = _int("directions", directions), _int("k", k)
    batch_size, chunk = _int("batch_size", batch_size), _int("chunk", chunk)
    hsweep_samples = _int("hsweep_samples", hsweep_samples, low=0)
    h = check_h(h)
    hsweep = [check_h(v) for v in hsweep]
    if method not in METHODS:
        raise GeometryError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    mags = [float(m) for m in magnitudes]
    if not mags or any((not np.isfinite(m)) or m < 0 for m in mags):
        raise GeometryError("magnitudes must be a non-empty list of finite numbers >= 0")
    n_total = len(dataset)
    if samples + subspace_samples > n_total:
        raise GeometryError(f"samples + subspace_samples = {samples + subspace_samples} exceeds the "
                            f"{n_total} images of the dataset; ask for fewer")
    dev = resolve_device(device)
    model = model.to(dev)
    if smooth_beta is not None:
        from .smooth import softplus_surrogate

        model = softplus_surrogate(model, smooth_beta)
        method = "exact"
    size = getattr(model, "image_size", None) or getattr(dataset, "image_size", None)
    shape = tuple(dataset.images(np.arange(1), size).shape[1:])
    d = int(np.prod(shape))
    if 2 * k > d - 1:
        raise GeometryError(f"k={k} is too large for inputs of {d} dimensions: use k <= {(d - 1) // 2}")
    dim = min(max(1, d // 16), subspace_samples * k) if subspace_dim is None else \
        _int("subspace_dim", subspace_dim)
    if dim > min(d, subspace_samples * k):
        raise GeometryError(f"subspace_dim={dim} exceeds the {subspace_samples * k} principal "
                            f"directions (subspace_samples × k) or the {d} input dimensions")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_total)
    sub_idx, eval_idx = np.sort(perm[:subspace_samples]), np.sort(perm[subspace_samples:subspace_samples + samples])
    labels = np.asarray(dataset.labels, dtype=np.int64)
    ids = list(dataset.ids)
    out_dir = run.geometry_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    bar = _bar(progress, 2 * (len(range(0, samples, batch_size)) + len(range(0, subspace_samples, batch_size))))
    timings = {}

    def load(idx):
        return dataset.images(idx, size).to(dev)

    with _attack_mode(model):
        # ---- shared subspace from the principal directions at the boundary of other samples
        t = time.perf_counter()
        dirs_all, sub_used = [], []
        for s in range(0, subspace_samples, batch_size):
            idx = sub_idx[s:s + batch_size]
            bp = boundary_points(model, load(idx), overshoot=overshoot, max_iter=max_iter)
            bar.update()
            ok = bp.converged
            if bool(ok.any()):
                F = Margin(model, bp.other_class[ok], bp.clean_class[ok])
                pc = principal_curvatures(F, bp.z[ok], k=k, method=method, h=h, chunk=chunk,
                                          vectors=True, seed=seed + s)
                vals = torch.cat([pc.top, pc.bottom], 1)
                vecs = torch.cat([pc.top_vectors, pc.bottom_vectors], 1)
                # the k most curved directions (largest |curvature|) of each sample
                pick = vals.abs().topk(k, dim=1).indices
                dirs_all.append(vecs.gather(1, pick.view(*pick.shape, *([1] * len(shape))).expand(-1, -1, *shape)).cpu())
                sub_used += [ids[i] for i in idx[ok.cpu().numpy()]]
            bar.update()
        if not dirs_all:
            raise GeometryError("DeepFool converged for none of the subspace samples; raise max_iter")
        directions_m = torch.cat(dirs_all).double()
        dim_used = min(dim, directions_m.shape[0] * k)
        basis, singular = shared_subspace(directions_m, dim_used)
        timings["subspace_seconds"] = time.perf_counter() - t

        # ---- measured samples: curvature, Algorithm 2, projections
        t = time.perf_counter()
        curv_rows, eig_rows, proj_rows = [], [], []
        xs_all, gen = [], torch.Generator().manual_seed(seed + 1)
        hs_points = None
        for s in range(0, samples, batch_size):
            idx = eval_idx[s:s + batch_size]
            x = load(idx)
            xs_all.append(x.cpu())
            bp = boundary_points(model, x, overshoot=overshoot, max_iter=max_iter)
            ok = bp.converged
            okn = ok.cpu().numpy()
            nat = class_curvatures(model, x, directions=directions, method=method, h=h, chunk=chunk,
                                   generator=gen)
            adv = class_curvatures(model, bp.adversarial, directions=directions, method=method, h=h,
                                   chunk=chunk, generator=gen) if bool(ok.any()) else None
            b = len(idx)
            top = np.full((b, k), np.nan)
            bottom = np.full((b, k), np.nan)
            rho_b = np.full(b, np.nan)
            gn = np.full(b, np.nan)
            if bool(ok.any()):
                F = Margin(model, bp.other_class[ok], bp.clean_class[ok])
                pc = principal_curvatures(F, bp.z[ok], k=k, method=method, h=h, chunk=chunk, seed=seed + s)
                top[okn], bottom[okn] = pc.top.cpu().double().numpy(), pc.bottom.cpu().double().numpy()
                gn[okn] = pc.grad_norm.cpu().double().numpy()
                v = random_directions(int(ok.sum()), directions, shape, generator=gen, device=dev, dtype=x.dtype)
                rho_b[okn] = directional_curvature(F, bp.z[ok], v, method=method, h=h, chunk=chunk).mean(1).cpu().double().numpy()
                if hs_points is None and hsweep:
                    hs_points = (bp.z[ok][:hsweep_samples], bp.other_class[ok][:hsweep_samples],
                                 bp.clean_class[ok][:hsweep_samples], idx[okn][:hsweep_samples])
            bar.update()
            r_norm = bp.r.flatten(1).norm(dim=1).cpu().double().numpy()
            adv_norm = (bp.adversarial - x).flatten(1).norm(dim=1).cpu().double().numpy()
            clean = bp.clean_class.cpu().numpy()
            with torch.no_grad():
                adv_pred = model(bp.adversarial).argmax(1).cpu().numpy()
            for j, i in enumerate(idx):
                base = {"id": ids[i], "label": int(labels[i]), "clean_pred": int(clean[j]),
                        "converged": bool(okn[j]), "iterations": int(bp.iterations[j]),
                        "r_norm": float(r_norm[j]) if okn[j] else np.nan}
                curv_rows.append({**base, "point": "natural", "pred": int(clean[j]),
                                  "rho": float(nat.rho[j]), "recovered": int(nat.recovered[j]),
                                  "distance": 0.0})
                curv_rows.append({**base, "point": "boundary", "pred": int(bp.other_class[j]),
                                  "rho": float(rho_b[j]), "grad_norm": float(gn[j]),
                                  "lam_max": float(top[j, 0]), "lam_min": float(bottom[j, 0]),
                                  "top_mean": float(np.mean(top[j])), "bottom_mean": float(np.mean(bottom[j])),
                                  "distance": float(r_norm[j])})
                if okn[j]:
                    curv_rows.append({**base, "point": "adversarial", "pred": int(adv_pred[j]),
                                      "rho": float(adv.rho[j]), "recovered": int(adv.recovered[j]),
                                      "distance": float(adv_norm[j])})
                    for side, vals in (("top", top[j]), ("bottom", bottom[j])):
                        eig_rows += [{"id": ids[i], "side": side, "rank": r + 1, "value": float(vals[r])}
                                     for r in range(k)]
            # projections on S of this batch's vectors
            xf = x.flatten(1).double().cpu()
            rand = torch.randn(xf.shape, generator=gen, dtype=torch.float64)
            proj_rows += _proj_rows("random", [ids[i] for i in idx], projection_ratio(rand, basis))
            if bool(ok.any()):
                proj_rows += _proj_rows("adversarial", [ids[i] for i in idx[okn]],
                                        projection_ratio(bp.r[ok].flatten(1).double().cpu(), basis))
            grad = _loss_gradient(model, x, bp.clean_class)
            proj_rows += _proj_rows("gradient", [ids[i] for i in idx], projection_ratio(grad.flatten(1).double().cpu(), basis))
            bar.update()
        timings["curvature_seconds"] = time.perf_counter() - t

        xs = torch.cat(xs_all)
        # x2 - x1: consecutive measured images (a fixed pairing of distinct samples)
        diffs = (xs[1:] - xs[:-1]).flatten(1).double()
        keep = diffs.norm(dim=1) > 0
        proj_rows += _proj_rows("x2 - x1", [f"{ids[a]}|{ids[b]}" for a, b, kk in
                                            zip(eval_idx[:-1], eval_idx[1:], keep.tolist()) if kk],
                                projection_ratio(diffs[keep], basis))

        # ---- Fig. 7: noise in S vs S⊥
        t = time.perf_counter()
        scale = float(xs.flatten(1).norm(dim=1).mean())
        noise_rows = []
        for name, comp in (("S", False), ("S_perp", True)):
            flips = torch.cat([subspace_noise_flips(model, xs[s:s + batch_size].to(dev), basis.to(dev, xs.dtype),
                                                    mags, complement=comp, scale=scale,
                                                    seed=seed + 7 + s, chunk=chunk).cpu()
                               for s in range(0, samples, batch_size)])
            noise_rows += [{"subspace": name, "magnitude": m, "misclassification": float(flips[:, q].float().mean()),
                            "n": int(flips.shape[0]), "noise_norm": m * scale}
                           for q, m in enumerate(mags)]
        timings["noise_seconds"] = time.perf_counter() - t

        # ---- h sweep at a few boundary points
        t = time.perf_counter()
        hs_rows = []
        if hs_points is not None:
            z, oc, cc, hidx = hs_points
            F = Margin(model, oc, cc)
            v = random_directions(z.shape[0], directions, shape, seed=seed + 11, device=dev, dtype=z.dtype)
            runs = [("fd", hh) for hh in hsweep] + [("exact", np.nan)]
            for meth, hh in runs:
                c = directional_curvature(F, z, v, method=meth, h=h if meth == "exact" else hh,
                                          chunk=chunk).cpu().double()
                hs_rows += [{"id": ids[i], "method": meth, "h": hh, "curvature": float(c[j].mean()),
                             "abs_curvature": float(c[j].abs().mean())} for j, i in enumerate(hidx)]
        timings["hsweep_seconds"] = time.perf_counter() - t
    bar.close()

    import pandas as pd

    curv = pd.DataFrame(curv_rows)
    proj = pd.DataFrame(proj_rows)
    table1 = (proj.groupby("kind", sort=False)["ratio"].agg(["mean", "std", "count"]).reset_index()
              .rename(columns={"count": "n"}))
    table1["study_lenet"] = table1["kind"].map(STUDY_TABLE1)
    save_csv(out_dir / "curvature.csv", curv)
    save_csv(out_dir / "eigenvalues.csv", pd.DataFrame(eig_rows, columns=["id", "side", "rank", "value"]))
    save_csv(out_dir / "projections.csv", proj)
    save_csv(out_dir / "table1.csv", table1)
    save_csv(out_dir / "noise.csv", pd.DataFrame(noise_rows))
    save_csv(out_dir / "hsweep.csv", pd.DataFrame(hs_rows, columns=["id", "method", "h", "curvature", "abs_curvature"]))
    with atomic_output(out_dir / "subspace.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, basis=basis.float().numpy(), singular_values=singular.double().numpy(),
                     input_shape=np.asarray(shape), ids=np.asarray(sub_used))

    def stat(point, col="rho"):
        v = curv.loc[(curv["point"] == point) & curv["converged"], col].dropna()
        return {"mean": float(v.mean()) if len(v) else None, "median": float(v.median()) if len(v) else None,
                "fraction_negative": float((v < 0).mean()) if len(v) else None, "n": int(len(v))}

    nat_rows = curv[(curv["point"] == "natural") & curv["converged"]]
    adv_rows = curv[curv["point"] == "adversarial"]
    summary = {
        "samples": samples, "subspace_samples": subspace_samples, "subspace_samples_used": len(sub_used),
        "directions": directions, "k": k, "h": h, "method": method,
        "smooth_beta": None if smooth_beta is None else float(smooth_beta), "subspace_dim": int(dim_used),
        "input_dim": d, "input_shape": list(shape), "magnitudes": mags, "hsweep": list(hsweep),
        "overshoot": overshoot, "max_iter": max_iter, "seed": int(seed), "device": str(dev),
        "deepfool_converged_rate": float(curv.loc[curv["point"] == "natural", "converged"].mean()),
        "rho_natural": stat("natural"), "rho_adversarial": stat("adversarial"), "rho_boundary": stat("boundary"),
        "lam_max_boundary": stat("boundary", "lam_max"), "lam_min_boundary": stat("boundary", "lam_min"),
        "label_recovery_adversarial": float((adv_rows["recovered"] == adv_rows["clean_pred"]).mean()) if len(adv_rows) else None,
        "algorithm2_accuracy_t0": (float(((nat_rows["rho"] < 0).sum() + (adv_rows["rho"] >= 0).sum())
                                         / (len(nat_rows) + len(adv_rows))) if len(adv_rows) else None),
        "table1": {r["kind"]: float(r["mean"]) for _, r in table1.iterrows()},
        "image_norm_mean": scale,
        **timings,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _proj_rows(kind, ids, ratios):
    return [{"kind": kind, "id": i, "ratio": float(r)} for i, r in zip(ids, ratios.tolist())]


def _loss_gradient(model, x, y):
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    return g


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress, total):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="geometry", unit="batch")

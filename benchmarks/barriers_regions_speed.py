"""Barrier bypass and region paths: all pairs in one batch vs one at a time, same results.

The studies' code handles one pair at a time (study 002's Algorithm 1 is a recursive function over
segments; study 000 bypasses one barrier at a time). somprobe runs every pair — and every open
segment of every pair — through the same forward/backward passes. This script times the batched
call and two references on the same pairs in one process and checks that all give the same paths:

- ``pair``: ``find_barrier`` / ``find_region_path`` called once per pair (batch of one pair; the
  segments of that pair still share passes). The stricter reference (the faster of the two).
- ``segment``: one pair at a time *and* one segment at a time, as the studies' recursive code
  runs: every segment's loss curve / label check is its own forward pass and every barrier point
  or midpoint projection its own Adam / projection run (batch 1). It cannot be had by calling
  ``find_barrier`` on single segments: a call measures the barrier gap against its *own* ends
  (the library, as study 000 defines it, against the pair's ends A, C — a sub-segment call would
  settle or recurse differently whenever a B′ sits above max(L(A), L(C))), it re-evaluates the
  segment its parent already evaluated, and it reports per pair, not which half is still open
  (``find_region_path`` on a sub-segment likewise samples at a fraction of the *sub-segment's*
  length). So it is written here from the library's own building blocks — ``segment_values`` +
  ``cross_entropy`` for the loss curves and checks, ``minimise_loss`` for the barrier points and
  ends, ``project_to_class`` for the midpoints — with the library's rules (gap against the pair's
  ends, stop a pair on a stuck B′, checks at ``spacing · ‖a − b‖``, ``recurse="both"``). It walks
  the recursion level by level (all open segments of a level, one after another), not depth
  first: the final path of a pair is the same either way and the cost per segment is the same,
  but on a failing pair level order spends exactly the Adam/projection steps the library spends,
  so every column can be compared.

Settings (``--settings``, comma separated; rows per setting and method):

- ``natural``: disjoint same-class pairs of correctly classified test images (``same_class_pairs``).
- ``pgd``: natural–adversarial pairs as studies 000/002 use them (``adversarial_pairs``): a clean
  test image of class c and a Linf-PGD image (``somprobe.attacks.pgd``, eps 4/255, 20 steps as
  ``barriers_regions.py``, seeded generator) of a correctly classified image of another class
  that the model predicts as c. The attack runs on the seeded pool in chunks until there are
  enough successes (set-up, not timed).
- ``noise-optimal``: study 000's test on an *untrained* network: the run's architecture built
  with ``build_model(seed)`` and BatchNorm statistics from noise (``calibrate_untrained_batchnorm``,
  as ``somprobe connect --pair-source noise-optimal`` does), ends are Gaussian noise N(0.5, 0.1²)
  (classes in turn) and the timed barrier bypass *includes* optimising the ends to low loss
  (``ends="optimise"``, step 1 of study 000's procedure; at the ``light`` preset the ends get
  ``end_iters=512`` since 8 Adam steps cannot take noise to low loss). Region paths have no
  untrained-network test in study 002; their row in this setting is study 002's noise scenario
  "(b) adversarially perturbed from random noise" on the trained network (``noise_adversarial``:
  a correctly classified image of class c and uniform noise projected into c with a logit margin
  1, as ``barriers_regions.py``'s ``noiseadv`` stage; made before timing).

Presets (``--preset``): ``light`` — the options of the first record (Adam 8 steps, depth 1, 17
points per segment, ends kept; region spacing 0.05, depth 6); ``defaults`` — what a user of
``find_barrier`` / ``find_region_path`` gets (iters 512, lr 0.01, max_depth 5, 33 points per
segment, δ 1e-3, ends optimised; spacing 1e-4, margin 0.1, depth 10, leading projection).
``--iters``, ``--max-depth``, ``--spacing``, ``--projection`` override a preset (for short
sanity runs).

Output: one JSON object (``--json`` also writes it, after every row too) and a markdown table,
one row per (setting, method): seconds batched, one pair at a time, one segment at a time, both
speed-ups, same results, mean rounds (barrier) / anchors (regions), success.

Same results. For every pair the discrete columns must be equal (anchor count, rounds, segments,
success, Adam iterations; region paths: depth, projections, projection steps, points checked) and a
barrier pair's final max loss within ``--loss-tolerance`` (1e-4). Anchors: region anchors within
``--tolerance`` (1e-4, Linf). Barrier anchors come out of Adam, and they are not bit-for-bit
reproducible across batch sizes: the network's logits for the same input differ by ~5e-7 between a
batch of 1 and of 24 (oneDNN/BLAS pick other kernels; verified, while one batch size is exactly
repeatable), and Adam's normalised step m̂/√v̂ turns rounding of near-zero gradient entries (96 %
of the untrained resnet18's input-gradient entries are < 1e-9) into moves of up to lr (2 lr between
two runs after a single step: an element whose tiny gradient changes sign under rounding moves +lr
in one and −lr in the other). At the ``light`` preset it mostly stays within lr; at ``defaults`` it
does not: on 20 natural pairs (~2 Adam steps per pair) anchors differed by up to 0.020 (2 lr), and
with 512-step budgets and several rounds it grows: on 12 noise-optimal pairs the anchors of the
batched and the one-segment-at-a-time runs differed by up to 0.035 (3.5 lr, Linf; 1.0 % of ‖a − b‖
in L2) while every discrete column, every Adam iteration count and every max loss (to 2e-7) agreed;
the loss at those anchors differed by up to 0.0024 (> δ/2): a barrier point stops at the first Adam
step that takes its loss below max(L(A), L(C)) + δ/2, and one step can take it anywhere below, so
two equally valid runs differ there. So barrier anchors count as the same when they are within
``--anchor-steps`` × lr (Linf) *or* when the runs took the same decisions: every column above equal
(the per-pair Adam iteration count fingerprints every stopping step of every point), the max loss
within 1e-4, and every interior anchor's loss on the same side of its stopping threshold in both
runs (the only thing about a B′'s loss the method uses). The JSON reports which criterion held
(``anchors_within``), the Linf and relative L2 drift, and up to 5 differing pairs with both runs'
values. A pair whose *decisions* differ is a disagreement (exit status 1), never tolerated: on
those 12 pairs, one pair reached the depth limit (5 rounds) with a final gap of 4.5e-4 batched and
1.8e-3 one pair at a time (δ = 1e-3): success flipped on the rounding drift, not on the batching.

What the sanity runs showed (1 thread, a shared machine, fmnist resnet18; ratios in one run):

| setting, preset defaults | method | pairs | batched | vs one pair | vs one segment | notes |
|---|---|---|---|---|---|---|
| natural | barrier | 20 | 3.0 s | 1.5x | 1.5x | 0.6 rounds, 2.2 Adam steps per pair |
| natural | regions (spacing 1e-4) | 2 | 35 s | 1.0x | 1.2x | 10,000 checked points per pair |
| pgd | barrier | 20 | 4.4 s | 1.5x | 1.6x | 1.0 rounds, ends optimised to 0.1, 4 steps |
| pgd | regions | 2 | 33 s | 1.0x | 1.0x | |
| noise-optimal | barrier | 12 | 38-41 s | 1.8x | 2.0-2.1x | 3.8 rounds, 10.5 segments, 245 steps |
| noise-optimal | regions (noise-adv.) | 3 | 79 s | 1.0x | 1.1x | 7 anchors, 27 s per pair |

Why not 5x at the defaults: (1) the loss-curve and label checks are ~linear in pairs whichever
way they run, and one pair already fills a batch (33 points per segment; 10,000+ points per pair
at spacing 1e-4); (2) on trained networks the barrier points need ~1 Adam step (a natural or PGD
pair's ends are first optimised to loss 0.1, and each B′ stops at max(L(A), L(C)) + δ/2); (3)
on the untrained network, where Adam matters, rows stop on their own and the last few slow rows
run alone: of 660 gradient passes of the batched 12-pair run, 439 had batch 1 or 2 (profiled).

Expected times (1-thread sanity numbers extrapolated; 2 threads on a quiet machine roughly 0.6x):
natural at 50 barrier pairs + 5 region pairs ~5 min on 1 thread; pgd the same plus ~1 min of
PGD set-up (38 successes from 500 correctly classified fmnist test images at 4/255);
noise-optimal barrier at 50 pairs ~12 min on 1 thread with both references (~7 min with
``--reference pair``); noise-adversarial region paths ~27 s per pair per reference. Region
paths at the study's spacing 1e-4 cost minutes per pair and cannot gain from batching, hence
``--region-pairs``.

The timed runs for the record (issue 10: >= 5x for 50 pairs; quiet machine, 2 threads):

    # 1. the first record's setting (light options, mnist5k natural pairs), plus the segment ratio
    OMP_NUM_THREADS=2 python benchmarks/barriers_regions_speed.py --run /work/runs-shared/mnist5k-s0 \\
        --settings natural --preset light --pairs 50 --threads 2 --json brs_light.json
    # 2.-3. trained fmnist resnet18 at the functions' defaults (~3 min, ~4 min)
    OMP_NUM_THREADS=2 python benchmarks/barriers_regions_speed.py --settings natural --preset defaults \\
        --pairs 50 --region-pairs 5 --threads 2 --json brs_natural.json
    OMP_NUM_THREADS=2 python benchmarks/barriers_regions_speed.py --settings pgd --preset defaults \\
        --pairs 50 --region-pairs 5 --threads 2 --json brs_pgd.json
    # 4. study 000's untrained network, 50 pairs, stricter reference only (~4-5 min)
    OMP_NUM_THREADS=2 python benchmarks/barriers_regions_speed.py --settings noise-optimal \\
        --methods barrier --preset defaults --pairs 50 --reference pair --threads 2 --json brs_noise50.json
    # 5. both references and the noise-adversarial region row on fewer pairs (~4-6 min)
    OMP_NUM_THREADS=2 python benchmarks/barriers_regions_speed.py --settings noise-optimal \\
        --preset defaults --pairs 16 --region-pairs 2 --threads 2 --json brs_noise16.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _real_run import set_threads

SETTINGS = ("natural", "pgd", "noise-optimal")
REFERENCES = ("pair", "segment")
PGD = {"eps": 4 / 255, "steps": 20}          # barriers_regions.py's attack (studies 000/002 setting)
NOISE_STD = 0.1                            # NOISE_DEFAULTS["std"] of `somprobe connect`
NOISE_ADV = {"margin": 1.0, "overshoot": 0.02, "max_steps": 100}   # NOISE_DEFAULTS of noise-adversarial
PRESETS = {
    "light": ({"iters": 8, "lr": 0.01, "max_depth": 1, "points_per_segment": 17, "ends": "keep"},
              {"spacing": 0.05, "margin": 0.1, "max_depth": 6, "projection": "leading"}),
    "defaults": ({}, {}),                  # the functions' own defaults
}


# ----------------------------------------------------------------------------- pairs
def _pool(ds, n, seed):
    return np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])


def _predict(net, x):
    with torch.no_grad():
        return torch.cat([net(x[i:i + 200]).argmax(1) for i in range(0, len(x), 200)]).numpy()


def natural_pairs(net, meta, n_pairs, seed, max_pool=600):
    from somprobe.data import load_dataset
    from somprobe.paths.pairs import same_class_pairs

    ds = load_dataset(meta["dataset"], split="test", image_size=meta["image_size"])
    pool = _pool(ds, max_pool, seed)
    x = ds.images(pool, meta["image_size"])
    df, _ = same_class_pairs(np.asarray(ds.labels)[pool], _predict(net, x), n_pairs=n_pairs, seed=seed)
    return (x[np.array(df["a"])], x[np.array(df["b"])], torch.as_tensor(np.array(df["class"])),
            {"source": "same-class (natural)"})


def pgd_pairs(net, meta, n_pairs, seed, max_pool=2000, chunk=250, say=print):
    """Clean image of class c + PGD image (of a correctly classified image of another class)
    predicted as c; attacked chunk by chunk of the seeded pool until ``n_pairs`` succeeded."""
    from somprobe.attacks import pgd
    from somprobe.data import load_dataset
    from somprobe.paths.pairs import adversarial_pairs

    ds = load_dataset(meta["dataset"], split="test", image_size=meta["image_size"])
    pool = _pool(ds, max_pool, seed)
    labels = np.asarray(ds.labels, dtype=np.int64)[pool]
    x = ds.images(pool, meta["image_size"])
    preds = _predict(net, x)
    correct = np.flatnonzero(preds == labels)
    gen = torch.Generator().manual_seed(seed)
    adv_pos, adv_img, adv_pred = [], [], []
    for s in range(0, len(correct), chunk):
        idx = correct[s:s + chunk]
        adv = pgd(net, x[idx], torch.as_tensor(labels[idx]), generator=gen, **PGD)
        p = _predict(net, adv)
        ok = p != labels[idx]
        adv_pos.append(idx[ok]), adv_img.append(adv[torch.as_tensor(ok)]), adv_pred.append(p[ok])
        if sum(map(len, adv_pos)) >= n_pairs + 5:  # a few spare: a success may lack a clean partner
            break
    adv_pos, adv_pred = np.concatenate(adv_pos), np.concatenate(adv_pred)
    adv_img = torch.cat(adv_img)
    say(f"PGD eps {PGD['eps']:.4g}, {PGD['steps']} steps: {len(adv_pos)} successes from "
        f"{min(s + chunk, len(correct))} correctly classified images")
    df, _ = adversarial_pairs(labels, preds, labels[adv_pos], adv_pred, n_pairs=n_pairs, seed=seed)
    return (x[np.array(df["a"])], adv_img[np.array(df["b"])], torch.as_tensor(np.array(df["class"])),
            {"source": f"natural-PGD (Linf {PGD['eps']:.4g}, {PGD['steps']} steps)",
             "attacked": int(min(s + chunk, len(correct))), "successes": len(adv_pos)})


def untrained_noise_pairs(meta, n_pairs, seed):
    """Untrained net (BatchNorm statistics from noise) and Gaussian-noise ends, classes in turn."""
    from somprobe.models import build_model
    from somprobe.paths.synthetic import calibrate_untrained_batchnorm

    size, n_cls = int(meta["image_size"]), int(meta.get("num_classes", 10))
    raw = build_model(meta["model"], num_classes=n_cls, image_size=size, seed=seed).eval()
    calibrated = calibrate_untrained_batchnorm(raw, (3, size, size), seed=seed + 1, std=NOISE_STD)
    for p in raw.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 + NOISE_STD * torch.randn((2 * n_pairs, 3, size, size), generator=gen)).clamp(0, 1)
    target = torch.as_tensor(np.arange(n_pairs) % n_cls)
    return raw, x[:n_pairs], x[n_pairs:], target, {
        "source": "untrained net, Gaussian-noise ends optimised in the timed run",
        "batchnorm_calibrated": bool(calibrated)}


def noise_adversarial_pairs(net, meta, n_pairs, seed, max_pool=600):
    """Study 002 (b): correctly classified image of class c + uniform noise projected into c."""
    from somprobe.data import load_dataset
    from somprobe.paths.synthetic import noise_adversarial

    size = int(meta["image_size"])
    ds = load_dataset(meta["dataset"], split="test", image_size=size)
    pool = _pool(ds, max_pool, seed)
    x = ds.images(pool, size)
    preds = _predict(net, x)
    correct = np.flatnonzero(preds == np.asarray(ds.labels)[pool])
    pick = np.sort(np.random.default_rng(seed + 1).permutation(correct)[:n_pairs])
    target = torch.as_tensor(preds[pick])
    res = noise_adversarial(net, target, (3, size, size), seed=seed, **NOISE_ADV)
    return x[pick], res.images.detach(), target, {
        "source": "natural-noise-adversarial (study 002 (b), trained net)",
        "converged": int(res.converged.sum())}


# ------------------------------------------------------------ one segment at a time (reference)
def _one(anchors: dict, stats: dict) -> SimpleNamespace:
    keys = sorted(anchors)
    pts = torch.stack([anchors[k] for k in keys])
    return SimpleNamespace(anchors=pts[None], n_anchors=torch.tensor([len(keys)]),
                           stats={k: np.asarray([v]) for k, v in stats.items()})


def barrier_by_segment(space, a, b, target, *, delta=1e-3, iters=512, lr=0.01, lambda_l2=1.0,
                       lambda_hf=0.05, hf="tv", tol=None, points_per_segment=33, max_depth=5,
                       ends="optimise", end_tol=0.1, end_iters=None, chunk=None):
    """find_barrier's rules for one pair, every segment and every barrier point on its own."""
    from somprobe.paths.anchors import cross_entropy, segment_values
    from somprobe.paths.core import CHUNK, _logits
    from somprobe.paths.optimise import minimise_loss

    chunk = chunk or CHUNK
    shape = tuple(a.shape[1:])
    tgt = target.long()[:1]
    opt = {"lr": lr, "lambda_l2": lambda_l2, "lambda_hf": lambda_hf, "hf": hf, "clip": getattr(space, "clip", None)}

    def logits(x):
        return _logits(space, x)

    pts = {0.0: a[0].detach().flatten().clone(), 1.0: b[0].detach().flatten().clone()}
    st = {"rounds": 0, "iterations": 0, "success": False, "failed": False, "max_loss": np.nan}
    loss = {}
    with torch.no_grad():
        for k in (0.0, 1.0):
            loss[k] = float(cross_entropy(logits(pts[k].reshape(1, *shape)), tgt).double()[0])
    alive = all(math.isfinite(v) for v in loss.values())
    if ends == "optimise" and alive:
        for k in (0.0, 1.0):
            if loss[k] > end_tol:
                res = minimise_loss(logits, pts[k].reshape(1, *shape), tgt,
                                    iters=iters if end_iters is None else end_iters, tol=end_tol, **opt)
                pts[k] = res.x.flatten(1)[0]
                loss[k] = float(res.loss[0])
                st["iterations"] += int(res.iterations[0])
                alive &= bool(res.finite[0])
    pair_end = float(np.fmax(loss[0.0], loss[1.0]))
    if ends != "keep" and alive and pair_end > end_tol:
        alive = False
    st["failed"] = not alive
    T = int(points_per_segment)
    seg_tol = pair_end + delta / 2 if tol is None else tol
    max_loss, final_gap, first_gap, limited, rnd = -np.inf, -np.inf, np.nan, False, 0
    open_ = [(0.0, 1.0)] if alive else []
    while open_:
        need = []
        for l, r in open_:
            vals, _, _ = segment_values(logits, pts[l][None], pts[r][None], [T - 1], shape=shape, chunk=chunk)
            ce = cross_entropy(vals, tgt.expand(T)).double().numpy()
            if not np.isfinite(ce).all():
                alive = False
                st["failed"] = True
                break
            gap = ce.max() - pair_end
            if rnd == 0:
                first_gap = gap
            if gap >= delta and rnd < max_depth:
                need.append((l, r, ce))
            else:
                max_loss = max(max_loss, ce.max())
                final_gap = max(final_gap, gap)
                limited |= gap >= delta
        if not alive or not need:
            break
        found = []
        for l, r, ce in need:
            ts = torch.tensor((np.argmax(ce[1:-1]) + 1) / (T - 1), dtype=pts[l].dtype)
            b0 = pts[l] + ts * (pts[r] - pts[l])
            res = minimise_loss(logits, b0.reshape(1, *shape), tgt, iters=iters, tol=seg_tol, **opt)
            st["iterations"] += int(res.iterations[0])
            found.append((l, r, res))
        st["rounds"] += 1
        if not all(res.finite[0] for *_, res in found):
            alive = False
            st["failed"] = True
            break
        if any(res.loss[0] - pair_end >= delta for *_, res in found):
            alive = False                  # a stuck B′: the pair stops (no path), as the library
            break
        open_ = []
        for l, r, res in found:
            m = 0.5 * (l + r)
            pts[m] = res.x.flatten(1)[0]
            open_ += [(l, m), (m, r)]
        rnd += 1
    done = alive and np.isfinite(max_loss)
    st.update(max_loss=max_loss if done else np.nan, success=done and not limited,
              segments=len(pts) - 1, n_anchors=len(pts), end_loss=pair_end,
              final_gap=final_gap if done else np.nan, barrier_gap=first_gap)
    return _one(pts, st)


def regions_by_segment(space, a, b, target, *, spacing=1e-4, margin=0.1, overshoot=0.02, proj_steps=50,
                       max_depth=10, recurse="both", chunk=None, projection="leading"):
    """find_region_path's rules (Algorithm 1) for one pair, every midpoint, projection and
    check on its own."""
    from somprobe.paths.anchors import segment_values
    from somprobe.paths.core import CHUNK, _logits
    from somprobe.paths.regions import project_to_class

    chunk = chunk or CHUNK
    shape = tuple(a.shape[1:])
    tgt_t = target.long()[:1]
    tgt = int(tgt_t[0])

    def logits(x):
        return _logits(space, x)

    pts = {0.0: a[0].detach().flatten().clone(), 1.0: b[0].detach().flatten().clone()}
    st = {"depth": 0, "success": False, "projections": 0, "points_checked": 0, "iterations": 0}
    with torch.no_grad():
        ends = [logits(pts[k].reshape(1, *shape))[0] for k in (0.0, 1.0)]
    alive = all(bool(torch.isfinite(e).all()) and int(e.argmax()) == tgt for e in ends)
    base = float((pts[1.0] - pts[0.0]).double().norm())
    pending = [(0.0, 1.0)] if alive and base > 0 else []
    step = spacing * base
    level = 1
    while pending:
        mids = [0.5 * (pts[l] + pts[r]) for l, r in pending]
        with torch.no_grad():
            lms = [logits(m.reshape(1, *shape))[0] for m in mids]
        if not all(bool(torch.isfinite(v).all()) for v in lms):
            alive = False
            break
        for j, v in enumerate(lms):
            if int(v.argmax()) != tgt:
                res = project_to_class(space, mids[j].reshape(1, *shape), tgt_t, margin=margin,
                                       overshoot=overshoot, max_steps=proj_steps, method=projection)
                st["iterations"] += int(res.iterations[0])
                st["projections"] += 1
                img = res.images.flatten(1)[0]
                alive &= bool(res.converged[0]) and bool(torch.isfinite(img).all())
                mids[j] = img.to(mids[j])
        if not alive:
            break
        st["depth"] = level
        nxt = []
        for (l, r), m in zip(pending, mids):
            k = 0.5 * (l + r)
            pts[k] = m
            halves = ((l, k), (k, r))
            wrong = []
            for hl, hr in halves:
                n = max(1, int(np.ceil(float((pts[hr] - pts[hl]).double().norm()) / step)))
                vals, seg, _ = segment_values(logits, pts[hl][None], pts[hr][None], [n], shape=shape,
                                              chunk=chunk, include_ends=False)
                st["points_checked"] += max(n - 1, 0)
                wrong.append(bool(len(seg)) and bool(((vals.argmax(1) != tgt)
                                                      | ~torch.isfinite(vals).all(1)).any()))
            if any(wrong):
                for (hl, hr), w in zip(halves, wrong):
                    if w:
                        nxt.append((hl, hr))
                    elif recurse == "both":   # FINDPATH on a valid half returns it with its midpoint
                        pts[0.5 * (hl + hr)] = 0.5 * (pts[hl] + pts[hr])
        if level >= max_depth and nxt:
            alive = False
            break
        pending = nxt
        level += 1
    st.update(success=alive, anchors=len(pts))
    return _one(pts, st)


# ----------------------------------------------------------------------------- comparison
def compare(batch, singles, keys, dist, extras=(), loss_at=None, half_delta=5e-4):
    """Agreement of the batched result with the one-at-a-time results (see the module docstring).

    ``dist``: each pair's straight distance ‖a − b‖₂ (the scale of the relative anchor drift).
    ``extras``: columns shown next to a pair whose discrete columns differ (not compared).
    ``loss_at(i, points)``: pair i's cross-entropy at points (barrier: the loss at every interior
    anchor must lie on the same side of the pair's stopping threshold, end loss + ``half_delta``,
    in both runs)."""
    agree, bad = {}, np.zeros(len(singles), dtype=bool)
    for k in keys:
        if k == "max_loss":
            continue
        one = np.concatenate([s.stats[k] for s in singles])
        eq = np.asarray(batch.stats[k]) == one
        bad |= ~eq
        agree[k] = float(np.mean(eq))
    diff, rel, curve, sides = 0.0, 0.0, 0.0, True
    for i, s in enumerate(singles):
        n = int(s.n_anchors[0])
        if int(batch.n_anchors[i]) == n:
            pa, ps = batch.anchors[i, :n], s.anchors[0, :n].reshape(batch.anchors[i, :n].shape)
            d = (pa.flatten(1) - ps.flatten(1)).double()
            diff = max(diff, float(d.abs().max()))
            rel = max(rel, float(d.norm(dim=1).max()) / max(float(dist[i]), 1e-12))
            if loss_at is not None:
                la, ls = loss_at(i, pa), loss_at(i, ps)
                curve = max(curve, float(np.nanmax(np.abs(la - ls), initial=0.0)))
                ta = float(batch.stats["end_loss"][i]) + half_delta
                ts = float(s.stats["end_loss"][0]) + half_delta
                sides &= bool(np.array_equal(la[1:-1] <= ta, ls[1:-1] <= ts))
        else:
            diff = rel = curve = float("inf")
            sides = False
    agree["max_anchor_difference"] = diff
    agree["max_anchor_l2_relative_difference"] = rel
    if loss_at is not None:
        agree["max_anchor_loss_difference"] = curve
        agree["anchor_losses_same_side_of_stop"] = sides
    if "max_loss" in keys:
        one = np.concatenate([s.stats["max_loss"] for s in singles]).astype(float)
        both = np.asarray(batch.stats["max_loss"], dtype=float)
        agree["same_nan_max_loss"] = float(np.mean(np.isnan(both) == np.isnan(one)))
        bad |= np.isnan(both) != np.isnan(one)
        fin = np.isfinite(both) & np.isfinite(one)
        agree["max_loss_difference"] = float(np.abs(both[fin] - one[fin]).max()) if fin.any() else 0.0
    agree["n_pairs_differing"] = int(bad.sum())
    agree["pairs_differing"] = [
        {"pair": int(i), **{k: [_num(batch.stats[k][i]), _num(singles[i].stats[k][0])]
                            for k in (*keys, *extras) if k in batch.stats and k in singles[i].stats}}
        for i in np.flatnonzero(bad)[:5]]
    return agree


def _num(v):
    v = v.item() if hasattr(v, "item") else v
    return round(v, 6) if isinstance(v, float) else v


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def _one_by_one(call, sp, a, b, t, kw):
    return [call(sp, a[i:i + 1], b[i:i + 1], t[i:i + 1], **kw) for i in range(len(t))]


def _warm(net, x):
    """One forward/backward before timing (one-off allocations and kernel choices)."""
    xx = x[:2].clone().requires_grad_(True)
    net(xx).sum().backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/work/runs-shared/fmnist-resnet18",
                    help="Run with a trained model/ (its architecture is also the untrained net's).")
    ap.add_argument("--settings", "--setting", default="natural",
                    help=f"Comma separated: {', '.join(SETTINGS)}.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="defaults")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--region-pairs", type=int, default=None,
                    help="Pairs for the region paths (the first of the setting's); default --pairs.")
    ap.add_argument("--iters", type=int, default=None, help="Override: Adam budget per barrier point.")
    ap.add_argument("--max-depth", type=int, default=None, help="Override: barrier rounds allowed.")
    ap.add_argument("--spacing", type=float, default=None, help="Override: region-path check spacing.")
    ap.add_argument("--projection", default=None, help="Override: leading or deepfool.")
    ap.add_argument("--methods", default="barrier,regions", help="barrier and/or regions.")
    ap.add_argument("--reference", default="pair,segment", help="pair and/or segment (comma separated).")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="Region paths: largest anchor difference still counted as the same.")
    ap.add_argument("--anchor-steps", type=float, default=1.0,
                    help="Barrier: largest anchor difference in Adam steps (x lr) still the same.")
    ap.add_argument("--loss-tolerance", type=float, default=1e-4,
                    help="Barrier: largest difference of a pair's final max loss still the same.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    refs = [r.strip() for r in args.reference.split(",") if r.strip()]
    for name, got, ok in (("--settings", settings, SETTINGS), ("--methods", methods, ("barrier", "regions")),
                          ("--reference", refs, REFERENCES)):
        if not got or set(got) - set(ok):
            raise SystemExit(f"{name}: use {', '.join(ok)} (comma separated), got {','.join(got)!r}")

    from somprobe.classifier import load_trained
    from somprobe.paths.anchors import cross_entropy
    from somprobe.paths.barrier import find_barrier
    from somprobe.paths.core import _logits
    from somprobe.paths.regions import find_region_path
    from somprobe.paths.spaces import make_space

    net = load_trained(args.run, device="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    meta = net.meta
    bar0, reg0 = PRESETS[args.preset]
    bar_kw, reg_kw = dict(bar0), dict(reg0)
    for key, val, kw in (("iters", args.iters, bar_kw), ("max_depth", args.max_depth, bar_kw),
                         ("spacing", args.spacing, reg_kw), ("projection", args.projection, reg_kw)):
        if val is not None:
            kw[key] = val
    n_reg = args.region_pairs or args.pairs
    out = {"run": str(args.run), "model": meta.get("model"), "dataset": meta.get("dataset"),
           "threads": threads, "preset": args.preset, "barrier_options": bar_kw, "region_options": reg_kw,
           "note": "options not listed are the functions' defaults", "settings": {}}
    rows = []
    same_all = True
    for setting in settings:
        say(f"setting {setting}: drawing pairs")
        res_s = out["settings"][setting] = {}
        n_all = max(args.pairs if "barrier" in methods else 0, n_reg if "regions" in methods else 0)
        drawn = None                           # trained-net pairs, drawn once; methods take a prefix
        if setting == "natural":
            drawn = natural_pairs(net, meta, n_all, args.seed)
        elif setting == "pgd":
            drawn = pgd_pairs(net, meta, n_all, args.seed, say=say)
        for method in methods:
            kw = dict(bar_kw if method == "barrier" else reg_kw)
            n = args.pairs if method == "barrier" else n_reg
            model = net
            if drawn is not None:
                a, b, t, info = drawn[0][:n], drawn[1][:n], drawn[2][:n], drawn[3]
            elif method == "barrier":          # noise-optimal: untrained net, ends optimised in the run
                model, a, b, t, info = untrained_noise_pairs(meta, n, args.seed)
                kw["ends"] = "optimise"
                if args.preset == "light":
                    kw["end_iters"] = 512
            else:                              # noise-optimal, region paths: study 002 (b)
                a, b, t, info = noise_adversarial_pairs(net, meta, n, args.seed)
            sp = make_space(model, "input")
            _warm(model, a)
            fn, ref_fn = (find_barrier, barrier_by_segment) if method == "barrier" else \
                (find_region_path, regions_by_segment)
            keys = (("n_anchors", "rounds", "segments", "success", "iterations", "max_loss")
                    if method == "barrier" else ("n_anchors", "anchors", "depth", "success", "projections",
                                                 "iterations", "points_checked"))
            extras = ("end_loss", "barrier_gap", "final_gap", "reason") if method == "barrier" else ("reason",)
            dist = (a - b).flatten(1).double().norm(dim=1).numpy()
            loss_at = None
            if method == "barrier":
                def loss_at(i, pts, _sp=sp, _t=t):
                    with torch.no_grad():
                        return cross_entropy(_logits(_sp, pts), _t[i].repeat(len(pts))).double().numpy()
            say(f"{setting} / {method}: {len(t)} pairs, batched")
            batch, t_batch = _timed(fn, sp, a, b, t, **kw)
            batch.stats["n_anchors"] = batch.n_anchors.numpy()
            r = {"pairs": len(t), **info, "options": kw, "seconds_batched": round(t_batch, 2),
                 "agreement": {}}
            for ref in refs:
                say(f"{setting} / {method}: one {ref} at a time")
                call = fn if ref == "pair" else ref_fn
                singles, t_ref = _timed(_one_by_one, call, sp, a, b, t, kw)
                for s in singles:
                    s.stats["n_anchors"] = np.asarray(s.n_anchors)
                r[f"seconds_one_{ref}_at_a_time"] = round(t_ref, 2)
                r[f"speedup_vs_{ref}"] = round(t_ref / t_batch, 2)
                r["agreement"][ref] = compare(batch, singles, keys, dist, extras, loss_at,
                                              kw.get("delta", 1e-3) / 2)
            st = batch.stats
            r["success"] = float(np.mean(st["success"]))
            if method == "barrier":
                r["mean_rounds"] = float(np.mean(st["rounds"]))
                r["mean_segments"] = float(np.mean(st["segments"]))
                r["share_gap_above_delta"] = float(np.mean(np.asarray(st["barrier_gap"]) >= kw.get("delta", 1e-3)))
                r["ends_optimised"] = float(np.mean(st["ends_optimised"]))
                r["mean_iterations"] = float(np.mean(st["iterations"]))
                tol = args.anchor_steps * kw.get("lr", 0.01)
            else:
                r["mean_anchors"] = float(np.mean(st["anchors"]))
                r["mean_points_checked"] = float(np.mean(st["points_checked"]))
                r["mean_projections"] = float(np.mean(st["projections"]))
                tol = args.tolerance
            reasons = [str(x)[:50] for x in st["reason"] if x]
            r["reasons"] = {k: reasons.count(k) for k in sorted(set(reasons))}
            same = {}
            for ref, ag in r["agreement"].items():
                exact = (not ag["pairs_differing"]
                         and ag.get("max_loss_difference", 0.0) <= args.loss_tolerance)
                near = ag["max_anchor_difference"] <= tol
                # Barrier anchors that drifted further by Adam's amplification of rounding count
                # as the same when every decision (Adam steps included) and the max loss agree and
                # every interior anchor's loss is on the same side of its stopping threshold
                # (module docstring).
                drift = method == "barrier" and "tol" not in kw and ag["anchor_losses_same_side_of_stop"]
                same[ref] = bool(exact and (near or drift))
                ag["anchors_within"] = ("tolerance" if near else
                                        "same decisions (drift)" if drift else "NO")
            r["same_results"] = same
            same_all &= all(same.values())
            res_s[method] = r
            rows.append((setting, method, r))
            say(f"{setting} / {method}: batched {t_batch:.1f} s, "
                + ", ".join(f"one {ref} at a time {r[f'seconds_one_{ref}_at_a_time']:.1f} s "
                            f"(x{r[f'speedup_vs_{ref}']:.1f})" for ref in refs)
                + f", same: {same}")
            if args.json:
                args.json.write_text(json.dumps(out, indent=2) + "\n")   # partial results survive
    out["same_results"] = bool(same_all)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ref_cols = " | ".join(f"one {ref} at a time s | x vs {ref}" for ref in refs)
    print(f"\n| setting | method | pairs | batched s | {ref_cols} | same results | "
          "mean rounds / anchors | success |")
    print("|" + "---|" * (7 + 2 * len(refs)))
    for setting, method, r in rows:
        cols = " | ".join(f"{r[f'seconds_one_{ref}_at_a_time']:.1f} | **{r[f'speedup_vs_{ref}']:.1f}x**"
                          for ref in refs)
        sameword = ", ".join(
            f"{ref}: " + ("yes" if ok and r["agreement"][ref]["anchors_within"] == "tolerance" else
                          "yes (anchor drift)" if ok else
                          f"NO ({r['agreement'][ref]['n_pairs_differing']}/{r['pairs']} pairs differ)"
                          if r["agreement"][ref]["n_pairs_differing"] else "NO (anchors)")
            for ref, ok in r["same_results"].items())
        mean = (f"{r['mean_rounds']:.2f} rounds" if method == "barrier" else f"{r['mean_anchors']:.1f} anchors")
        print(f"| {setting} | {method} | {r['pairs']} ({r['source']}) | {r['seconds_batched']:.1f} | {cols} | "
              f"{sameword} | {mean} | {r['success']:.0%} |")
    if not same_all:
        bad = ", ".join(f"{s}/{m}" for s, m, r in rows if not all(r["same_results"].values()))
        raise SystemExit(f"batched and one-at-a-time results differ for: {bad} (see 'agreement')")


if __name__ == "__main__":
    main()

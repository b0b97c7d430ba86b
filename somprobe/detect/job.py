"""The detection benchmark behind ``somprobe detect``: every attack × detector × seed on one run.

Protocol (Harder et al. 2021's, as study 000 uses it): ``n`` clean images of the run's
evaluation split; only the ones the model classifies correctly are attacked; only successful
attacks are kept, each paired with its clean image; a paired 80/20 split per seed (a clean image
and its adversarial copy always on the same side); each detector is fitted on the training pairs
and scored on the test pairs.

Files written (atomically) under ``run.detect_dir``::

    detect/samples.json                       the clean pool: ids, labels, which were correct
    detect/features/<detector>/clean.npz      characteristics of the correct clean images
    detect/features/<detector>/<attack>.npz   characteristics of the successful adversarials
    detect/attacks.csv                        attack, n_correct, n_success, success_rate
    detect/scores.csv                         attack, detector, seed, n_train, n_test, auc,
                                              accuracy, tpr_at_5fpr, label_recovery
    detect/summary.csv                        mean ± sd over seeds per attack × detector
    detect/roc.csv                            attack, detector, seed, fpr, tpr (figures)

The adversarial images are an ordinary attack of the run (``attacks/detect-<attack>/``,
written by :func:`somprobe.attacks.job.attack_run`). Characteristics are cached with a
fingerprint of everything they depend on, so ``resume=True`` re-scores in seconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import time

import numpy as np
import pandas as pd
import torch

from ..errors import AnalysisError, DetectError
from ..run import Run, atomic_output, atomic_write_json, save_csv
from . import metrics as _m
from .base import eval_mode

__all__ = ["detect_run", "ATTACKS", "DETECTORS", "ATTACK_DEFAULTS", "linf_attack_options", "SCORES_COLUMNS",
           "SUMMARY_COLUMNS", "build_detector", "som_context", "attack_name"]

ATTACKS = ("fgsm", "bim", "pgd", "deepfool", "cw")
DETECTORS = ("curvature", "loss_curve", "som_distance", "input_mfs", "mahalanobis", "max_softmax")
DEFAULT_EPS = 8 / 255


def linf_attack_options(eps: float = DEFAULT_EPS) -> dict:
    """FGSM / BIM / PGD settings at the Linf budget ``eps`` (the benchmark's rules).

    FGSM one step of ``eps``; BIM 10 steps of ``eps/8`` (1.25·eps of travel, Kurakin et al.'s
    ratio); PGD 20 steps of ``eps/4`` from a random start. At 8/255 (Harder et al.'s CIFAR budget,
    the default) that is BIM 10 × 1/255 and PGD 20 × 2/255.
    """
    eps = float(eps)
    return {"fgsm": {"eps": eps},
            "bim": {"eps": eps, "steps": 10, "step_size": eps / 8},
            "pgd": {"eps": eps, "steps": 20, "step_size": eps / 4}}


#: Attack settings of the benchmark: :func:`linf_attack_options` at 8/255; DeepFool (overshoot
#: 0.02, at most 50 iterations) and Carlini-Wagner L2 (3 binary-search steps × 50 Adam
#: iterations) as attack_run runs them.
ATTACK_DEFAULTS = {
    **linf_attack_options(DEFAULT_EPS),
    "deepfool": {"steps": 50, "overshoot": 0.02},
    "cw": {"steps": 50, "binary_search_steps": 3},
}
SCORES_COLUMNS = ["attack", "detector", "seed", "n_train", "n_test", "auc", "accuracy",
                  "tpr_at_5fpr", "label_recovery"]
METRICS = ("auc", "accuracy", "tpr_at_5fpr", "label_recovery")
SUMMARY_COLUMNS = ["attack", "detector", "n_pairs", "n_seeds"] + \
    [f"{m}_{s}" for m in METRICS for s in ("mean", "sd")]
ATTACKS_COLUMNS = ["attack", "name", "n_clean", "n_correct", "n_success", "success_rate"]


def attack_name(attack: str) -> str:
    """Name of the run attack (and its folder) the benchmark uses for ``attack``."""
    return f"detect-{attack}"


# --------------------------------------------------------------------------- detectors
def som_context(run: Run, *, size=None, layers=None, device="cpu") -> dict:
    """SOMs, class centres and code definition of a run, for :class:`SOMDistanceDetector`.

    Centres come from the SOM-tr BMUs written by ``somprobe fit`` (study 003's Fig. 2).
    ``size`` picks one grid size (default: 20×20 when fitted, else the largest).

    Raises
    ------
    DetectError
        The run has no SOMs (says to run ``somprobe fit``) or no SOM-tr BMUs.
    """
    from ..analysis.centres import class_centres
    from ..analysis.job import find_soms
    from ..som.map import SOM
    from ..store import open_store

    try:
        entries = find_soms(run, sizes=size, layers=layers)
    except AnalysisError as e:
        raise DetectError(
            f"the som_distance detector needs the run's SOMs ({e}); run `somprobe extract` and "
            f"`somprobe fit --out {run.root}` first, or leave som_distance out of --detectors") from e
    sizes = sorted({(e.m, e.n) for e in entries}, key=lambda s: s[0] * s[1])
    pick = (20, 20) if (20, 20) in sizes else sizes[-1]
    entries = [e for e in entries if (e.m, e.n) == pick]
    try:
        store = open_store(run.codes_dir("som-tr"))
    except Exception as e:  # noqa: BLE001 - any store problem: same fix
        raise DetectError(f"the som_distance detector needs the SOM-tr code store ({e}): run "
                          f"`somprobe extract` and `somprobe fit`") from e
    soms, centres = {}, {}
    for e in entries:
        path = run.bmus_path("som-tr", e.layer, e.m, e.n)
        if not path.is_file():
            raise DetectError(f"no SOM-tr BMUs for {e.key} ({path}): rerun `somprobe fit`")
        som = SOM.load(e.path, device=device)
        bmus = np.load(path)
        soms[e.layer] = som
        centres[e.layer] = class_centres(bmus, store.labels, som.grid)
    return {"soms": soms, "centres": centres, "stats": store.manifest.get("stats"),
            "com": store.manifest.get("com") or "flat", "size": f"{pick[0]}x{pick[1]}"}


def build_detector(name: str, *, model, references=None, som=None, device="auto",
                   batch_size: int = 64, options: dict | None = None):
    """A fresh, unfitted detector ``name`` with the benchmark's context.

    ``references`` (loss curve: one image per class) and ``som`` (:func:`som_context`) are only
    needed by the detectors that use them; ``options`` are extra keyword hyperparameters.
    """
    options = dict(options or {})
    if name == "input_mfs":
        from .spectral import InputMFSDetector
        return InputMFSDetector(**options)
    if name == "max_softmax":
        from .baselines import MaxSoftmaxDetector
        return MaxSoftmaxDetector(model, device=device, batch_size=batch_size, **options)
    if name == "mahalanobis":
        from .baselines import MahalanobisDetector
        return MahalanobisDetector(model, device=device, batch_size=batch_size, **options)
    if name == "loss_curve":
        from .losscurve import LossCurveDetector
        if references is None:
            raise DetectError("the loss_curve detector needs one reference image per class")
        return LossCurveDetector(model, references, device=device, batch_size=batch_size, **options)
    if name == "som_distance":
        from .somdist import SOMDistanceDetector
        if som is None:
            raise DetectError("the som_distance detector needs the run's SOMs: run `somprobe fit`")
        kw = {k: som[k] for k in ("stats", "com") if som.get(k) is not None}
        return SOMDistanceDetector(model, som["soms"], som["centres"], device=device,
                                   batch_size=batch_size, **kw, **options)
    if name == "curvature":
        from .curvature import CurvatureDetector
        return CurvatureDetector(model, device=device, batch_size=batch_size, **options)
    raise DetectError(f"unknown detector {name!r}; use some of {', '.join(DETECTORS)}")


# --------------------------------------------------------------------------- caching
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_features(path, features: np.ndarray, ids: list[str], key: str) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=features, ids=np.asarray(ids, dtype=str), key=np.asarray(key))


def _load_features(path, ids: list[str], key: str) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key or z["ids"].tolist() != list(ids):
                return None
            return z["features"]
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- the job
def _as_tuple(v, what: str, allowed) -> tuple:
    if isinstance(v, str):
        v = [t.strip() for t in v.split(",") if t.strip()]
    v = tuple(v)
    bad = [x for x in v if x not in allowed]
    if bad or not v:
        raise DetectError(f"unknown {what} {bad or v}; use some of {', '.join(allowed)}")
    return v


def _summary(scores: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (attack, det), g in scores.groupby(["attack", "detector"], sort=False):
        row = {"attack": attack, "detector": det,
               "n_pairs": int((g["n_train"] + g["n_test"]).max() // 2),
               "n_seeds": int(g["auc"].notna().sum())}
        for m in METRICS:
            v = g[m].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if v.size else np.nan
            row[f"{m}_sd"] = float(v.std(ddof=1)) if v.size > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def detect_run(run, *, attacks=ATTACKS, detectors=DETECTORS, seeds=(0, 1, 2), n: int = 300,
               split: str = "val", reference_split: str = "train", reference_per_class: int = 20,
               attack_options: dict | None = None, detector_options: dict | None = None,
               som_size=None, som_layers=None, test_size: float = 0.2, sample_seed: int = 0,
               batch_size: int = 64, device="auto", resume: bool = False,
               progress: bool = False, on_stage=None) -> dict:
    """Run the detection benchmark on a trained run and write its tables.

    Parameters
    ----------
    run : Run or path
        A run with a trained model (``somprobe train``); the SOM-distance detector also needs
        its SOMs (``somprobe extract`` + ``somprobe fit``).
    attacks : sequence of str or comma-separated str
        Among ``fgsm, bim, pgd, deepfool, cw`` (settings: :data:`ATTACK_DEFAULTS`, overridden by
        ``attack_options[attack]``).
    detectors : sequence of str or comma-separated str
        Among ``curvature, loss_curve, som_distance, input_mfs, mahalanobis, max_softmax``
        (keyword hyperparameters in ``detector_options[detector]``).
    seeds : sequence of int
        One paired 80/20 split per seed.
    n : int
        Clean images drawn (seeded by ``sample_seed``) from the run dataset's ``split``; only the
        correctly classified ones are attacked.
    reference_split, reference_per_class
        Where the loss curve's class references come from: the lowest-loss image of each class
        among ``reference_per_class`` images per class of ``reference_split``.
    test_size : float
        Share of pairs in the test side (0.2).
    batch_size, device, progress
    resume : bool
        Reuse the attacks and the cached characteristics whose settings match.
    on_stage : callable, optional
        Called with a short message before each stage (the CLI prints it).

    Returns
    -------
    dict
        ``scores``, ``summary``, ``attacks``, ``roc`` DataFrames, ``feature_seconds`` (time to
        compute each set of characteristics that was not cached) and ``seconds``.

    Raises
    ------
    DetectError
        Unknown attack/detector names, a run without a model, SOMs missing for som_distance.
    """
    from ..attacks import job as attack_job
    from ..classifier import load_trained
    from ..data import balanced_indices, load_dataset
    from ..device import resolve_device

    t0 = time.perf_counter()
    say = on_stage or (lambda msg: None)
    run = run if isinstance(run, Run) else Run(run)
    attacks = _as_tuple(attacks, "attacks", ATTACKS)
    detectors = _as_tuple(detectors, "detectors", DETECTORS)
    seeds = tuple(int(s) for s in (seeds if not isinstance(seeds, (int, str)) else
                                   str(seeds).split(",")))
    if not seeds:
        raise DetectError("give at least one seed")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise DetectError(f"n must be an integer >= 2 (clean images to draw), got {n!r}")
    unavailable = [a for a in attacks if a not in attack_job.ATTACKS]
    if unavailable:
        raise DetectError(f"attacks {unavailable} are not available in this version of "
                          f"somprobe.attacks (it has {', '.join(attack_job.ATTACKS)}); drop them "
                          f"from --attacks")
    if not run.checkpoint.is_file():
        raise DetectError(f"no trained model in {run.root}: run `somprobe train --out {run.root}` "
                          f"(or copy a trained run's model/ folder there)")
    attack_options = {a: {**ATTACK_DEFAULTS.get(a, {}), **dict((attack_options or {}).get(a, {}))}
                      for a in attacks}
    detector_options = {d: dict((detector_options or {}).get(d, {})) for d in detectors}
    dev = resolve_device(device)

    # SOMs first: a run without them fails before any attack runs.
    som = som_context(run, size=som_size, layers=som_layers) if "som_distance" in detectors else None

    model = load_trained(run, device=dev)
    meta = getattr(model, "meta", None) or json.loads(run.model_meta.read_text())
    size = int(meta.get("image_size") or model.image_size)
    dataset = load_dataset(meta["dataset"], split=split, image_size=size)
    num_classes = int(getattr(model, "num_classes", None) or dataset.num_classes)

    # ---- the clean pool: n images, as balanced over classes as the split allows
    say(f"clean pool: {n} images of {meta['dataset']}/{split}")
    per_class = math.ceil(n / num_classes)
    try:
        pool = balanced_indices(dataset.labels, per_class, seed=sample_seed)
    except Exception:  # noqa: BLE001 - a short class: fall back to a plain seeded draw
        pool = np.random.default_rng(sample_seed).permutation(len(dataset))
    pool = np.sort(np.random.default_rng(sample_seed).permutation(pool)[:n])
    ids = [str(dataset.ids[i]) for i in pool]
    labels = np.asarray(dataset.labels, dtype=np.int64)[pool]
    clean_x = dataset.images(pool, size)
    with torch.no_grad(), eval_mode(model):
        preds = torch.cat([model(clean_x[s:s + 256].to(dev)).argmax(1).cpu()
                           for s in range(0, len(pool), 256)]).numpy()
    correct = preds == labels
    atomic_write_json(run.detect_dir / "samples.json", {
        "dataset": meta["dataset"], "split": split, "n": int(n), "sample_seed": int(sample_seed),
        "ids": ids, "labels": labels, "correct": correct.tolist(),
        "n_correct": int(correct.sum())})
    if not correct.any():
        raise DetectError(f"the model classifies none of the {n} clean images correctly: check "
                          f"the model in {run.root}")
    c_idx = pool[correct]
    c_ids = [i for i, ok in zip(ids, correct) if ok]
    c_x = clean_x[torch.as_tensor(np.flatnonzero(correct))]
    c_labels = labels[correct]

    # ---- loss-curve references
    references = None
    if "loss_curve" in detectors:
        from .losscurve import class_references

        ref_ds = load_dataset(meta["dataset"], split=reference_split, image_size=size)
        ref_pos = balanced_indices(ref_ds.labels, int(reference_per_class), seed=sample_seed)
        references, _ = class_references(model, ref_ds.images(ref_pos, size),
                                         np.asarray(ref_ds.labels)[ref_pos],
                                         num_classes=num_classes, device=dev)

    base_key = {"checkpoint_sha256": getattr(model, "checkpoint_sha256", None),
                "dataset": meta["dataset"], "split": split, "size": size,
                "reference_split": reference_split, "reference_per_class": reference_per_class,
                "sample_seed": sample_seed,
                "som": None if som is None else som["size"]}

    def detector(name):
        return build_detector(name, model=model, references=references, som=som, device=dev,
                              batch_size=batch_size, options=detector_options[name])

    feature_dir = run.detect_dir / "features"
    feature_seconds: list[dict] = []

    def features(det_name, kind, x, row_ids):
        key = _fingerprint({**base_key, "detector": det_name, "options": detector_options[det_name],
                            "kind": kind})
        path = feature_dir / det_name / f"{kind}.npz"
        if resume:
            cached = _load_features(path, row_ids, key)
            if cached is not None:
                return cached
        t = time.perf_counter()
        f = detector(det_name).features(x) if len(row_ids) else np.zeros((0, 0))
        feature_seconds.append({"detector": det_name, "set": kind, "n": len(row_ids),
                                "seconds": time.perf_counter() - t})
        _save_features(path, f, row_ids, key)
        return f

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(detectors) * (len(attacks) + 1), desc="characteristics", unit="set")

    clean_f = {}
    for d in detectors:
        say(f"characteristics of {len(c_ids)} clean images: {d}")
        clean_f[d] = features(d, "clean", c_x, c_ids)
        if bar is not None:
            bar.update(1)

    score_rows, roc_rows, attack_rows = [], [], []
    for a in attacks:
        name = attack_name(a)
        adir = run.attack_dir(name)
        summary = None
        if resume and (adir / "summary.json").is_file():
            summary = json.loads((adir / "summary.json").read_text())
            if json.loads((adir / "ids.json").read_text()) != c_ids:
                summary = None
        if summary is None:
            say(f"attacking {len(c_ids)} correctly classified images: {a}")
            attack_job.attack_run(run, model=model, dataset=dataset, indices=c_idx, name=name,
                                  attack=a, labels="dataset", seed=sample_seed,
                                  batch_size=batch_size, device=dev, extract=False,
                                  overwrite=True, progress=progress, **attack_options[a])
        adv_all = np.load(adir / "images.npy", mmap_mode="r")
        adv_pred = np.load(adir / "preds.npy")
        success = adv_pred != c_labels
        s_rows = np.flatnonzero(success)
        s_ids = [c_ids[i] for i in s_rows]
        attack_rows.append({"attack": a, "name": name, "n_clean": int(n),
                            "n_correct": int(len(c_ids)), "n_success": int(s_rows.size),
                            "success_rate": float(success.mean()) if success.size else np.nan})
        adv_x = torch.as_tensor(np.asarray(adv_all[s_rows]))
        n_pairs = int(s_rows.size)
        splits = {s: _m.paired_split(n_pairs, test_size=test_size, seed=s) for s in seeds}
        for d in detectors:
            say(f"{a}: characteristics of {n_pairs} adversarial images: {d}")
            fa = features(d, a, adv_x, s_ids) if n_pairs else None
            if bar is not None:
                bar.update(1)
            fc = clean_f[d][s_rows] if n_pairs else None
            for seed in seeds:
                tr, te = splits[seed]
                row = {"attack": a, "detector": d, "seed": seed, "n_train": 2 * int(tr.size),
                       "n_test": 2 * int(te.size), "auc": np.nan, "accuracy": np.nan,
                       "tpr_at_5fpr": np.nan, "label_recovery": np.nan}
                if tr.size and te.size:
                    det = detector(d).fit_features(fc[tr], fa[tr])
                    f_test = np.concatenate([fc[te], fa[te]])
                    y = np.r_[np.zeros(te.size), np.ones(te.size)]
                    sc = det.score_features(f_test)
                    row.update(_m.detection_metrics(y, sc, sc > det.threshold_))
                    if det.recovers_labels:
                        rec = det.recover_labels_features(fa[te])
                        row["label_recovery"] = float((rec == c_labels[s_rows][te]).mean())
                    fpr, tpr, _ = _m.roc_curve(y, sc)
                    roc_rows.append(pd.DataFrame({"attack": a, "detector": d, "seed": seed,
                                                  "fpr": fpr, "tpr": tpr}))
                score_rows.append(row)
    if bar is not None:
        bar.close()

    scores = pd.DataFrame(score_rows, columns=SCORES_COLUMNS)
    summary = _summary(scores)
    attacks_table = pd.DataFrame(attack_rows, columns=ATTACKS_COLUMNS)
    roc = pd.concat(roc_rows, ignore_index=True) if roc_rows else \
        pd.DataFrame(columns=["attack", "detector", "seed", "fpr", "tpr"])
    save_csv(run.detect_dir / "attacks.csv", attacks_table)
    save_csv(run.detect_dir / "roc.csv", roc)
    save_csv(run.detect_dir / "summary.csv", summary)
    save_csv(run.detect_dir / "scores.csv", scores)
    return {"scores": scores, "summary": summary, "attacks": attacks_table, "roc": roc,
            "feature_seconds": pd.DataFrame(feature_seconds, columns=["detector", "set", "n", "seconds"]),
            "seconds": time.perf_counter() - t0}

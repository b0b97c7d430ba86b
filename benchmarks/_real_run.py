"""Shared set-up of the real-data benchmarks (paper_trends.py, adversarial_shift.py).

Both work on one trained classifier in a run directory (default ``runs/fmnist-resnet18``, resnet18
trained by ``somprobe train`` with its defaults on Fashion-MNIST). This module makes sure the run
has the model, SOM-tr/SOM-val codes with the requested draw and one fitted torus SOM per layer,
using the same library calls as ``somprobe demo`` (somprobe/pipeline.py). A small stamp file in
the run records the settings of the codes and maps, so a second benchmark on the same run reuses
them instead of re-extracting and re-fitting, and a different setting redoes them.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from somprobe.run import Run, atomic_write_json

STAMP = "benchmark-codes.json"
LAYERS = "CL1-CL4"


def set_threads(n: int | None) -> int:
    """Torch intra-op threads (the machine is shared: default 2, or $OMP_NUM_THREADS)."""
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", "2") or 2)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def model_meta(run: Run) -> dict | None:
    if not (run.checkpoint.is_file() and run.model_meta.is_file()):
        return None
    return json.loads(run.model_meta.read_text())


def ensure_model(run: Run, *, train: bool, data: str, model: str, seed: int, device: str,
                 say) -> dict:
    """The run's trained classifier metadata; train it with ``somprobe train``'s defaults if asked."""
    from somprobe.classifier import train_classifier

    meta = model_meta(run)
    if meta is not None and meta.get("complete", True):
        return meta
    if not train:
        state = "is incomplete (still training?)" if meta is not None else "has no trained model"
        raise SystemExit(
            f"{run.root} {state}. Pass --train to train {model} on {data} with `somprobe train`'s "
            f"defaults (same as: somprobe train --out {run.root} --model {model} --data {data} "
            f"--seed {seed}), or point --run at a finished run.")
    say(f"training {model} on {data} into {run.model_dir} (somprobe train defaults)")
    t = time.perf_counter()
    train_classifier(model, data, out=run, seed=seed, device=device, resume=meta is not None,
                     progress=True)
    say(f"trained in {time.perf_counter() - t:.0f} s")
    return model_meta(run)


def copy_model(src: Run, dst: Run) -> None:
    """Give ``dst`` the trained model of ``src`` (a run per SOM setting, one model)."""
    if dst.checkpoint.is_file() and dst.model_meta.is_file():
        if dst.checkpoint.stat().st_size == src.checkpoint.stat().st_size and \
                dst.model_meta.read_text() == src.model_meta.read_text():
            return
        raise SystemExit(f"{dst.root} holds a different model than {src.root}; choose another --out")
    dst.root.mkdir(parents=True, exist_ok=True)
    tmp = dst.root / (dst.model_dir.name + ".tmp-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src.model_dir, tmp)
    os.replace(tmp, dst.model_dir)


def _stamp(weights: str, *, per_class: int, size: int, som_epochs: int, seed: int) -> dict:
    return {"weights": weights, "per_class": per_class, "size": size, "som_epochs": som_epochs,
            "som_batch_size": 10, "seed": seed, "layers": LAYERS}


def random_init_model(meta: dict, *, seed: int, device: str):
    """The trained model's architecture with untrained (timm-initialised) weights: the control.

    Same normalisation, input size and class count as the trained model; timm draws the initial
    weights from torch's global generator, so it is forked and seeded here and restored after.
    """
    import torch

    from somprobe.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(meta["model"], num_classes=int(meta["num_classes"]),
                           image_size=int(meta["image_size"]), mean=meta["mean"], std=meta["std"],
                           device=device)


def _complete(run: Run, size: int) -> bool:
    for split in ("som-tr", "som-val"):
        mf = run.codes_dir(split) / "manifest.json"
        if not mf.is_file() or not json.loads(mf.read_text()).get("complete"):
            return False
        for layer in ("CL1", "CL2", "CL3", "CL4"):
            if not run.bmus_path(split, layer, size, size).is_file():
                return False
    return all(run.som_path(layer, size, size).is_file() for layer in ("CL1", "CL2", "CL3", "CL4"))


def ensure_codes_and_soms(run: Run, meta: dict, *, per_class: int, size: int, som_epochs: int,
                          seed: int, device: str, fresh: bool, say, random_init: bool = False) -> tuple:
    """Extract SOM-tr/SOM-val codes and fit one torus SOM per CL (study 003 defaults) unless the
    run already holds them for exactly these settings.

    ``random_init`` uses :func:`random_init_model` instead of the run's trained model (the run
    then needs no model/ folder). Returns ``(net, draws, timings)``.
    """
    from somprobe.classifier import load_trained
    from somprobe.data import som_splits
    from somprobe.extract import extract
    from somprobe.som.job import fit_run

    if random_init:
        net = random_init_model(meta, seed=seed, device=device)
        weights = f"random-init {meta['model']} seed {seed}"
    else:
        net = load_trained(run, device=device)
        st = run.checkpoint.stat()
        weights = f"checkpoint {st.st_size} bytes, mtime {int(st.st_mtime)}"
    draws = som_splits(meta["dataset"], per_class=per_class, seed=seed,
                       image_size=int(meta["image_size"]))
    want = _stamp(weights, per_class=per_class, size=size, som_epochs=som_epochs, seed=seed)
    want.update(dataset=meta["dataset"], image_size=int(meta["image_size"]))
    stamp_path = run.root / STAMP
    have = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
    timings = {}
    if not fresh and have == want and _complete(run, size):
        say(f"reusing codes and {size}x{size} SOMs in {run.root} ({per_class} per class)")
        return net, draws, timings
    stamp_path.unlink(missing_ok=True)
    say(f"extracting {LAYERS} codes of SOM-tr / SOM-val ({per_class} per class)")
    t = time.perf_counter()
    for split, (ds, idx) in draws.items():
        extract(net, ds, idx, layers=LAYERS, out=run, split=split, seed=seed, per_class=per_class,
                device=device, overwrite=True, meta={"weights": weights})
    timings["extract_s"] = time.perf_counter() - t
    say(f"fitting one {size}x{size} torus SOM per layer (5 epochs, batch 10, cosine: paper defaults)")
    t = time.perf_counter()
    fit_run(run, sizes=(size,), splits=["som-tr", "som-val"], epochs=som_epochs, batch_size=10,
            seed=seed, device=device)
    timings["fit_s"] = time.perf_counter() - t
    atomic_write_json(stamp_path, want)
    return net, draws, timings


def add_run_arguments(p) -> None:
    """The options both real-data benchmarks share (model, run directories, SOM, device, output)."""
    p.add_argument("--run", default="runs/fmnist-resnet18", help="Run with the trained model.")
    p.add_argument("--out", help="Run for codes/SOMs/attacks (default: --run for 50 per class and "
                                 "20x20, else <run>-pc<N>[-s<size>], shared by both benchmarks).")
    p.add_argument("--train", action="store_true", help="Train the model first if --run has none.")
    p.add_argument("--data", default="fashion-mnist", help="Dataset for --train.")
    p.add_argument("--model", default="resnet18", help="Model for --train.")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--size", type=int, default=20, help="SOM side (torus).")
    p.add_argument("--som-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default $OMP_NUM_THREADS or 2).")
    p.add_argument("--fresh", action="store_true", help="Re-extract and re-fit even if the run has them.")
    p.add_argument("--markdown", action="store_true", help="Also print markdown tables for BENCHMARKS.md.")


def prepare(a, say):
    """Model, run directory, codes and maps shared by paper_trends.py and adversarial_shift.py.

    50 per class on 20×20 maps goes into ``--run`` itself; other settings into
    ``<run>-pc<N>[-s<size>]`` with a copy of the model, unless ``--out`` names the run.
    Returns ``(run, meta, net, draws, timings)``.
    """
    src = Run(a.run)
    meta = ensure_model(src, train=a.train, data=a.data, model=a.model, seed=a.seed,
                        device=a.device, say=say)
    if a.out:
        run = Run(a.out)
    elif a.per_class == 50 and a.size == 20:
        run = src
    else:
        run = Run(f"{str(src.root).rstrip('/')}-pc{a.per_class}" + ("" if a.size == 20 else f"-s{a.size}"))
    if run.root.resolve() != src.root.resolve():
        copy_model(src, run)
    net, draws, timings = ensure_codes_and_soms(run, meta, per_class=a.per_class, size=a.size,
                                                som_epochs=a.som_epochs, seed=a.seed,
                                                device=a.device, fresh=a.fresh, say=say)
    return run, meta, net, draws, timings


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)

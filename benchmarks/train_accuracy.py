"""Accuracy and wall time of ``somprobe train`` defaults (resnet18) on mnist5k and fashion-mnist.

For each dataset it reports, in the same run:

* somprobe: held-out accuracy of resnet18 trained with the defaults, the training wall time, and
  the mean time per optimisation step of the training loop;
* reference 1 (accuracy): scikit-learn's logistic regression on the raw pixels of the same
  train/held-out split (a linear baseline the network must beat);
* reference 2 (speed): a bare timm resnet18 forward+backward+SGD step on random tensors of the
  same batch and input size (what the loop costs without data loading, resizing, augmentation).
  The ratio loop-step / bare-step is the overhead of somprobe's data pipeline.

Targets (issue 2): mnist5k held-out ≥ 0.95, fashion-mnist validation ≥ 0.88.

    python benchmarks/train_accuracy.py                 # both datasets, defaults (minutes)
    python benchmarks/train_accuracy.py --quick         # mnist5k, 2 epochs, subsets
    python benchmarks/train_accuracy.py --reuse runs    # report runs/<data>-resnet18 if trained

``--reuse DIR`` re-evaluates a finished ``DIR/<name>-resnet18`` model (names ``mnist5k``,
``fmnist``) instead of training it again, and reports the training time stored in its meta.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from somprobe.classifier import (TRAIN_DEFAULTS, default_epochs, default_image_size,  # noqa: E402
                                 evaluate, load_trained, train_classifier)
from somprobe.data import load_dataset  # noqa: E402
from somprobe.run import Run  # noqa: E402

RUN_NAMES = {"mnist5k": "mnist5k-resnet18", "fashion-mnist": "fmnist-resnet18"}
TARGETS = {"mnist5k": 0.95, "fashion-mnist": 0.88}


def bare_step_seconds(model_name: str, batch: int, size: int, num_classes: int, reps: int = 5) -> float:
    import timm

    net = timm.create_model(model_name, num_classes=num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step allocates
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def linear_baseline(train, val, max_train=None) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    from somprobe.classifier import _subset

    idx = _subset(len(train), max_train, 0)  # the training subset train_classifier(seed=0) uses
    xtr = train.images(idx, train.native_size)[:, 0].reshape(len(idx), -1).numpy()
    xva = val.images(np.arange(len(val)), val.native_size)[:, 0].reshape(len(val), -1).numpy()
    t = time.perf_counter()
    clf = LogisticRegression(max_iter=200).fit(xtr, train.labels[idx])
    dt = time.perf_counter() - t
    return float((clf.predict(xva) == val.labels).mean()), dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["mnist5k", "fashion-mnist"])
    ap.add_argument("--model", default=TRAIN_DEFAULTS["model_name"])
    ap.add_argument("--epochs", type=int, default=None, help="default: somprobe's default")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="mnist5k, 2 epochs, 1000 training images")
    ap.add_argument("--reuse", type=Path, default=None, help="runs root with finished models")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.max_train = ["mnist5k"], args.epochs or 2, args.max_train or 1000

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.data:
        train = load_dataset(name, split="train")
        val = load_dataset(name, split="val")
        size = args.image_size or default_image_size(train.native_size)
        reuse = args.reuse / RUN_NAMES.get(name, name) if args.reuse else None
        if reuse is not None and Run(reuse).model_meta.is_file() and \
                json.loads(Run(reuse).model_meta.read_text()).get("complete"):
            meta = json.loads(Run(reuse).model_meta.read_text())
            how = f"reused {reuse}"
        else:
            tmp = tempfile.mkdtemp(prefix=f"bench-train-{name}-")
            meta = train_classifier(args.model, name, out=tmp, epochs=args.epochs, image_size=size,
                                    max_train=args.max_train, device="cpu",
                                    progress=args.progress)
            reuse = Path(tmp)
            how = f"trained into {tmp}"
        model = load_trained(reuse)
        acc, _ = evaluate(model, val, image_size=int(meta["image_size"]))
        steps = int(np.ceil(meta["train_size"] / meta["batch_size"])) * meta["epochs"]
        loop_step = meta["time_seconds"] / steps  # includes the per-epoch validation
        bare = bare_step_seconds(meta["model"], meta["batch_size"], int(meta["image_size"]),
                                 int(meta["num_classes"]))
        lin_acc, lin_t = linear_baseline(train, val, args.max_train)
        target = TARGETS.get(name)
        ok = "" if target is None else (" PASS" if acc >= target else " FAIL") + f" (target {target})"
        print(f"\n[{name}] {how}")
        print(f"  somprobe {meta['model']} @ {meta['image_size']} px, {meta['epochs']} epochs "
              f"(default {default_epochs(len(train))}), train {meta['train_size']}, "
              f"held-out {len(val)}")
        print(f"  held-out accuracy {acc:.4f}{ok}; per-epoch {meta['val_accuracy']}")
        print(f"  training wall time {meta['time_seconds']:.1f} s "
              f"(per epoch {meta['epoch_seconds']})")
        print(f"  reference logistic regression on pixels: accuracy {lin_acc:.4f} ({lin_t:.1f} s); "
              f"resnet/linear error ratio {(1 - acc) / max(1 - lin_acc, 1e-9):.2f}")
        print(f"  loop step {loop_step * 1e3:.0f} ms vs bare timm step {bare * 1e3:.0f} ms "
              f"now: ratio {loop_step / bare:.2f} (>1: data pipeline + validation + CPU "
              "contention during training)")


if __name__ == "__main__":
    main()

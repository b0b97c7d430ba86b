"""Sharded extraction and PGD under torchrun: 2 ranks × 1 thread vs 1 rank × 1 thread (issue 12).

Both configurations run in the same invocation, alternating, each ``--repeats`` times; the best
time of each counts. Every configuration is launched the way a user would
(``python -m torch.distributed.run --nproc-per-node K``, gloo on the CPU, ``OMP_NUM_THREADS=1``);
inside, the timed part goes from a barrier after start-up (imports, model build, process group)
to a barrier after the last rank finished, so the ratio is the speed-up of the work itself. The
launch overhead is printed separately (wall time of the whole command).

resnet18 (random init, seeded) on synthetic images made per batch from their indices, CL1–CL4,
all four statistics. Also prints the one-thread per-image extraction cost at 32 px and 224 px
(the numbers behind README "Scaling").

    python benchmarks/distributed_extract.py            # 1,024 images at 32 px, PGD 10 steps on 256
    python benchmarks/distributed_extract.py --quick    # 256 images, PGD on 64
    python benchmarks/distributed_extract.py --float16-som [--run RUN]
        # do maps fitted on float16-stored codes equal the float32 ones? (50 per class of
        # mnist5k, RUN's trained model or a seeded untrained resnet18, 20x20 torus, paper defaults)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


class SyntheticImages:
    """Dataset contract of somprobe.data; pixels drawn per batch from a generator seeded by index."""

    def __init__(self, n: int):
        import numpy as np

        self.labels = np.arange(n, dtype=np.int64) % 10
        self.ids = [str(i) for i in range(n)]
        self.name, self.split, self.num_classes = "synthetic", "train", 10

    def __len__(self):
        return len(self.labels)

    def images(self, indices, image_size):
        import numpy as np
        import torch

        idx = np.asarray(indices)
        g = torch.Generator().manual_seed(int(idx[0]))
        return torch.rand(len(idx), 3, image_size, image_size, generator=g)


def worker(args) -> None:
    """One rank (launched by torchrun): time extraction (and PGD) between barriers."""
    import numpy as np
    import torch

    from somprobe import distributed as dist
    from somprobe.attacks.job import attack_run
    from somprobe.extract import extract
    from somprobe.models import build_model
    from somprobe.run import Run

    torch.set_num_threads(1)
    ctx = dist.init("cpu")
    model = build_model("resnet18", num_classes=10, image_size=args.size, seed=0)
    data = SyntheticImages(args.n)
    run = Run(args.out)
    out = {"world_size": ctx.world_size}
    dist.barrier()
    t = time.perf_counter()
    extract(model, data, None, layers="CL1-CL4", out=run, split="codes", batch_size=args.batch,
            device="cpu")
    dist.barrier()
    out["extract_s"] = time.perf_counter() - t
    if args.attack_n:
        dist.barrier()
        t = time.perf_counter()
        attack_run(run, model=model, dataset=data, indices=np.arange(args.attack_n), eps=4 / 255,
                   steps=args.steps, batch_size=args.batch, device="cpu", extract=False)
        dist.barrier()
        out["attack_s"] = time.perf_counter() - t
    if ctx.is_main:
        print("RESULT " + json.dumps(out), flush=True)
    dist.finalize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(k: int, args, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}",
           os.path.abspath(__file__), "--worker", "--out", out, "--images", str(args.n),
           "--size", str(args.size), "--batch", str(args.batch), "--attack-n", str(args.attack_n),
           "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{k} ranks failed:\n{p.stderr[-3000:]}")
    line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = wall
    return res


def per_image_cost(size: int, n: int, batch: int) -> float:
    """Seconds per image of one-thread extraction (resnet18, CL1–CL4) at ``size`` px."""
    import torch

    from somprobe.extract import extract
    from somprobe.models import build_model

    torch.set_num_threads(1)
    model = build_model("resnet18", num_classes=1000, image_size=size, seed=0)
    with tempfile.TemporaryDirectory() as d:
        extract(model, SyntheticImages(batch), None, layers="CL1-CL4", out=f"{d}/warm",
                batch_size=batch, device="cpu")
        t = time.perf_counter()
        extract(model, SyntheticImages(n), None, layers="CL1-CL4", out=f"{d}/s", batch_size=batch,
                device="cpu")
        return (time.perf_counter() - t) / n


def float16_som_check(run_dir: str | None, per_class: int = 50) -> None:
    """Fit the same 20×20 torus SOM on float32 codes and on their float16 rounding (what a
    ``--dtype float16`` store returns); compare with the difference between two SOM seeds."""
    import numpy as np
    import torch

    from somprobe.classifier import load_trained
    from somprobe.data import balanced_indices, load_dataset
    from somprobe.extract import extract
    from somprobe.models import build_model
    from somprobe.run import Run
    from somprobe.som.grid import Grid
    from somprobe.som.map import SOM

    torch.set_num_threads(1)
    if run_dir:
        model, what = load_trained(Run(run_dir), device="cpu"), f"trained model of {run_dir}"
    else:
        model, what = build_model("resnet18", num_classes=10, image_size=32, seed=0), "untrained resnet18 (seed 0)"
    ds = load_dataset("mnist5k", split="train", image_size=32)
    idx = balanced_indices(ds.labels, per_class, seed=0)
    grid = Grid(20, 20)
    print(f"float16 storage vs float32: {len(idx)} mnist5k images, {what}, 20x20 torus, online, "
          "batch 10, 5 epochs, sigma 10, alpha 0.1")
    print("  same BMU / mean BMU dist: share of samples whose top-1 BMU is the same as on the float32 "
          "map / mean torus distance between the two BMUs (grid units), for the map on float16 codes, "
          "on float32 codes jittered by 1e-6 relative (float rounding scale), and for another seed")
    print(f"  {'layer':<5} {'D':>5} {'max rel. code err':>17} {'same BMU f16':>12} {'jitter':>6} "
          f"{'seed':>5} {'mean BMU dist f16':>17} {'jitter':>6} {'seed':>6} {'QE f32':>8} {'QE f16':>8}")
    with tempfile.TemporaryDirectory() as d:
        store = extract(model, ds, idx, layers="CL1-CL4", out=f"{d}/s", batch_size=100, device="cpu")
        for layer in store.layers:
            x32 = np.asarray(store.codes(layer))
            x16 = x32.astype(np.float16).astype(np.float32)
            err = float(np.abs(x16 - x32).max() / np.abs(x32).max())

            def fit(x, seed):
                som = SOM(20, 20, x.shape[1], seed=seed, device="cpu").fit(x)
                return som, som.bmus(x, k=1)[0][:, 0]

            rng = np.random.default_rng(0)
            xj = (x32 * (1 + 1e-6 * rng.standard_normal(x32.shape))).astype(np.float32)
            s32, b32 = fit(x32, 0)
            s16, b16 = fit(x16, 0)
            _, bj = fit(xj, 0)
            _, bseed = fit(x32, 1)
            same = [np.mean(b32 == b) for b in (b16, bj, bseed)]
            far = [float(np.mean(grid.unit_distance(b32, b))) for b in (b16, bj, bseed)]
            print(f"  {layer:<5} {x32.shape[1]:>5} {err:>17.2e} {same[0]:>12.3f} {same[1]:>6.3f} "
                  f"{same[2]:>5.3f} {far[0]:>17.3f} {far[1]:>6.3f} {far[2]:>6.2f} "
                  f"{s32.quantization_error(x32):>8.5f} {s16.quantization_error(x32):>8.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--images", dest="n", type=int, default=1024, help="images extracted")
    ap.add_argument("--size", type=int, default=32, help="input side in pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--attack-n", type=int, default=256, help="images attacked (0: no attack)")
    ap.add_argument("--steps", type=int, default=10, help="PGD steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="256 images, PGD on 64, one repeat")
    ap.add_argument("--no-cost", action="store_true", help="skip the per-image cost at 32/224 px")
    ap.add_argument("--float16-som", action="store_true", help="only the float16-storage SOM check")
    ap.add_argument("--run", help="run directory with a trained model for --float16-som")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.float16_som:
        return float16_som_check(args.run)
    if args.quick:
        args.n, args.attack_n, args.repeats = 256, 64, 1

    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for rep in range(args.repeats):
            for k in (1, 2):
                res = launch(k, args, os.path.join(d, f"k{k}-r{rep}"))
                print(f"{k} rank(s), repeat {rep + 1}: " + ", ".join(f"{key} {v:.2f}" for key, v in res.items()
                                                                      if key != "world_size"), flush=True)
                for key, v in res.items():
                    best.setdefault(k, {})[key] = min(best.get(k, {}).get(key, float("inf")), v)
    print(f"\nresnet18, {args.n} synthetic images at {args.size} px, batch {args.batch}, CL1-CL4, "
          f"gloo, 1 thread per rank (best of {args.repeats})")
    for key, what in (("extract_s", "extraction"), ("attack_s", f"PGD {args.steps} steps on {args.attack_n}")):
        if key in best[1]:
            r = best[1][key] / best[2][key]
            print(f"  {what:<28} 1 rank {best[1][key]:7.2f} s   2 ranks {best[2][key]:7.2f} s   "
                  f"speed-up {r:.2f}x")
    print(f"  {'whole command (with start-up)':<28} 1 rank {best[1]['wall_s']:7.2f} s   "
          f"2 ranks {best[2]['wall_s']:7.2f} s")
    if not args.no_cost:
        for size, n, batch in ((32, 512, 64), (224, 32, 16)):
            c = per_image_cost(size, n, batch)
            print(f"  one-thread extraction cost at {size:>3} px: {c * 1e3:7.2f} ms/image "
                  f"({1 / c:6.1f} images/s)")


if __name__ == "__main__":
    main()

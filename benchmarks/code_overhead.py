"""Vector-code overhead: forward pass + codes of CL1–CL4 vs the bare forward pass ``model(x)``.

resnet18 (random init), 224 px, batch 32, CPU by default. Both variants run in the same process,
interleaved repeat by repeat, so machine load affects both alike. The headline is the ratio of the
best (minimum) times, as timeit recommends: load only ever adds time, so the minimum is the least
disturbed estimate; medians and paired ratios are printed too.
Target (issue 2): at most 5 % extra time.

    python benchmarks/code_overhead.py            # resnet18, 224 px, batch 32, 15 repeats
    python benchmarks/code_overhead.py --quick    # batch 8, 3 repeats
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from somprobe.codes import layer_code
from somprobe.models import ProbedModel, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stats", default="max,mean,std,com")
    ap.add_argument("--com", default="flat", choices=["flat", "rc"])
    ap.add_argument("--quick", action="store_true", help="batch 8, 3 repeats")
    a = ap.parse_args()
    if a.quick:
        a.batch, a.repeats = 8, 3
    if a.threads:
        torch.set_num_threads(a.threads)

    model = build_model(a.model, num_classes=1000, image_size=a.size, device=a.device)
    probe = ProbedModel(model, "CL1-CL4")
    x = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0)).to(model.mean.device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def bare():
        model(x)

    codes_time = []

    def with_codes():
        logits, acts = probe(x)
        t = time.perf_counter()
        for v in acts.values():
            layer_code(v, a.stats, a.com)
        sync()
        codes_time.append(time.perf_counter() - t)

    times = {"bare": [], "codes": []}
    with torch.inference_mode():
        bare(), with_codes()  # warm-up
        codes_time.clear()
        for r in range(a.repeats):
            # alternate which goes first so drifting load does not favour one side
            order = [("bare", bare), ("codes", with_codes)]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    mb, mc = statistics.median(times["bare"]), statistics.median(times["codes"])
    print(f"model={a.model} size={a.size} batch={a.batch} repeats={a.repeats} device={x.device} "
          f"threads={torch.get_num_threads()}")
    print(f"bare forward model(x):        median {mb:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times['bare'])})")
    print(f"forward + CL1-CL4 codes:      median {mc:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times['codes'])})")
    print(f"  of which code computation:  median {statistics.median(codes_time):.3f} s")
    paired = statistics.median(c / b for c, b in zip(times["codes"], times["bare"]))
    share = statistics.median(codes_time) / mb
    best = min(times["codes"]) / min(times["bare"])
    print(f"ratio of best times (codes / bare): {best:.3f}  -> {100 * (best - 1):+.1f} % extra  (target <= +5 %)")
    print(f"ratio of medians (codes / bare): {mc / mb:.3f}  -> {100 * (mc / mb - 1):+.1f} % extra")
    print(f"median of paired ratios:         {paired:.3f}  -> {100 * (paired - 1):+.1f} % extra")
    print(f"code computation alone / bare:   {share:.3f}  -> {100 * share:+.1f} % extra (least noisy)")


if __name__ == "__main__":
    main()

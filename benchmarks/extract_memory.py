"""Peak memory of extraction: 10,000 images vs 1,000 (issue 2 target: within 200 MB).

Each size runs in its own child process (a fresh interpreter), which reports its peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after ``somprobe.extract.extract`` has
written a complete code store. Images are synthetic and made per batch from their indices, so
the dataset itself holds nothing in memory; what could grow with N is the extraction and the
store writer. resnet18 (random init) at 32 px, CL1–CL4, batch 256.

    python benchmarks/extract_memory.py            # 1,000 vs 10,000 images
    python benchmarks/extract_memory.py --quick    # 300 vs 3,000 images
"""
from __future__ import annotations

import argparse
import json
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
        self.name, self.split = "synthetic", "train"

    def images(self, indices, image_size):
        import numpy as np
        import torch

        idx = np.asarray(indices)
        g = torch.Generator().manual_seed(int(idx[0]))
        return torch.rand(len(idx), 3, image_size, image_size, generator=g)


def child(n: int, out: str, model: str, size: int, batch: int) -> None:
    import resource

    import torch

    from somprobe.extract import extract
    from somprobe.models import build_model

    torch.set_num_threads(1)
    m = build_model(model, num_classes=10, image_size=size)
    t = time.perf_counter()
    store = extract(m, SyntheticImages(n), None, layers="CL1-CL4", out=out, batch_size=batch, device="cpu")
    dt = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    store.validate()  # reading everything back must not hold the store in memory either
    rss_validate_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bytes_on_disk = sum(4 * d * n for d in store.dims.values())
    print(json.dumps({"n": n, "peak_rss_mb": rss_mb, "peak_rss_validate_mb": rss_validate_mb, "seconds": dt, "codes_mb": bytes_on_disk / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=10000)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="300 vs 3,000 images")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child, a.out, a.model, a.size, a.batch)
        return
    if a.quick:
        a.small, a.large = 300, 3000
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (a.small, a.large):
            cmd = [sys.executable, __file__, "--child", str(n), "--out", f"{tmp}/codes-{n}",
                   "--model", a.model, "--size", str(a.size), "--batch", str(a.batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[n] = json.loads(res.stdout.strip().splitlines()[-1])
    s, l = results[a.small], results[a.large]
    print(f"model={a.model} size={a.size}px batch={a.batch} layers=CL1-CL4")
    for r in (s, l):
        print(f"  N={r['n']:>6}: peak RSS {r['peak_rss_mb']:8.1f} MB   codes on disk {r['codes_mb']:7.1f} MB   "
              f"{r['seconds']:.1f} s   (after validate(): {r['peak_rss_validate_mb']:.1f} MB)")
    diff = l["peak_rss_mb"] - s["peak_rss_mb"]
    print(f"peak RSS difference (N={a.large} - N={a.small}): {diff:+.1f} MB (target <= 200 MB); "
          f"ratio {l['peak_rss_mb'] / s['peak_rss_mb']:.3f}; codes grew by {l['codes_mb'] - s['codes_mb']:.1f} MB on disk")


if __name__ == "__main__":
    main()

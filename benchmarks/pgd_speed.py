"""PGD speed: somprobe's built-in Linf PGD vs advertorch 0.2.3's LinfPGDAttack, in one run.

Same model (a randomly initialised timm classifier behind somprobe's normalising wrapper, eval
mode), same batch, same iterations, same seed; both outputs are checked to be identical. Timings
alternate between the implementations and report the median of ``--repeats`` runs.

    python benchmarks/pgd_speed.py            # resnet18, 32 px, batch 64, 50 iterations
    python benchmarks/pgd_speed.py --quick    # test_resnet, 16 px, batch 16, 10 iterations

Ratio = advertorch time / somprobe time (>= 1.0: somprobe is not slower). advertorch runs as users
call it: ``loss.backward()`` also fills the parameters' ``.grad``; somprobe differentiates with
respect to the input only. ``somprobe[advertorch]`` is somprobe's advertorch backend (advertorch's
loop with the parameters' ``requires_grad`` switched off for the attack).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="test_resnet, 16 px, batch 16, 10 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.image_size, a.batch, a.steps, a.repeats = "test_resnet", 16, 16, 10, 3
    if a.threads:
        torch.set_num_threads(a.threads)

    from somprobe import attacks as A
    from somprobe.models import build_model, resolve_device

    dev = resolve_device(a.device)
    torch.manual_seed(0)
    model = build_model(a.model, num_classes=10, image_size=a.image_size, device=dev).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(a.batch, 3, a.image_size, a.image_size, generator=g).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    eps = 4 / 255
    eps_iter = eps * 2 / 100
    adversary = A.import_advertorch_attacks().LinfPGDAttack(
        model, eps=eps, nb_iter=a.steps, eps_iter=eps_iter, rand_init=True, clip_min=0.0, clip_max=1.0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    runs = {
        "somprobe": lambda: A.pgd(model, x, y, eps=eps, steps=a.steps, step_size=eps_iter),
        "advertorch": lambda: adversary.perturb(x, y),
        "somprobe[advertorch]": lambda: A.pgd(model, x, y, eps=eps, steps=a.steps,
                                              step_size=eps_iter, backend="advertorch"),
    }
    outs, times = {}, {k: [] for k in runs}
    for k, f in runs.items():  # warm-up (allocator, cudnn autotune) and the outputs to compare
        torch.manual_seed(3)
        outs[k] = f()
        sync()
    for _ in range(a.repeats):
        for k, f in runs.items():
            torch.manual_seed(3)
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    for p_ in model.parameters():  # advertorch's backward filled them; leave the model clean
        p_.grad = None

    same = torch.equal(outs["somprobe"], outs["advertorch"])
    same_b = torch.equal(outs["somprobe"], outs["somprobe[advertorch]"])
    print(f"model={a.model} image_size={a.image_size} batch={a.batch} steps={a.steps} "
          f"device={dev} threads={torch.get_num_threads()} repeats={a.repeats}")
    print(f"identical adversarial images: somprobe == advertorch: {same}; "
          f"somprobe == somprobe[advertorch]: {same_b}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in runs:
        print(f"{k:22s} median {med[k]:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in times[k])})")
    print(f"ratio advertorch / somprobe = {med['advertorch'] / med['somprobe']:.2f}x "
          f"(target >= 1.0x)")
    print(f"ratio somprobe[advertorch] / somprobe = {med['somprobe[advertorch]'] / med['somprobe']:.2f}x")


if __name__ == "__main__":
    main()

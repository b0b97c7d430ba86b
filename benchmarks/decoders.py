"""Decoders from CL1–CL4 back to the image on a trained classifier, and the cost of the generic split.

Two parts, both in one run of this script:

1. **Split cost.** ``split_model`` splits timm ResNets cleanly (the tail runs only the layers
   after the probe) and every other conv family by forward hooks (the tail re-runs the net on
   one placeholder image with the probed stage's output replaced by ``z``). On the run's
   ResNet both exist, so the same latents go through the clean tail and the hook tail
   (``_HookTail`` on the same stage module); the script prints the median time of each at a
   batch of ``--batch`` latents and the ratio hook / clean, plus the latent shapes at the
   model's input size and at twice that size (32 vs 64 px for Fashion-MNIST).

2. **Decoder cards.** ``train_decoders`` (the library call behind ``somprobe decoder``) for
   each layer on ``--max-train`` training images with the study's default epochs and batch
   sizes; prints per layer: latent shape, val MSE of the decoder and of the least-squares
   linear decoder (the bar), their ratio, the conv decoder alone, the mean gate, the epoch
   kept, the ridge picked, the linear part's basis, PSNR and class kept.

    python benchmarks/decoders.py --run /work/runs-shared/fmnist-resnet18 \\
        --out /work/runs-shared/decoders-fmnist --max-train 10000
    python benchmarks/decoders.py --split-only          # part 1 only (seconds)

The model folder of ``--run`` is copied into ``--out`` (decoders are written there, never into
the source run). Re-running with ``--resume`` keeps finished decoders.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def split_cost(model, layers, *, batch: int, repeats: int, device) -> list[dict]:
    """Clean ResNet tail vs the generic hook tail on the same latents (same model, same batch)."""
    from somprobe.models import _HookTail, _conv_stage_module, split_model

    size = int(model.image_size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    rows = []
    with torch.no_grad():
        full = _median_time(lambda: model(x), repeats)
        for layer in layers:
            head, tail = split_model(model, layer)
            hook = _HookTail(model, _conv_stage_module(model.net, int(layer[2:])), size)
            z = head(x)
            same = torch.allclose(tail(z), hook(z), rtol=1e-4, atol=1e-4)
            t_clean = _median_time(lambda: tail(z), repeats)
            t_hook = _median_time(lambda: hook(z), repeats)
            big = head(torch.rand(1, 3, 2 * size, 2 * size, generator=g).to(device))
            rows.append({"layer": layer, "shape": "x".join(map(str, z.shape[1:])),
                         f"shape_{2 * size}px": "x".join(map(str, big.shape[1:])),
                         "clean_s": t_clean, "hook_s": t_hook, "ratio": t_hook / t_clean,
                         "full_forward_s": full, "same_logits": same})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="/work/runs-shared/fmnist-resnet18", help="run with the trained model")
    p.add_argument("--out", default="/work/runs-shared/decoders-fmnist", help="run the decoders go to")
    p.add_argument("--layers", default="CL1,CL2,CL3,CL4")
    p.add_argument("--max-train", type=int, default=10000)
    p.add_argument("--max-val", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=None, help="default: study 001 (10 spatial / 5 flat)")
    p.add_argument("--width", type=int, default=64, help="decoder channels at the latent's resolution")
    p.add_argument("--blocks", type=int, default=2, help="conv blocks per resolution")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=256, help="latents per tail call in the split timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--split-only", action="store_true")
    a = p.parse_args(argv)

    from _real_run import copy_model, model_meta, set_threads

    from somprobe.classifier import load_trained
    from somprobe.paths.decoder_job import train_decoders
    from somprobe.run import Run

    threads = set_threads(a.threads)
    src, out = Run(a.run), Run(a.out)
    meta = model_meta(src)
    if meta is None or not meta.get("complete", True):
        raise SystemExit(f"{src.root} has no finished trained model (model/meta.json complete); "
                         "wait for `somprobe train` or point --run at a finished run")
    copy_model(src, out)
    model = load_trained(out, device=a.device)
    layers = [s.strip() for s in a.layers.split(",") if s.strip()]
    print(f"# {meta['model']} on {meta['dataset']} at {meta['image_size']} px, val acc "
          f"{meta['val_accuracy'][-1]:.4f}; torch threads {threads}; device {a.device}")

    print(f"\n## split cost: clean ResNet tail vs generic hook tail, batch {a.batch}, median of {a.repeats}")
    rows = split_cost(model, layers, batch=a.batch, repeats=a.repeats, device=a.device)
    size = int(model.image_size)
    print(f"{'layer':6} {'latent':>10} {f'at {2 * size}px':>10} {'clean s':>9} {'hook s':>9} "
          f"{'hook/clean':>10} {'same':>5}")
    for r in rows:
        print(f"{r['layer']:6} {r['shape']:>10} {r[f'shape_{2 * size}px']:>10} {r['clean_s']:9.4f} "
              f"{r['hook_s']:9.4f} {r['ratio']:10.2f} {str(r['same_logits']):>5}")
    print(f"full forward of the batch: {rows[0]['full_forward_s']:.4f} s")
    if a.split_only:
        return

    print(f"\n## decoders: max_train {a.max_train}, max_val {a.max_val}, epochs "
          f"{a.epochs or 'study default'}, width {a.width}, blocks {a.blocks}, lr {a.lr}")
    t = time.perf_counter()
    cards = train_decoders(out, layers, model=model, epochs=a.epochs, max_train=a.max_train,
                           max_val=a.max_val, width=a.width, blocks=a.blocks, lr=a.lr,
                           device=a.device, seed=a.seed, resume=a.resume, progress=True)
    print(f"{'layer':6} {'latent':>10} {'epochs':>6} {'val MSE':>9} {'linear':>9} {'lin/dec':>8} "
          f"{'conv':>9} {'gate':>5} {'best':>4} {'ridge':>6} {'basis':>9} "
          f"{'PSNR dB':>8} {'lin PSNR':>8} {'kept':>6} {'beats':>5} {'s':>7}")
    for layer, c in cards.items():
        conv = c.get("conv_val_mse")
        print(f"{layer:6} {'x'.join(map(str, c['latent_shape'])):>10} {c['epochs']:6d} "
              f"{c['val_mse']:9.5f} {c['linear_val_mse']:9.5f} {c['linear_val_mse'] / c['val_mse']:8.3f} "
              f"{conv if conv is None else f'{conv:.5f}':>9} {c.get('gate_mean') or 0:5.2f} "
              f"{c.get('best_epoch', c['epochs']):4d} {c.get('linear_ridge') or 0:6.0e} "
              f"{str(c.get('linear_basis')):>9} "
              f"{c['psnr']:8.2f} {c['linear_psnr']:8.2f} {c['class_kept']:6.3f} "
              f"{str(c['beats_linear']):>5} {c['seconds']:7.0f}")
    print(f"total {time.perf_counter() - t:.0f} s; cards in {out.decoders_dir}")


if __name__ == "__main__":
    main()

"""The run-level job behind ``somprobe decoder``: train, save, load and score latent decoders.

For each layer a :class:`~somprobe.paths.decoders.Decoder` learns to map the layer's raw latent
(the head of :func:`somprobe.models.split_model`, the same points paths live on) back to the
image, on the train split of the dataset the run's model was trained on. Files, all under
``run.decoders_dir`` and all written atomically:

* ``<layer>.pt`` — the weights (with the linear part's ``[dim, pixels]`` matrix: 50 MB at CL1 of a
  32-px resnet18): plain tensors and the architecture as a JSON string, read back
  with ``torch.load(weights_only=True)`` (a corrupt or foreign file is a clear
  :class:`~somprobe.errors.DecoderError`; nothing is unpickled).
* ``<layer>.state.pt`` — per-epoch training checkpoint for ``--resume`` (removed when done).
* ``<layer>.json`` — the card: architecture, latent shape, training settings, train/val/held-out
  MSE per epoch, the epoch kept, val PSNR, the val MSE of a least-squares linear decoder on the
  same latents (the bar; with the default linear part it is the decoder's own starting point),
  the conv decoder's val MSE alone, the gate, the ridge picked, and "class kept" (the model's
  accuracy on decoded val images over its clean accuracy).
* ``<layer>-samples.npz`` — a few val images and their reconstructions (the figure).
* ``cards.csv`` — one row per card (the report's table).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from ..device import resolve_device
from ..errors import DecoderError
from ..run import Run, atomic_output, atomic_write_json, save_csv
from .decoders import (
    RIDGE_GRID, Decoder, RidgeStats, build_decoder, decode, decoder_defaults, fit_linear_decoder,
    fit_gate, fit_ridge, psnr, reduce_latent, train_epoch,
)

__all__ = ["train_decoders", "train_decoder", "load_decoder", "read_decoder", "save_decoder",
           "require_decoder", "read_cards", "cards_table", "DECODER_FORMAT", "CARD_COLUMNS"]

#: ``format`` entry of a decoder file; anything else is refused as foreign.
DECODER_FORMAT = "somprobe-decoder"
_VERSION = 2
#: Versions read back: 1 = conv stack + sigmoid (no linear part), 2 = linear part + gated conv.
_READABLE = (1, 2)
#: Columns of ``decoders/cards.csv``.
CARD_COLUMNS = ["layer", "latent_shape", "kind", "epochs", "batch_size", "n_train", "n_val",
                "train_mse", "val_mse", "psnr", "linear_val_mse", "linear_psnr", "beats_linear",
                "linear_basis", "linear_part_val_mse", "conv_val_mse", "best_epoch",
                "clean_acc", "decoded_acc", "class_kept", "seconds"]
# settings that must match to continue a decoder's training with --resume
_RESUME_KEYS = ("model", "dataset", "image_size", "latent_shape", "arch", "epochs", "batch_size",
                "lr", "seed", "n_train", "n_holdout")


# --------------------------------------------------------------------------- files
def save_decoder(path: str | Path, decoder: Decoder) -> None:
    """Write ``decoder`` to ``path`` atomically as plain tensors + its architecture (JSON string)."""
    obj = {"format": DECODER_FORMAT, "version": _VERSION, "arch": json.dumps(decoder.arch),
           "state_dict": {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}}
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _torch_load(path: Path, what: str, fix: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickled code refused by weights_only, truncated file ...
        raise DecoderError(f"cannot read {what} {path}: {str(e).splitlines()[0][:200]}; "
                           f"it is corrupt or not a somprobe decoder file: {fix}") from e


def read_decoder(path: str | Path, *, device="cpu", fix: str = "retrain it with `somprobe decoder`") -> Decoder:
    """Rebuild a decoder saved by :func:`save_decoder` (``weights_only`` load: never runs code).

    Raises
    ------
    DecoderError
        Missing, corrupt or foreign file, or weights that do not fit the stored architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise DecoderError(f"no decoder file {path}: {fix}")
    obj = _torch_load(path, "decoder", fix)
    if not isinstance(obj, dict) or obj.get("format") != DECODER_FORMAT:
        raise DecoderError(f"{path} is not a somprobe decoder file (no format {DECODER_FORMAT!r}); {fix}")
    if obj.get("version") not in _READABLE:
        raise DecoderError(f"{path} is decoder format version {obj.get('version')!r}, this somprobe "
                           f"reads versions {', '.join(map(str, _READABLE))}; {fix}")
    sd = obj.get("state_dict")
    try:
        arch = json.loads(obj.get("arch", ""))
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise TypeError("state_dict is not a dict of tensors")
        decoder = Decoder(arch)
        decoder.load_state_dict(sd, strict=True)
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise DecoderError(f"decoder file {path} is inconsistent ({str(e)[:200]}); {fix}") from e
    return decoder.to(resolve_device(device)).eval()


def _fix(run: Run, layer: str) -> str:
    return f"run `somprobe decoder --out {run.root} --layer {layer}`"


def require_decoder(run: Run | str | Path, layer: str) -> Path:
    """The path of ``layer``'s trained decoder in ``run``, or an error naming the command that makes it.

    Raises
    ------
    DecoderError
        ``somprobe decoder`` has not (completely) run for ``layer``.
    """
    run = run if isinstance(run, Run) else Run(run)
    path = run.decoder_path(layer)
    if not path.is_file() or not run.decoder_card(layer).is_file():
        partial = " (its training was interrupted: add --resume)" if run.decoder_state(layer).is_file() else ""
        raise DecoderError(f"no decoder for {layer} in {run.root}{partial}: decoded images need one; "
                           f"{_fix(run, layer)}{' --resume' if partial else ''} first")
    return path


def load_decoder(run: Run | str | Path, layer: str, *, device="cpu") -> Decoder:
    """The trained decoder of ``layer`` in ``run`` (eval mode), see :func:`require_decoder`."""
    run = run if isinstance(run, Run) else Run(run)
    return read_decoder(require_decoder(run, layer), device=device,
                        fix=f"{_fix(run, layer)} --overwrite to retrain it")


def read_cards(run: Run | str | Path) -> list[dict]:
    """Every decoder card of ``run`` (sorted by layer); unreadable cards are skipped."""
    run = run if isinstance(run, Run) else Run(run)
    cards = []
    if run.decoders_dir.is_dir():
        for p in sorted(run.decoders_dir.glob("*.json")):
            try:
                card = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(card, dict) and card.get("layer"):
                cards.append(card)
    return cards


def cards_table(cards: Sequence[dict]) -> pd.DataFrame:
    """The tidy ``cards.csv`` table of some cards (columns :data:`CARD_COLUMNS`)."""
    rows = []
    for c in cards:
        row = {k: c.get(k) for k in CARD_COLUMNS}
        row["latent_shape"] = "x".join(str(s) for s in c.get("latent_shape", []))
        row["kind"] = c.get("arch", {}).get("kind")
        row["train_mse"] = (c.get("train_mse") or [None])[-1]
        rows.append(row)
    return pd.DataFrame(rows, columns=CARD_COLUMNS)


# --------------------------------------------------------------------------- training
def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def _sample_positions(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` positions for the figure: one per class first (seeded order), then any others.

    Every layer of a run gets the same positions for the same val subset, so the figure shows
    one row of originals above the reconstructions of all layers.
    """
    order = np.random.default_rng([seed, 11]).permutation(len(labels))
    _, first = np.unique(labels[order], return_index=True)
    firsts = order[np.sort(first)]
    rest = order[~np.isin(order, firsts)]
    return np.concatenate([firsts, rest])[:k].astype(np.int64)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _save_state(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


@torch.no_grad()
def _latents(head, dataset, idx, size, device, batch_size=256):
    zs, xs = [], []
    for s in range(0, len(idx), batch_size):
        x = dataset.images(idx[s:s + batch_size], size).to(device)
        zs.append(head(x))
        xs.append(x)
    return torch.cat(zs), torch.cat(xs)


@torch.no_grad()
def _accuracy(model, x, labels, batch_size=256) -> tuple[float, torch.Tensor]:
    pred = torch.cat([model(x[s:s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])
    return float((pred.cpu() == labels).float().mean()), pred.cpu()


def _chunks(head, dataset, idx, size, device, cache, batch_size=256):
    """``(z, x)`` chunks of ``idx``: slices of ``cache`` when given, else streamed through ``head``."""
    for s in range(0, len(idx), batch_size):
        if cache is not None:
            yield cache[0][s:s + batch_size], cache[1][s:s + batch_size]
            continue
        x = dataset.images(idx[s:s + batch_size], size).to(device)
        with torch.no_grad():
            z = head(x)
        yield z, x


@torch.no_grad()
def _chunked_mse(decoder, chunks) -> float:
    """Mean squared error of ``decoder`` (clipped output) over ``(z, x)`` chunks."""
    total, n = 0.0, 0
    for z, x in chunks:
        total += float(F.mse_loss(decode(decoder, z), x, reduction="sum"))
        n += x.numel()
    return total / max(n, 1)


def _val_mse(fn, z, x, x_hat=None, chunk: int = 256) -> float:
    """Mean squared error of ``fn(z)`` (or of ready ``x_hat``) against ``x``, summed in float64."""
    total = 0.0
    for s in range(0, len(x), chunk):
        pred = x_hat[s:s + chunk] if x_hat is not None else fn(z[s:s + chunk])
        total += float(((pred.double() - x[s:s + chunk].double()) ** 2).sum())
    return total / max(x.numel(), 1)


def _fit_linear_part(decoder: Decoder, fit_chunks, holdout_chunks, device) -> dict:
    """Fit the decoder's linear part in closed form (ridge chosen on the held-out chunks)."""
    basis = decoder.linear
    n_pix = decoder.lin_bias.numel()
    fit = RidgeStats(int(basis["dim"]), n_pix, device=device)
    for z, x in fit_chunks:
        fit.update(reduce_latent(z, basis), x)
    hold = RidgeStats(int(basis["dim"]), n_pix, device=device)
    for z, x in holdout_chunks:
        hold.update(reduce_latent(z, basis), x)
    out = fit_ridge(fit, hold if hold.n else None)
    decoder.set_linear(out["weight"], out["bias"])
    grid = out["holdout_mse"]
    return {"linear_ridge": out["ridge"], "linear_lambda": out["lam"],
            "linear_ridge_grid": list(RIDGE_GRID),
            "linear_ridge_holdout_mse": None if grid is None else [round(v, 8) for v in grid]}


def train_decoder(run: Run, layer: str, *, model, train_data, val_data, epochs: int | None = None,
                  batch_size: int | None = None, lr: float = 1e-3, max_train: int | None = None,
                  max_val: int = 1000, n_linear: int = 4096, ridge: float = 1e-4, n_samples: int = 8,
                  width: int = 64, min_width: int = 16, blocks: int = 2, linear: bool = True,
                  holdout: float = 0.1, gate_samples: int = 2048, cache_mb: float = 2048,
                  device="auto", seed: int = 0, resume: bool = False, overwrite: bool = False,
                  progress: bool = False) -> dict:
    """Train, score and save the decoder of one layer; return its card (see :func:`train_decoders`)."""
    from ..models import split_model

    dev = resolve_device(device)
    if lr <= 0 or (epochs is not None and epochs < 1) or (batch_size is not None and batch_size < 1) \
            or max_val < 1 or n_linear < 2 or not 0 <= holdout < 1 or gate_samples < 1:
        raise DecoderError(f"lr ({lr}), epochs ({epochs}), batch_size ({batch_size}) and max_val "
                           f"({max_val}) must be positive, n_linear ({n_linear}) at least 2 and "
                           f"holdout ({holdout}) in [0, 1)")
    card_path, state_path = run.decoder_card(layer), run.decoder_state(layer)
    if card_path.is_file() and not overwrite:
        if resume:
            return json.loads(card_path.read_text())
        raise DecoderError(f"{layer} already has a decoder in {run.decoders_dir}; pass --overwrite to "
                           "retrain it (or --resume to keep it)")
    model = model.to(dev).eval()
    head, tail = split_model(model, layer)
    size = int(model.image_size)
    with torch.no_grad():
        z0 = head(train_data.images([0], size).to(dev))
    shape = list(z0.shape[1:])
    prefix = int(getattr(model.net, "num_prefix_tokens", 0) or 0) if len(shape) == 2 else 0
    decoder = build_decoder(shape, size, prefix_tokens=prefix, width=width, min_width=min_width,
                            blocks=blocks, linear=linear, seed=seed).to(dev)
    defaults = decoder_defaults(decoder.arch["kind"])
    epochs = int(epochs or defaults["epochs"])
    batch_size = int(batch_size or defaults["batch_size"])
    all_idx = _subset(len(train_data), max_train, seed)
    # a seeded held-out slice of the training subset picks the ridge of the linear part and the
    # epoch kept (epoch 0 = the linear solution); the val split is only ever used for the card
    n_hold = int(round(holdout * len(all_idx))) if len(all_idx) >= 10 else 0
    hold_pos = np.random.default_rng([seed, 5]).permutation(len(all_idx))[:n_hold]
    ho_idx = np.sort(all_idx[hold_pos])
    tr_idx = np.delete(all_idx, hold_pos)
    settings = {"model": getattr(model, "name", ""), "dataset": f"{train_data.name}/{train_data.split}",
                "image_size": size, "latent_shape": shape, "arch": decoder.arch, "epochs": epochs,
                "batch_size": batch_size, "lr": float(lr), "seed": int(seed), "n_train": int(len(tr_idx)),
                "n_holdout": int(n_hold)}
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    history = {"train_mse": [], "val_mse_epochs": [], "holdout_mse_epochs": [], "epoch_seconds": []}
    best = None  # (epoch, holdout mse, state dict) of the best epoch so far
    start = 0
    if state_path.is_file() and not overwrite:
        if not resume:
            raise DecoderError(f"an interrupted training of the {layer} decoder is in {state_path}: "
                               "pass --resume to continue it or --overwrite to start again")
        st = _torch_load(state_path, "decoder checkpoint", "delete it and train again")
        try:
            old = json.loads(st["settings"])
            changed = [k for k in _RESUME_KEYS if old.get(k) != json.loads(json.dumps(settings[k]))]
            if changed:
                k = changed[0]
                raise DecoderError(f"cannot resume the {layer} decoder: it was trained with {k}="
                                   f"{old.get(k)!r}, now {settings[k]!r}; use the same settings or "
                                   "--overwrite")
            decoder.load_state_dict(st["decoder"])
            opt.load_state_dict(st["optimizer"])
            start = int(st["epoch"])
            history = json.loads(st["history"])
            if st.get("best") is not None:
                best = (int(history["best_epoch"]), float(history["best_holdout_mse"]), st["best"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, DecoderError):
                raise
            raise DecoderError(f"decoder checkpoint {state_path} is inconsistent ({str(e)[:200]}); "
                               "delete it and train again") from e

    va_idx = _subset(len(val_data), max_val, seed + 1)
    z_val, x_val = _latents(head, val_data, va_idx, size, dev)
    steps = -(-len(tr_idx) // batch_size)
    # The head is frozen: its latents are the same every epoch, so compute them once when they fit
    # in cache_mb (the head pass costs about as much as a decoder step). Whether the cache is used
    # depends only on the settings, so a resumed training sees the same numbers.
    per_image = 4 * (math.prod(shape) + 3 * size * size)
    cache = hold_cache = None
    if start < epochs and len(all_idx) * per_image <= cache_mb * 2 ** 20:
        cache = _latents(head, train_data, tr_idx, size, dev)
        hold_cache = _latents(head, train_data, ho_idx, size, dev) if n_hold else None

    def fit_chunks():
        return _chunks(head, train_data, tr_idx, size, dev, cache)

    def hold_chunks():
        return _chunks(head, train_data, ho_idx, size, dev, hold_cache)

    gate_pos = np.sort(np.random.default_rng([seed, 9]).permutation(len(tr_idx))[:gate_samples])

    def gate_chunks():
        for s in range(0, len(gate_pos), 256):
            pos = gate_pos[s:s + 256]
            if cache is not None:
                sel = torch.from_numpy(pos).to(dev)
                yield cache[0][sel], cache[1][sel]
            else:
                yield from _chunks(head, train_data, tr_idx[pos], size, dev, None)

    if start == 0:
        if decoder.linear:
            t0 = time.perf_counter()
            history.update(_fit_linear_part(decoder, fit_chunks(), hold_chunks(), dev))
            history["linear_fit_seconds"] = round(time.perf_counter() - t0, 3)
        history["val_mse_init"] = round(float(F.mse_loss(decode(decoder, z_val), x_val)), 7)
        if n_hold:
            h0 = _chunked_mse(decoder, hold_chunks())
            history["holdout_mse_init"] = round(h0, 7)
            best = (0, h0, {k: v.detach().clone() for k, v in decoder.state_dict().items()})
    bar = None
    if progress and start < epochs:
        from tqdm.auto import tqdm
        bar = tqdm(total=(epochs - start) * steps, desc=f"decoder {layer}")
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            perm = np.random.default_rng([seed, epoch]).permutation(len(tr_idx))

            def batches(perm=perm):
                for s in range(0, len(perm), batch_size):
                    pos = perm[s:s + batch_size]
                    if cache is not None:
                        sel = torch.from_numpy(pos).to(dev)
                        yield cache[0][sel], cache[1][sel]
                        continue
                    x = train_data.images(tr_idx[pos], size).to(dev)
                    with torch.no_grad():
                        z = head(x)
                    yield z, x

            def step(loss, epoch=epoch):
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, mse=f"{loss:.4f}")

            try:
                train_mse = train_epoch(decoder, opt, batches(), on_step=step)
            except DecoderError as e:
                raise DecoderError(f"{layer}, epoch {epoch + 1}: {e} with --overwrite") from e
            if decoder.linear:
                # the per-pixel blend of linear part and conv decoder, least squares on (up to
                # gate_samples of) the training latents; the held-out slice stays for choosing
                # the epoch, so that choice is not biased by the gate's own fit
                fit_gate(decoder, gate_chunks())
                history.setdefault("gate_mean_epochs", []).append(round(float(decoder.gate.mean()), 5))
            val_mse = float(F.mse_loss(decode(decoder, z_val), x_val))
            history["train_mse"].append(round(train_mse, 7))
            history["val_mse_epochs"].append(round(val_mse, 7))
            if n_hold:
                h = _chunked_mse(decoder, hold_chunks())
                history["holdout_mse_epochs"].append(round(h, 7))
                if best is None or h < best[1]:
                    best = (epoch + 1, h, {k: v.detach().clone() for k, v in decoder.state_dict().items()})
                history["best_epoch"], history["best_holdout_mse"] = best[0], best[1]
            history["epoch_seconds"].append(round(time.perf_counter() - t0, 3))
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, val_mse=f"{val_mse:.4f}")
            _save_state(state_path, {"decoder": decoder.state_dict(), "optimizer": opt.state_dict(),
                                     "epoch": epoch + 1, "settings": json.dumps(settings),
                                     "history": json.dumps(history),
                                     "best": None if best is None else best[2]})
    finally:
        if bar is not None:
            bar.close()

    # ---- keep the best epoch on the held-out slice (epoch 0: the linear part alone)
    if best is not None:
        decoder.load_state_dict(best[2])
        history["best_epoch"], history["best_holdout_mse"] = best[0], round(best[1], 7)
    else:
        history["best_epoch"] = epochs

    # ---- the card: val reconstruction, the linear bar, class kept
    t0 = time.perf_counter()
    decoder.eval()
    x_hat = decode(decoder, z_val)
    # every val MSE of the card by the same float64 reduction, so that a decoder that kept epoch 0
    # (its linear part) ties with the bar exactly instead of "beating" it by rounding
    val_mse = _val_mse(None, None, x_val, x_hat)
    basis = decoder.linear
    part_mse = conv_mse = None
    if basis:
        with torch.no_grad():
            conv_mse = _val_mse(decoder.conv, z_val, x_val)
            part_mse = _val_mse(lambda z: decoder.linear_part(z).clamp(0, 1), z_val, x_val)
    if basis and basis["basis"] == "full":
        # the bar is the decoder's own starting point: least squares on all its training latents
        lin_mse, n_lin = part_mse, len(tr_idx)
        bar_kind = "the decoder's linear part: ridge least squares on the same train latents"
    else:
        # latent too big for the full normal equations: the bar is the full-dimension fit in dual
        # form on n_linear latents, the decoder's linear part a restricted (reduced-basis) one
        lin_idx = tr_idx[np.random.default_rng([seed, 7]).permutation(len(tr_idx))[:n_linear]]
        z_lin, x_lin = _latents(head, train_data, np.sort(lin_idx), size, dev)
        linear_dec = fit_linear_decoder(z_lin, x_lin, ridge=ridge)
        del z_lin, x_lin
        with torch.no_grad():
            lin_mse = _val_mse(linear_dec, z_val, x_val)
        n_lin = min(n_linear, len(tr_idx))
        bar_kind = (f"full-dimension ridge least squares (relative ridge {ridge}) on {n_lin} train latents"
                    + (f"; the decoder's linear part is restricted to a {basis['basis']} basis of "
                       f"{basis['dim']} numbers" if basis else ""))
    labels = torch.from_numpy(val_data.labels[va_idx])
    clean_acc, clean_pred = _accuracy(model, x_val, labels)
    dec_acc, dec_pred = _accuracy(model, x_hat, labels)
    pick = torch.from_numpy(_sample_positions(labels.numpy(), int(n_samples), seed))
    run.decoders_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(run.decoder_samples(layer)) as tmp, open(tmp, "wb") as f:
        np.savez(f, original=_to_uint8(x_val[pick.to(x_val.device)]),
                 decoded=_to_uint8(x_hat[pick.to(x_hat.device)]),
                 ids=np.asarray([val_data.ids[va_idx[i]] for i in pick.tolist()]),
                 labels=labels[pick].numpy(), pred_clean=clean_pred[pick].numpy(),
                 pred_decoded=dec_pred[pick].numpy(), classes=np.asarray(val_data.classes))
    save_decoder(run.decoder_path(layer), decoder)
    card = {
        "layer": layer, **settings,
        "latent_kind": decoder.arch["kind"],
        "params": int(sum(p.numel() for p in decoder.parameters())),
        "linear_basis": basis["basis"] if basis else None,
        "linear_dim": int(basis["dim"]) if basis else None,
        "optimizer": "adam", "loss": "mse",
        "n_val": int(len(va_idx)), "val_dataset": f"{val_data.name}/{val_data.split}",
        **history,
        "val_mse": round(val_mse, 7), "psnr": round(psnr(val_mse), 4),
        "linear_part_val_mse": None if part_mse is None else round(part_mse, 7),
        "conv_val_mse": None if conv_mse is None else round(conv_mse, 7),
        "gate_mean": round(float(decoder.gate.mean()), 5) if basis else None,
        "linear_val_mse": round(lin_mse, 7), "linear_psnr": round(psnr(lin_mse), 4),
        "linear_bar": bar_kind, "n_linear": int(n_lin), "ridge": ridge,
        "beats_linear": bool(val_mse < lin_mse),
        "clean_acc": round(clean_acc, 6), "decoded_acc": round(dec_acc, 6),
        "class_kept": round(dec_acc / clean_acc, 6) if clean_acc > 0 else None,
        "seconds": round(sum(history["epoch_seconds"]) + history.get("linear_fit_seconds", 0)
                         + time.perf_counter() - t0, 3),
        "device": str(dev), "torch": torch.__version__, "complete": True,
        "file": run.decoder_path(layer).name,
    }
    atomic_write_json(card_path, card)
    state_path.unlink(missing_ok=True)
    save_csv(run.decoder_cards_csv, cards_table(read_cards(run)))
    return card


def train_decoders(run: Run | str | Path, layers: str | Sequence[str] | None = None, *, model=None,
                   dataset=None, data_root=None, epochs: int | None = None,
                   batch_size: int | None = None, lr: float = 1e-3, max_train: int | None = None,
                   max_val: int = 1000, n_linear: int = 4096, ridge: float = 1e-4, n_samples: int = 8,
                   width: int = 64, min_width: int = 16, blocks: int = 2, linear: bool = True,
                   holdout: float = 0.1, gate_samples: int = 2048, cache_mb: float = 2048,
                   device="auto", seed: int = 0, resume: bool = False, overwrite: bool = False,
                   progress: bool = False) -> dict[str, dict]:
    """Train one latent-to-image decoder per layer into ``run/decoders/``.

    Study 001 Tables 2–4 adapted to each layer's latent (:mod:`somprobe.paths.decoders`): MSE,
    Adam at ``lr``; batch 32 and 10 epochs for spatial latents (conv maps, ViT token grids),
    batch 128 and 5 epochs for flat ones (1×1 maps), unless given. Trained on the train split
    with a per-epoch checkpoint; then scored on up to ``max_val`` val images.

    With ``linear`` (default) the decoder is a linear part plus a gated conv decoder: first the
    closed-form ridge least-squares map from the (flattened, or for > 4096 numbers reduced)
    latent to the image is fitted on the training latents (normal equations accumulated in
    float64, the relative ridge picked from :data:`~somprobe.paths.decoders.RIDGE_GRID` on a
    held-out ``holdout`` share of the training subset); the conv decoder is trained as in the
    study; after each epoch the per-pixel gate blending the two is refitted in closed form on up
    to ``gate_samples`` training latents (:func:`~somprobe.paths.decoders.fit_gate`). The epoch kept is the one with
    the least held-out MSE, epoch 0 (the linear map alone) included, so the decoder does not
    lose to its own linear part. The card's bar
    (``linear_val_mse``) is that linear part when the latent was not reduced, else the
    full-dimension ridge fit on ``n_linear`` latents (dual form).

    Parameters
    ----------
    run : Run or path
    layers : str or sequence of str, optional
        ``"CL1,CL3"``, ranges, ``module:<name>`` (any layer :func:`somprobe.models.split_model`
        splits at); default every named probe of the model.
    model : NormalizedModel, optional
        Default: the model trained in ``run`` (``somprobe train``).
    dataset : str or path, optional
        Default: the dataset the run's model was trained on; its train split trains the decoder
        and its val split scores it.
    data_root : path, optional
        Local copy of a named dataset.
    epochs, batch_size : int, optional
        Default: study 001 Table 4 for the latent's kind (see above).
    lr : float
        Adam learning rate (study: 1e-3).
    max_train : int, optional
        Train on a seeded random subset of this many images (default: the whole train split).
    max_val : int
        Val images scored (MSE, PSNR, class kept, linear bar).
    n_linear : int
        Train latents the full-dimension least-squares bar is fitted on when the linear part had to
        be restricted (latents of more than 4096 numbers) or ``linear=False``.
    ridge : float
        Relative ridge of that bar.
    n_samples : int
        Val images and reconstructions saved for the figure.
    width, min_width, blocks : int
        Decoder size (see :func:`~somprobe.paths.decoders.decoder_arch`).
    linear : bool
        Linear part + gated conv decoder (default) or the conv stack alone (sigmoid output).
    holdout : float
        Share of the training subset held out to pick the ridge and the epoch kept (0: none;
        then the smallest ridge and the last epoch).
    gate_samples : int
        Training latents the per-pixel gate is fitted on after each epoch.
    cache_mb : float
        Keep the training latents and images in memory when they take at most this many MiB
        (the frozen head then runs once instead of every epoch); else stream them per batch.
    device : str
    seed : int
        Seeds the decoder's initialisation, the subsets and the shuffling.
    resume : bool
        Keep finished decoders and continue interrupted ones from their last epoch.
    overwrite : bool
        Retrain decoders that exist.
    progress : bool
        tqdm bar per layer.

    Returns
    -------
    dict
        Layer → card (also in ``run.decoder_card(layer)`` and ``decoders/cards.csv``).

    Raises
    ------
    DecoderError, ModelError, DataError
        Bad settings, a layer the model cannot split at (the message names those it can), an
        existing decoder without ``resume``/``overwrite``, a diverging training.
    """
    from ..classifier import load_trained
    from ..data import load_dataset
    from ..models import parse_layers, probe_names

    run = run if isinstance(run, Run) else Run(run)
    meta = json.loads(run.model_meta.read_text()) if run.model_meta.is_file() else {}
    if model is None:
        model = load_trained(run, device=device)
    if dataset is None:
        dataset = meta.get("dataset")
        if dataset is None:
            raise DecoderError(f"no dataset recorded in {run.model_meta}: pass --data NAME")
    layers = parse_layers(layers if layers else probe_names(model) or "", model)
    size = int(model.image_size)
    train_data = load_dataset(dataset, split=meta.get("train_split", "train"), root=data_root, image_size=size)
    val_data = load_dataset(dataset, split=meta.get("val_split", "val"), root=data_root, image_size=size)
    return {layer: train_decoder(run, layer, model=model, train_data=train_data, val_data=val_data,
                                 epochs=epochs, batch_size=batch_size, lr=lr, max_train=max_train,
                                 max_val=max_val, n_linear=n_linear, ridge=ridge, n_samples=n_samples,
                                 width=width, min_width=min_width, blocks=blocks, linear=linear,
                                 holdout=holdout, gate_samples=gate_samples, cache_mb=cache_mb,
                                 device=device,
                                 seed=seed, resume=resume, overwrite=overwrite, progress=progress)
            for layer in layers}

"""The self-organizing map: weights on a torus grid, training, BMUs, errors, save/load.

``SOM(m, n, dim, ...)`` follows scikit-learn's conventions: hyperparameters are keyword-only
and stored unchanged by ``__init__``; ``fit`` learns ``weights`` ([G, D] torch, G = m·n units,
row-major over the grid) and ``curve_`` (the training curve). Data may be a numpy array, a
read-only memmap of a code store or a torch tensor; it is read in chunks and never copied whole
to the device. All grid geometry comes from :class:`somprobe.som.grid.Grid`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from somprobe.errors import SOMError
from ..device import resolve_device
from ..run import atomic_output, atomic_write_json
from somprobe.som import train as _train
from somprobe.som.grid import TOPOLOGIES, Grid

__all__ = ["SOM", "METRICS", "INITS", "MODES", "CURVE_COLUMNS"]

METRICS = ("cosine", "euclidean")
INITS = ("normal", "sample", "pca")
MODES = ("online", "batch")
CURVE_COLUMNS = ["epoch", "step", "samples", "alpha", "sigma", "loss"]
FORMAT = "somprobe-som"
FORMAT_VERSION = 1

# Rows read per chunk are bounded by bytes, not by a row count, so memory stays flat whatever D.
_CHUNK_BYTES = 64 * 2**20
# Rows per BMU batch are bounded so the [rows, G] score matrix stays below this many bytes.
_SCORE_BYTES = 64 * 2**20
# Rows of a curve per epoch when ``log_every`` is not given.
_CURVE_ROWS_PER_EPOCH = 50


class _Rows:
    """Read access to an [N, D] data source in row chunks, as float32 tensors on ``device``."""

    def __init__(self, X, dim: int, device: torch.device, what: str = "data"):
        if isinstance(X, torch.Tensor):
            self.t, self.a = X.detach(), None
            shape = tuple(X.shape)
        else:
            a = X if isinstance(X, np.ndarray) else np.asarray(X)
            self.t, self.a = None, a
            shape = a.shape
        if len(shape) != 2:
            raise SOMError(f"{what} must be a 2-D array [samples, features], got shape {shape}")
        self.n, self.d = int(shape[0]), int(shape[1])
        if self.n == 0:
            raise SOMError(f"{what} is empty (0 rows): give at least one sample")
        if self.d != dim:
            raise SOMError(
                f"dimension mismatch: the SOM has dim={dim} but the {what} has {self.d} features; "
                f"build the SOM with dim={self.d} or pass codes of the layer it was trained on")
        self.device = device

    def chunk_rows(self, multiple: int = 1) -> int:
        rows = max(1, _CHUNK_BYTES // (4 * max(self.d, 1)))
        return max(multiple, rows // multiple * multiple)

    def take(self, idx) -> torch.Tensor:
        """Rows ``idx`` (a slice or int array) as float32 on the device."""
        if self.t is not None:
            if not isinstance(idx, slice):
                idx = torch.as_tensor(idx, device=self.t.device)
            out = self.t[idx]
            return out.to(device=self.device, dtype=torch.float32)
        out = np.asarray(self.a[idx], dtype=np.float32)
        if not out.flags.writeable:
            # a slice of a read-only memmap: copy this chunk (never the whole array) so torch
            # owns writable memory
            out = np.array(out, dtype=np.float32, order="C")
        return torch.from_numpy(np.ascontiguousarray(out)).to(self.device)

    def ranges(self, rows: int):
        for a in range(0, self.n, rows):
            yield a, min(a + rows, self.n)


def _check_rows(rows: _Rows, metric: str, what: str = "data") -> None:
    """Raise :class:`SOMError` on non-finite rows, or all-zero rows under the cosine metric."""
    n_bad = n_zero = 0
    first_bad = first_zero = None
    for a, b in rows.ranges(rows.chunk_rows()):
        c = rows.take(slice(a, b))
        # One fused pass: a row's norm is finite and non-zero unless the row has NaN/Inf (or
        # overflows, or is zero); only those few rows are then looked at element by element.
        norms = torch.linalg.vector_norm(c, dim=1)
        suspect = ~torch.isfinite(norms) | (norms == 0)
        bad = torch.zeros_like(suspect)
        zero = torch.zeros_like(suspect)
        if bool(suspect.any()):
            cs = c[suspect]
            bad[suspect] = ~torch.isfinite(cs).all(dim=1)
            zero[suspect] = (cs == 0).all(dim=1)
        nb = int(bad.sum())
        if nb:
            n_bad += nb
            if first_bad is None:
                first_bad = a + int(torch.nonzero(bad)[0, 0])
        if metric == "cosine":
            nz = int(zero.sum())
            if nz:
                n_zero += nz
                if first_zero is None:
                    first_zero = a + int(torch.nonzero(zero)[0, 0])
    if n_bad:
        raise SOMError(
            f"{what} has {n_bad} row(s) with NaN or Inf (first at row {first_bad}); "
            f"drop or repair those rows (re-extract the codes) before fitting or mapping")
    if n_zero:
        raise SOMError(
            f"{what} has {n_zero} all-zero row(s) (first at row {first_zero}): the cosine metric is "
            f"undefined for a zero vector; drop those rows or use metric='euclidean'")


class SOM:
    """A self-organizing map on an ``m`` × ``n`` grid (torus by default) with cosine distance.

    Parameters
    ----------
    m, n : int
        Rows and columns of the grid (each ≥ 2).
    dim : int
        Dimension of the data (and of each unit's weight vector).
    topology : {"torus", "planar"}
        Periodic boundary (study 003) or a plain grid.
    metric : {"cosine", "euclidean"}
        Distance between data and weights; chooses the BMUs and the reported distances.
        Cosine distance is ``1 − u·v/(‖u‖‖v‖)``.
    sigma : float
        Initial neighbourhood width σ0 in grid units.
    alpha : float
        Initial learning rate α0 (online mode only; the batch map has no learning rate).
    decay : {"exp", "linear", "half"}
        quicksom's schedule ``s(t/T)`` applied to α and σ: e^(−5t/T), 1 − t/T, 0.5^⌊20t/T⌋.
    epochs : int
        Passes over the data.
    batch_size : int
        Mini-batch size of the online rule.
    mode : {"online", "batch"}
        ``online``: quicksom's mini-batch rule, α and σ decaying per batch. ``batch``: Kohonen's
        batch map, one update ``W_j = Σ h_bj x_b / Σ h_bj`` per epoch with σ = σ0·s(epoch/epochs).
    init : {"normal", "sample", "pca"}
        ``normal``: standard normal weights (quicksom's); ``sample``: random data rows; ``pca``:
        the plane of the first two principal components (a plane, so it does not wrap around a
        torus). ``fit(init_weights=...)`` overrides it.
    seed : int
        Seed of the SOM's own ``torch.Generator`` (initialisation and shuffling).
    device : str or torch.device
        ``"auto"`` picks CUDA when present.

    Attributes
    ----------
    weights : torch.Tensor [m·n, dim] or None
        Unit weights (row-major over the grid) once fitted or loaded.
    curve_ : pandas.DataFrame
        Training curve: ``epoch`` (from 1), ``step`` (mini-batches done), ``samples`` (samples
        seen), ``alpha``, ``sigma`` (of the logged window's last batch) and ``loss`` (mean BMU
        distance over the window's samples, measured before each batch's update).
    epoch_loss_ : pandas.DataFrame
        Mean BMU distance per epoch (``epoch``, ``loss``).
    step_, samples_, epoch_ : int
        Mini-batches, samples and epochs done.
    """

    def __init__(self, m, n, dim, *, topology="torus", metric="cosine", sigma=10.0, alpha=0.1,
                 decay="exp", epochs=5, batch_size=10, mode="online", init="normal", seed=0,
                 device="auto"):
        self.m = m
        self.n = n
        self.dim = dim
        self.topology = topology
        self.metric = metric
        self.sigma = sigma
        self.alpha = alpha
        self.decay = decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.mode = mode
        self.init = init
        self.seed = seed
        self.device = device
        self._validate()
        self.weights = None
        self.curve_ = pd.DataFrame(columns=CURVE_COLUMNS)
        self.step_ = 0
        self.samples_ = 0
        self.epoch_ = 0
        self._generator = torch.Generator(device="cpu").manual_seed(int(seed))

    # parameters ----------------------------------------------------------------
    def _validate(self) -> None:
        try:
            Grid(self.m, self.n, self.topology)
        except (TypeError, ValueError) as e:
            raise SOMError(f"invalid SOM grid: {e}") from e
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise SOMError(f"dim must be a positive integer, got {self.dim!r}")

        def choice(name, value, options):
            if value not in options:
                raise SOMError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")

        choice("topology", self.topology, TOPOLOGIES)
        choice("metric", self.metric, METRICS)
        choice("decay", self.decay, tuple(_train.DECAYS))
        choice("mode", self.mode, MODES)
        choice("init", self.init, INITS)
        for name in ("sigma", "alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not (v > 0 and math.isfinite(v)):
                raise SOMError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SOMError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise SOMError(f"seed must be an integer, got {self.seed!r}")
        resolve_device(self.device)

    def get_params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (scikit-learn style)."""
        return {k: getattr(self, k) for k in ("m", "n", "dim", "topology", "metric", "sigma", "alpha",
                                               "decay", "epochs", "batch_size", "mode", "init",
                                               "seed", "device")}

    def _hparams(self) -> dict:
        # What must match for a checkpoint to be resumed (device may differ).
        p = self.get_params()
        p.pop("device")
        return {k: (float(v) if k in ("sigma", "alpha") else
                    int(v) if isinstance(v, (int, np.integer)) else v) for k, v in p.items()}

    @property
    def grid(self) -> Grid:
        """The :class:`Grid` of the map."""
        return Grid(int(self.m), int(self.n), self.topology)

    @property
    def n_units(self) -> int:
        return int(self.m) * int(self.n)

    @property
    def _dev(self) -> torch.device:
        return resolve_device(self.device)

    def __repr__(self) -> str:
        state = "fitted" if self.weights is not None else "not fitted"
        return (f"SOM({self.m}x{self.n} {self.topology}, dim={self.dim}, metric={self.metric}, "
                f"mode={self.mode}, {state})")

    # initialisation --------------------------------------------------------------
    def _initial_weights(self, rows: _Rows) -> torch.Tensor:
        G, D, g = self.n_units, int(self.dim), self._generator
        if self.init == "normal":
            W = torch.randn(G, D, generator=g, dtype=torch.float32)
        elif self.init == "sample":
            if rows.n >= G:
                idx = torch.randperm(rows.n, generator=g)[:G]
            else:
                idx = torch.randint(rows.n, (G,), generator=g)
            W = rows.take(idx.numpy()).cpu()
        else:  # pca
            k = min(rows.n, 10000)
            idx = np.sort(torch.randperm(rows.n, generator=g)[:k].numpy())
            Xs = rows.take(idx).to(torch.float64).cpu()
            mean = Xs.mean(0)
            Xc = Xs - mean
            if k < 2:
                raise SOMError("init='pca' needs at least 2 samples; use init='normal' or 'sample'")
            _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
            sd = S / math.sqrt(max(k - 1, 1))
            pc1 = Vh[0] * sd[0]
            pc2 = Vh[1] * sd[1] if Vh.shape[0] > 1 else torch.zeros_like(pc1)
            a = torch.linspace(-1, 1, int(self.m), dtype=torch.float64)
            b = torch.linspace(-1, 1, int(self.n), dtype=torch.float64)
            W = (mean + a[:, None, None] * pc1 + b[None, :, None] * pc2).reshape(G, D).float()
        return W.to(self._dev)

    def _check_init_weights(self, w) -> torch.Tensor:
        w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w)
        G, D = self.n_units, int(self.dim)
        if tuple(w.shape) != (G, D):
            raise SOMError(f"init_weights must have shape ({G}, {D}) = (m·n units, dim), "
                           f"got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise SOMError("init_weights contain NaN or Inf; give finite initial weights")
        if self.metric == "cosine" and (w == 0).all(dim=1).any():
            raise SOMError("init_weights have an all-zero row: cosine distance is undefined for it")
        return w.detach().to(device=self._dev, dtype=torch.float32).clone()

    # training --------------------------------------------------------------------
    def fit(self, X, *, init_weights=None, order=None, shuffle=True, progress=False,
            checkpoint=None, checkpoint_every=0.0, resume=False, log_every=None, shard=None):
        """Train the map on ``X`` [N, dim].

        Parameters
        ----------
        X : numpy.ndarray, numpy.memmap or torch.Tensor [N, dim]
            Training data, read in chunks (a memmap is never loaded whole).
        init_weights : array-like [m·n, dim], optional
            Initial weights; overrides ``init``.
        order : array-like of int, [N] or [epochs, N], optional
            Explicit sample order (the same for every epoch if 1-D); overrides ``shuffle``.
            Used to reproduce another implementation's batches exactly. Online mode only: the
            batch map's result does not depend on the order of the samples.
        shuffle : bool
            Draw a new seeded permutation each epoch (online mode) when ``order`` is not given.
        progress : bool or callable
            Show a tqdm bar; a callable is called instead with the number of samples done
            since its last call (how a job drives one bar for many maps).
        checkpoint : path, optional
            Written (atomically, :meth:`save` format) at the end of an epoch (by rank 0 only
            when ``shard`` is given).
        checkpoint_every : float
            Seconds of training between two checkpoints: an epoch's end writes one only when at
            least this long has passed since the last (0: after every epoch). A fit shorter than
            this writes none, which is what makes many small maps fast; an interrupted fit
            loses at most this much work.
        resume : bool
            If ``checkpoint`` exists, continue from it instead of starting over; the result is
            the same as an uninterrupted fit.
        log_every : int, optional
            Mini-batches per row of ``curve_`` (default: about 50 rows per epoch).
        shard : (rank, world_size), optional
            Data-parallel fit in an initialised ``torch.distributed`` process group: every rank
            calls ``fit`` with the same data and hyperparameters; the rank reads only its part
            of every global mini-batch (online; a contiguous part of the data in batch mode),
            the batch sums ``Hᵀ X`` and ``Hᵀ 1`` are all-reduced and every rank applies the same
            update. The map equals the one-process map at the same global ``batch_size`` up to
            the order of float additions (tests: 1e-5).

        Returns
        -------
        SOM
            ``self``.
        """
        if not float(checkpoint_every) >= 0:
            raise SOMError(f"checkpoint_every={checkpoint_every!r}: give seconds ≥ 0 (0 = every epoch)")
        self._validate()
        shard = self._check_shard(shard)
        dev = self._dev
        rows = _Rows(X, int(self.dim), dev)
        _check_rows(rows, self.metric)
        N, E, B = rows.n, int(self.epochs), int(self.batch_size)
        orders = self._check_order(order, N, E)
        n_batches = -(-N // B)
        if log_every is None:
            log_every = max(1, n_batches // _CURVE_ROWS_PER_EPOCH)
        if isinstance(log_every, bool) or not isinstance(log_every, (int, np.integer)) or log_every < 1:
            raise SOMError(f"log_every must be a positive integer, got {log_every!r}")

        curve_rows: list[dict] = []
        epoch_rows: list[dict] = []
        start_epoch = 0
        resumed = False
        if resume and checkpoint is not None and Path(checkpoint).is_file():
            state = _load_state(checkpoint)
            self._check_resumable(state, N)
            W = state["weights"].to(dev, torch.float32)
            self._generator.set_state(state["rng_state"])
            start_epoch = int(state["epoch"])
            self.step_, self.samples_ = int(state["step"]), int(state["samples"])
            curve_rows = _rows_from_columns(state["curve"])
            epoch_rows = _rows_from_columns(state["epoch_loss"])
            resumed = True
        else:
            self._generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
            W = self._check_init_weights(init_weights) if init_weights is not None \
                else self._initial_weights(rows)
            self.step_ = self.samples_ = 0
        self.weights = W
        self.epoch_ = start_epoch
        self._n_fit = N
        sqd = self.grid.unit_sq_distances(device=dev, dtype=torch.float32)
        wsq = torch.empty(self.n_units, device=dev, dtype=torch.float32)

        bar = None
        if callable(progress):
            bar = _Callback(progress)
            if start_epoch:
                bar.update(N * start_epoch)  # epochs done before the checkpoint
        elif progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=N * E, initial=N * start_epoch, unit="sample",
                       desc=f"SOM {self.m}x{self.n}", leave=False)
        last_save = time.monotonic()
        try:
            for epoch in range(start_epoch, E):
                if self.mode == "online":
                    if orders is not None:
                        perm = orders[epoch % len(orders)]
                    elif shuffle:
                        perm = torch.randperm(N, generator=self._generator).numpy()
                    else:
                        perm = None
                    self._online_epoch(W, wsq, rows, perm, sqd, epoch, log_every, curve_rows,
                                       epoch_rows, bar, shard)
                else:
                    self._batch_epoch(W, wsq, rows, sqd, epoch, curve_rows, epoch_rows, bar, shard)
                self.epoch_ = epoch + 1
                if checkpoint is not None and (shard is None or shard[0] == 0) and \
                        time.monotonic() - last_save >= float(checkpoint_every):
                    self._set_curves(curve_rows, epoch_rows)  # the checkpoint holds the curves
                    self.save(checkpoint)
                    last_save = time.monotonic()
        finally:
            if bar is not None:
                bar.close()
        self._set_curves(curve_rows, epoch_rows)
        self.resumed_ = resumed
        return self

    def _check_order(self, order, N, E):
        if order is None:
            return None
        o = np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order)
        if o.ndim == 1:
            o = o[None, :]
        if o.ndim != 2 or o.shape[1] != N or not np.issubdtype(o.dtype, np.integer):
            raise SOMError(f"order must be integer row indices of shape [{N}] or [epochs, {N}], "
                           f"got shape {o.shape} and dtype {o.dtype}")
        if o.shape[0] not in (1, E):
            raise SOMError(f"order has {o.shape[0]} rows; give 1 (same order each epoch) or "
                           f"epochs={E}")
        if o.min() < 0 or o.max() >= N:
            raise SOMError(f"order has indices outside [0, {N})")
        return o.astype(np.int64)

    def _online_epoch(self, W, wsq, rows, perm, sqd, epoch, log_every, curve_rows, epoch_rows, bar,
                      shard=None):
        N, B, E = rows.n, int(self.batch_size), int(self.epochs)
        total = N * E
        n_batches = -(-N // B)
        losses = torch.zeros(n_batches, device=W.device, dtype=torch.float32)
        lrs = np.zeros(n_batches)
        t = epoch * N  # samples seen before this epoch; equals self.samples_ on a clean run
        step = 0
        # whole blocks of the online loop per chunk, so chunking cannot change the result
        chunk = rows.chunk_rows(_train.block_rows(B, rows.d) if shard is None else B)
        if shard is not None:
            from somprobe.distributed import all_reduce_

            _train._sq_norms(W, out=wsq)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            if shard is None:
                x = rows.take(slice(a, b) if perm is None else perm[a:b])
                t = _train.online_pass(W, wsq, x, sqd, batch_size=B, t0=t, total=total,
                                       alpha0=float(self.alpha), sigma0=float(self.sigma),
                                       decay=self.decay, metric=self.metric, step0=step,
                                       losses=losses, lrs=lrs)
            else:
                idx, counts, sizes = _batch_shards(a, b, B, *shard)
                x = rows.take(idx if perm is None else perm[idx])
                t = _train.online_pass_shared(W, wsq, x, counts, sizes, sqd, t0=t, total=total,
                                              alpha0=float(self.alpha), sigma0=float(self.sigma),
                                              decay=self.decay, metric=self.metric, step0=step,
                                              losses=losses, lrs=lrs, reduce=all_reduce_)
            step = -(-b // B)
            if bar is not None:
                bar.update(b - a)
        sizes = np.full(n_batches, B, dtype=np.int64)
        sizes[-1] = N - B * (n_batches - 1)
        loss_sum = losses.double().cpu().numpy()
        for w0 in range(0, n_batches, log_every):
            w1 = min(w0 + log_every, n_batches)
            curve_rows.append({
                "epoch": epoch + 1, "step": self.step_ + w1,
                "samples": epoch * N + int(sizes[:w1].sum()),
                "alpha": float(self.alpha) * lrs[w1 - 1], "sigma": float(self.sigma) * lrs[w1 - 1],
                "loss": float(loss_sum[w0:w1].sum() / sizes[w0:w1].sum())})
        epoch_rows.append({"epoch": epoch + 1, "loss": float(loss_sum.sum() / N)})
        self.step_ += n_batches
        self.samples_ = t

    def _batch_epoch(self, W, wsq, rows, sqd, epoch, curve_rows, epoch_rows, bar, shard=None):
        E = int(self.epochs)
        s = _train.decay_factor(self.decay, epoch, E)
        sigma = float(self.sigma) * s
        _train._sq_norms(W, out=wsq)
        num = torch.zeros_like(W)
        den = torch.zeros(self.n_units, device=W.device, dtype=torch.float32)
        loss = 0.0
        mine = range(rows.n) if shard is None else _shard_range(rows.n, *shard)
        step = rows.chunk_rows()
        for a in range(mine.start, mine.stop, step):
            b = min(a + step, mine.stop)
            x = rows.take(slice(a, b))
            loss += float(_train.batch_accumulate(W, wsq, x, sqd, sigma, self.metric, num, den).double().sum())
            if bar is not None:
                bar.update(b - a)
        if shard is not None:
            # one message: the numerator, the denominator and the loss of this rank's rows
            from somprobe.distributed import all_reduce_

            G, D = W.shape
            buf = torch.cat([num.reshape(-1), den, torch.tensor([loss], device=W.device,
                                                                  dtype=torch.float32)])
            all_reduce_(buf)
            num, den, loss = buf[:G * D].view(G, D), buf[G * D:G * D + G], float(buf[-1])
            if bar is not None:
                bar.update(rows.n - len(mine))  # the other ranks' rows: the bar counts the epoch
        # A unit no sample reaches (its neighbourhood weight underflowed to 0) keeps its weights.
        ok = den > 0
        W[ok] = num[ok] / den[ok, None]
        N = rows.n
        self.step_ += 1
        self.samples_ += N
        curve_rows.append({"epoch": epoch + 1, "step": self.step_, "samples": self.samples_,
                           "alpha": float("nan"), "sigma": sigma, "loss": loss / N})
        epoch_rows.append({"epoch": epoch + 1, "loss": loss / N})

    @staticmethod
    def _check_shard(shard):
        if shard is None:
            return None
        try:
            rank, world = (int(v) for v in shard)
        except (TypeError, ValueError):
            raise SOMError(f"shard must be (rank, world_size), got {shard!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise SOMError(f"shard: rank {rank} is not in a world of {world}")
        if world == 1:
            return None
        from somprobe.distributed import is_distributed

        if not is_distributed():
            raise SOMError(f"shard={shard!r} needs an initialised process group of {world} ranks "
                           "(run under torchrun; somprobe.distributed.init)")
        return rank, world

    def _set_curves(self, curve_rows, epoch_rows):
        self.curve_ = pd.DataFrame(curve_rows, columns=CURVE_COLUMNS)
        self.epoch_loss_ = pd.DataFrame(epoch_rows, columns=["epoch", "loss"])

    def _check_resumable(self, state, N):
        mine = self._hparams()
        theirs = state.get("hparams", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise SOMError(
                "cannot resume: the checkpoint was written with other hyperparameters ("
                + ", ".join(f"{k}: {theirs.get(k)!r} vs {mine.get(k)!r}" for k in diff)
                + "); fit without resume or delete the checkpoint")
        if int(state.get("n_samples", -1)) != N:
            raise SOMError(f"cannot resume: the checkpoint was fitted on {state.get('n_samples')} "
                           f"samples, this data has {N}; fit without resume")

    # mapping ---------------------------------------------------------------------
    def _need_fit(self):
        if self.weights is None:
            raise SOMError("the SOM has no weights yet: call fit() or SOM.load() first")

    def bmus(self, X, k=10, *, batch_size=None, check=True):
        """The ``k`` best-matching units of every row, nearest first.

        Parameters
        ----------
        X : array-like or torch.Tensor [N, dim]
        k : int
            Number of units per row (1 ≤ k ≤ m·n).
        batch_size : int, optional
            Rows per batch (default: bounded so the [rows, G] scores stay below 64 MiB).
        check : bool
            Check for NaN/Inf (and zero rows under cosine) first.

        Returns
        -------
        idx : numpy.ndarray int64 [N, k]
            Unit indices (row-major; ``grid.index_to_rc`` gives positions).
        dist : numpy.ndarray float32 [N, k]
            Their distances in the map's metric (ascending).
        """
        self._need_fit()
        G = self.n_units
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > G:
            raise SOMError(f"k={k!r} must be an integer between 1 and the number of units "
                           f"({G} for a {self.m}x{self.n} grid); ask for fewer BMUs")
        W = self.weights
        dev = W.device
        rows = _Rows(X, int(self.dim), dev)
        if check:
            _check_rows(rows, self.metric)
        if batch_size is None:
            batch_size = max(1, min(rows.chunk_rows(), _SCORE_BYTES // (4 * G)))
        wsq = (W * W).sum(1)
        Wn = W * torch.rsqrt(wsq)[:, None] if self.metric == "cosine" else None
        idx = np.empty((rows.n, k), dtype=np.int64)
        dist = np.empty((rows.n, k), dtype=np.float32)
        for a, b in rows.ranges(int(batch_size)):
            x = rows.take(slice(a, b))
            if self.metric == "cosine":
                xn = x * torch.rsqrt((x * x).sum(1, keepdim=True))
                sim, j = torch.topk(xn @ Wn.t(), k, dim=1, largest=True, sorted=True)
                d = 1.0 - sim
            else:
                d2 = (x * x).sum(1, keepdim=True) - 2.0 * (x @ W.t()) + wsq
                d2, j = torch.topk(d2, k, dim=1, largest=False, sorted=True)
                d = torch.sqrt(torch.clamp(d2, min=0.0))
            idx[a:b] = j.cpu().numpy()
            dist[a:b] = d.cpu().numpy()
        return idx, dist

    def quantization_error(self, X) -> float:
        """Mean distance (in the map's metric) of each row to its BMU."""
        _, d = self.bmus(X, k=1)
        return float(d.astype(np.float64).mean())

    def topographic_error(self, X, connectivity: int = 8) -> float:
        """Fraction of rows whose two best units are not grid neighbours.

        Parameters
        ----------
        connectivity : {8, 4}
            8 (default): the Moore neighbourhood, diagonals count as adjacent — the usual choice
            on a square grid, where a diagonal neighbour is at distance √2 < 2. 4: only the
            up/down/left/right units (von Neumann), a stricter error. Neighbours wrap around a
            torus (``Grid.neighbors``).
        """
        idx, _ = self.bmus(X, k=2)
        nb = self.grid.neighbors(connectivity)
        adjacent = (nb[idx[:, 0]] == idx[:, 1:2]).any(axis=1)
        return float(1.0 - adjacent.mean())

    def umatrix(self, connectivity: int = 8) -> np.ndarray:
        """``[m, n]`` mean distance (in the map's metric) of each unit's weights to its neighbours'.

        Neighbours wrap around a torus; on a planar grid border units average the ones they have.
        """
        self._need_fit()
        W = self.weights
        nb = self.grid.neighbors(connectivity)
        total = torch.zeros(self.n_units, dtype=torch.float64, device=W.device)
        count = torch.zeros(self.n_units, dtype=torch.float64, device=W.device)
        for j in range(nb.shape[1]):
            ok = torch.as_tensor(nb[:, j] >= 0, device=W.device)
            V = W[torch.as_tensor(np.where(nb[:, j] >= 0, nb[:, j], 0), device=W.device)]
            d = _pair_distance(W, V, self.metric).double()
            total += torch.where(ok, d, torch.zeros_like(d))
            count += ok.double()
        return (total / count).cpu().numpy().reshape(int(self.m), int(self.n))

    # persistence -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors, numbers, strings, lists and dicts (loadable with ``weights_only=True``)."""
        self._need_fit()
        return {
            "format": FORMAT, "version": FORMAT_VERSION,
            "weights": self.weights.detach().to("cpu", torch.float32).contiguous().clone(),
            "m": int(self.m), "n": int(self.n), "topology": self.topology, "metric": self.metric,
            "dim": int(self.dim), "hparams": self._hparams(),
            "step": int(self.step_), "samples": int(self.samples_), "epoch": int(self.epoch_),
            "n_samples": int(getattr(self, "_n_fit", 0)),
            "rng_state": self._generator.get_state(),
            "curve": {c: [float(v) for v in self.curve_[c]] for c in CURVE_COLUMNS},
            "epoch_loss": {c: [float(v) for v in self.epoch_loss_[c]] for c in ("epoch", "loss")}
            if hasattr(self, "epoch_loss_") else {"epoch": [], "loss": []},
        }

    def save(self, path, *, meta: dict | None = None) -> Path:
        """Write the map to ``path`` (torch file) and a readable JSON sidecar (``.json``).

        Both are written atomically. Weights are stored on CPU as float32; nothing pickled but
        plain containers, so ``torch.load(path, weights_only=True)`` reads it.

        Parameters
        ----------
        meta : dict, optional
            Extra JSON-serialisable facts for the sidecar (layer, split, data file, …).

        Returns
        -------
        Path
            The sidecar's path.
        """
        path = Path(path)
        state = self.state_dict()
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
        side = path.with_suffix(".json")
        info = {k: v for k, v in state.items() if k not in ("weights", "rng_state", "curve", "epoch_loss")}
        info["weights_file"] = path.name
        info["n_units"] = self.n_units
        info["epoch_loss"] = state["epoch_loss"]["loss"]
        info["complete"] = int(self.epoch_) >= int(self.epochs)
        if meta:
            info["meta"] = meta
        atomic_write_json(side, info)
        return side

    @classmethod
    def load(cls, path, device="cpu") -> "SOM":
        """Read a map written by :meth:`save` (``torch.load(weights_only=True)``)."""
        state = _load_state(path)
        hp = dict(state["hparams"])
        som = cls(hp.pop("m"), hp.pop("n"), hp.pop("dim"), device=device, **hp)
        som.weights = state["weights"].to(som._dev, torch.float32)
        som.step_, som.samples_, som.epoch_ = int(state["step"]), int(state["samples"]), int(state["epoch"])
        som._n_fit = int(state["n_samples"])
        som._generator.set_state(state["rng_state"])
        som._set_curves(_rows_from_columns(state["curve"]), _rows_from_columns(state["epoch_loss"]))
        return som


class _Callback:
    """A progress callable dressed as a tqdm bar (``update``, ``close``)."""

    def __init__(self, fn):
        self.update = fn

    def close(self):
        pass


def _shard_range(n: int, rank: int, world: int) -> range:
    base, extra = divmod(int(n), world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _batch_shards(a: int, b: int, batch_size: int, rank: int, world: int):
    """This rank's positions of the global batches in ``[a, b)`` (``a`` batch-aligned).

    Each global batch is split like :func:`somprobe.distributed.shard_range`. Returns the
    positions (int64, batch by batch), how many fall in each batch and each batch's size.
    """
    starts = np.arange(a, b, batch_size, dtype=np.int64)
    sizes = np.minimum(starts + batch_size, b) - starts
    base, extra = np.divmod(sizes, world)
    counts = base + (rank < extra)
    offs = starts + rank * base + np.minimum(rank, extra)
    idx = np.repeat(offs - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    return idx, counts, sizes


def _pair_distance(A: torch.Tensor, B: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise distance between ``A[i]`` and ``B[i]``."""
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(A, B, dim=1, eps=1e-30)
    return torch.linalg.vector_norm(A - B, dim=1)


def _rows_from_columns(cols: dict) -> list[dict]:
    keys = list(cols)
    n = len(cols[keys[0]]) if keys else 0
    out = []
    for i in range(n):
        r = {k: cols[k][i] for k in keys}
        for k in ("epoch", "step", "samples"):
            if k in r:
                r[k] = int(r[k])
        out.append(r)
    return out


def _load_state(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SOMError(f"no SOM file at {path}: run `somprobe fit` first (or check the path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise SOMError(f"cannot read SOM file {path} ({e}); re-run `somprobe fit`") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SOMError(f"{path} is not a somprobe SOM file; re-run `somprobe fit`")
    if int(state.get("version", 0)) > FORMAT_VERSION:
        raise SOMError(f"{path} was written by a newer somprobe (format {state['version']}); upgrade")
    return state

"""Decoders from a layer's raw latent back to the image (study 001, Tables 2–4), pure model code.

A decoder is rebuilt from a small JSON-able ``arch`` dict (:func:`decoder_arch`), so a saved
decoder is plain tensors plus that dict and never needs unpickling. The shape of the latent
picks the front end:

* ``map`` — a conv feature map ``[C, H, W]`` with H, W ≥ 2: the conv stack starts at H×W.
* ``tokens`` — a token sequence ``[T, D]`` whose last ``T - prefix`` tokens form a square g×g
  patch grid (a ViT split at ``CLS<k>``): patch tokens become a ``[D, g, g]`` map, the mean of the
  prefix tokens (CLS, distillation) is broadcast over the grid and concatenated ``[2D, g, g]``.
* ``vector`` — a flat vector ``[D]``, a 1×1 map or tokens that form no grid: a linear map to
  ``width × 4 × 4`` and a reshape, as the study's Table 2 starts (``Reshape(128, 4, 4)``).

The conv stack follows Table 2 scaled down for CPUs: per resolution ``blocks`` × [3×3 transposed
conv (padding 1), LeakyReLU(0.3), BatchNorm], then ×2 nearest upsampling (``UpSampling2D``)
until the input side is reached (a last bilinear resize when the side is not the latent's side
times a power of two), a 3×3 conv to 3 channels and a sigmoid. Widths halve at each upsampling
from ``width`` down to ``min_width``.

The bar a trained decoder must pass: its validation MSE beats a least-squares linear decoder fitted
on the same latents (:func:`fit_linear_decoder`). So that it cannot lose to that bar by
construction, a decoder built with ``linear=True`` (the default) is **linear + gated conv**:
``x̂ = clip(L(z) + g ⊙ (D(z) − L(z)), 0, 1)`` where ``L(z) = W·r(z) + b`` is the closed-form
ridge least-squares map (:class:`RidgeStats`, :func:`fit_ridge`; fitted before training, kept as
frozen buffers), ``D`` the conv decoder above, trained with its own MSE loss (Adam, as in the
study), and ``g ∈ [0, 1]`` a per-pixel gate, zero at first (the decoder starts exactly at the
linear solution) and refitted in closed form after each epoch (:func:`fit_gate`): ``g = 0`` is
always allowed, so the blend's error on the latents it is fitted on is never above the linear
map's. With ``logit_residual`` (default) ``D(z) = sigmoid(R(z) + logit(clip(L(z), ε, 1 − ε)))``,
``ε = 0.01``, with ``R``'s last conv zero-initialised: the conv stack learns a correction of
the linear reconstruction in logit space instead of starting from a flat 0.5 image (a plain
sigmoid stack sat on that plateau for the first epochs at CL3; an additive residual without
the sigmoid learned far worse in our tests). ``r`` is the
identity when the flattened latent has at most ``max_linear_dim`` (4096) numbers; larger latents
are first reduced by a fixed linear map (:func:`linear_basis`: 2×2 average pooling of a conv map
until it fits, else average pooling of the flat vector), so the linear part is then a restricted
least-squares map (a D×D normal-equation solve for D = 16384 does not fit a CPU budget).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DecoderError

__all__ = [
    "Decoder", "decoder_arch", "build_decoder", "decode", "latent_kind", "fit_linear_decoder",
    "LinearDecoder", "psnr", "decoder_defaults", "STUDY_DEFAULTS", "train_epoch",
    "linear_basis", "reduce_latent", "RidgeStats", "fit_ridge", "fit_gate", "RIDGE_GRID",
    "MAX_LINEAR_DIM",
]

#: Study 001 Table 4: first hidden layer (spatial latents) vs last layer (vector latents).
STUDY_DEFAULTS = {
    "spatial": {"batch_size": 32, "epochs": 10, "lr": 1e-3},
    "vector": {"batch_size": 128, "epochs": 5, "lr": 1e-3},
}
_START_SIDE = 4  # Table 2 reshapes the flat input to 128×4×4
_LOGIT_EPS = 0.01
#: Largest flattened latent the linear part sees unreduced (a 4096² float64 Gram is 128 MiB).
MAX_LINEAR_DIM = 4096
#: Relative ridge values tried on the held-out slice (λ = value · mean eigenvalue of the Gram).
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def latent_kind(shape: Sequence[int], prefix_tokens: int = 0) -> str:
    """``"map"``, ``"tokens"`` or ``"vector"`` for a latent of per-sample ``shape`` (no batch)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[1] >= 2 and shape[2] >= 2:
        return "map"
    if len(shape) == 2:
        n = shape[0] - int(prefix_tokens)
        g = math.isqrt(max(n, 0))
        if n > 0 and g * g == n and g >= 2:
            return "tokens"
    return "vector"


def decoder_defaults(kind: str) -> dict:
    """Batch size, epochs and learning rate of study 001 Table 4 for a latent kind.

    Spatial latents (``map``, ``tokens``) get the first-hidden-layer setting (batch 32,
    10 epochs), flat ones (``vector``: 1×1 maps, CLS-only tokens) the last-layer setting
    (batch 128, 5 epochs); Adam at 1e-3 for both.
    """
    return dict(STUDY_DEFAULTS["vector" if kind == "vector" else "spatial"])


def linear_basis(latent_shape: Sequence[int], *, max_dim: int = MAX_LINEAR_DIM) -> dict:
    """The fixed reduction the linear part applies to a latent before its least-squares map.

    ``{"basis": "full", "dim": D}`` when the flattened latent has ``D <= max_dim`` numbers;
    ``{"basis": "avgpool2d", "factor": f, "dim": ...}`` for a conv map ``[C, H, W]`` whose
    ``f×f``-average-pooled version (f a power of two, H and W divisible by f) fits; else
    ``{"basis": "avgpool1d", "dim": max_dim}`` (adaptive average pooling of the flat vector).
    """
    shape = [int(s) for s in latent_shape]
    d = math.prod(shape)
    if d <= max_dim:
        return {"basis": "full", "dim": d}
    if len(shape) == 3:
        c, h, w = shape
        f = 2
        while h % f == 0 and w % f == 0:
            if c * (h // f) * (w // f) <= max_dim:
                return {"basis": "avgpool2d", "factor": f, "dim": c * (h // f) * (w // f)}
            f *= 2
    return {"basis": "avgpool1d", "dim": int(max_dim)}


def reduce_latent(z: torch.Tensor, basis: dict) -> torch.Tensor:
    """``z [B, *latent_shape]`` → ``[B, dim]``: the input of the linear part (see :func:`linear_basis`)."""
    kind = basis["basis"]
    if kind == "avgpool2d":
        z = F.avg_pool2d(z, int(basis["factor"]))
    elif kind == "avgpool1d":
        return F.adaptive_avg_pool1d(z.flatten(1)[:, None], int(basis["dim"]))[:, 0]
    return z.flatten(1)


def decoder_arch(latent_shape: Sequence[int], image_size: int, *, prefix_tokens: int = 0,
                 width: int = 64, min_width: int = 16, blocks: int = 2, channels: int = 3,
                 linear: bool = True, max_linear_dim: int = MAX_LINEAR_DIM,
                 logit_residual: bool = True) -> dict:
    """The JSON-able description a :class:`Decoder` is built from.

    Parameters
    ----------
    latent_shape : sequence of int
        Per-sample shape of the latent (``[C, H, W]``, ``[T, D]`` or ``[D]``).
    image_size : int
        Side of the square output image.
    prefix_tokens : int
        Leading non-patch tokens of a token latent (1 for a ViT's CLS, 2 with distillation).
    width, min_width : int
        Channels at the lowest resolution; halved at every upsampling, never below ``min_width``.
    blocks : int
        [ConvTranspose 3×3, LeakyReLU(0.3), BatchNorm] blocks per resolution (study: 3).
    channels : int
        Output channels (3).
    linear : bool
        Linear + gated conv decoder (a least-squares linear part blended per pixel with the conv
        stack, output clipped to [0, 1]); ``False``: the conv stack alone with a sigmoid.
    max_linear_dim : int
        Latents with more numbers are reduced before the linear part (:func:`linear_basis`).
    logit_residual : bool
        The conv decoder corrects the linear reconstruction in logit space (starts at it).

    Returns
    -------
    dict
        ``kind, latent_shape, image_size, prefix_tokens, start_side, widths, blocks, channels`` and
        ``linear`` (the :func:`linear_basis` dict plus ``logit_residual``, or ``None``).
    """
    shape = [int(s) for s in latent_shape]
    if not shape or any(s < 1 for s in shape):
        raise DecoderError(f"latent shape {shape} is empty: pass the per-sample shape, e.g. [64, 8, 8]")
    if image_size < 2 or width < 1 or min_width < 1 or blocks < 0:
        raise DecoderError(f"image_size ({image_size}), width ({width}), min_width ({min_width}) must "
                           f"be positive and blocks ({blocks}) >= 0")
    kind = latent_kind(shape, prefix_tokens)
    if kind == "map":
        side = min(shape[1], shape[2])
    elif kind == "tokens":
        side = math.isqrt(shape[0] - prefix_tokens)
    else:
        side = _START_SIDE
    side = min(side, int(image_size))
    n_up = max(0, math.ceil(math.log2(image_size / side) - 1e-9))
    widths = [max(int(min_width), int(width) >> i) for i in range(n_up + 1)]
    return {"kind": kind, "latent_shape": shape, "image_size": int(image_size),
            "prefix_tokens": int(prefix_tokens) if kind == "tokens" else 0, "start_side": int(side),
            "widths": widths, "blocks": int(blocks), "channels": int(channels),
            "linear": ({**linear_basis(shape, max_dim=max_linear_dim), "logit_residual": bool(logit_residual)}
                       if linear else None)}


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.3), nn.BatchNorm2d(c_out)]


class Decoder(nn.Module):
    """Latent ``[B, *latent_shape]`` → image ``[B, channels, S, S]`` in [0, 1].

    The conv decoder ``D`` (:meth:`conv`) is the stack above ending in a sigmoid (with
    ``arch["linear"]["logit_residual"]``: of the stack's output plus the logit of the clipped
    linear reconstruction, the last conv zero-initialised). With
    ``arch["linear"]`` the output is ``clip(L + g ⊙ (D − L), 0, 1)`` with ``L = W·r(z) + b``:
    ``W [dim, P]``, ``b [P]`` and the gate ``g [C, S, S]`` are buffers (``lin_weight``,
    ``lin_bias``, ``gate``; zero until :meth:`set_linear` / :func:`fit_gate`). Without it
    (decoder files of format version 1) the output is ``D``.

    Parameters
    ----------
    arch : dict
        From :func:`decoder_arch` (kept as ``.arch`` and saved with the weights).
    """

    def __init__(self, arch: dict):
        super().__init__()
        self.arch = dict(arch)
        kind, shape, widths = arch["kind"], list(arch["latent_shape"]), list(arch["widths"])
        side = int(arch["start_side"])
        if kind == "map":
            c_in = shape[0]
            self.front = nn.Identity()
        elif kind == "tokens":
            c_in = 2 * shape[1] if arch["prefix_tokens"] > 0 else shape[1]
            self.front = nn.Identity()
        else:
            c_in = widths[0]
            self.front = nn.Linear(math.prod(shape), widths[0] * side * side)
        layers: list[nn.Module] = []
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            for _ in range(int(arch["blocks"])):
                layers += _block(c_in, w)
                c_in = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c_in, int(arch["channels"]), 3, padding=1)
        self.linear = arch.get("linear")
        if self.linear:
            size = int(arch["image_size"])
            n_pix = int(arch["channels"]) * size * size
            self.register_buffer("lin_weight", torch.zeros(int(self.linear["dim"]), n_pix))
            self.register_buffer("lin_bias", torch.zeros(n_pix))
            # zero gate: a fresh decoder is exactly its linear part
            self.register_buffer("gate", torch.zeros(int(arch["channels"]), size, size))
            if self.linear.get("logit_residual"):
                # the conv decoder starts at the linear reconstruction (clipped to [eps, 1-eps])
                # and learns a correction in logit space
                nn.init.zeros_(self.out.weight)
                nn.init.zeros_(self.out.bias)

    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> "Decoder":
        """Install the least-squares map ``x = r(z) @ weight + bias`` (``weight [dim, P]``)."""
        if not self.linear:
            raise DecoderError("this decoder has no linear part (built with linear=False)")
        if tuple(weight.shape) != tuple(self.lin_weight.shape) or tuple(bias.shape) != tuple(self.lin_bias.shape):
            raise DecoderError(f"linear map of shape {list(weight.shape)} + {list(bias.shape)} does not fit "
                               f"{list(self.lin_weight.shape)} + {list(self.lin_bias.shape)}")
        self.lin_weight.copy_(weight.detach().to(self.lin_weight))
        self.lin_bias.copy_(bias.detach().to(self.lin_bias))
        return self

    def linear_part(self, z: torch.Tensor) -> torch.Tensor:
        """``W·r(z) + b`` as images (unclipped), the decoder's starting point."""
        size = int(self.arch["image_size"])
        flat = reduce_latent(z, self.linear).to(self.lin_weight.dtype) @ self.lin_weight + self.lin_bias
        return flat.view(z.shape[0], int(self.arch["channels"]), size, size)

    def _front(self, z: torch.Tensor) -> torch.Tensor:
        arch = self.arch
        if z.shape[1:] != torch.Size(arch["latent_shape"]):
            raise DecoderError(f"latent of shape {list(z.shape[1:])} given to a decoder trained on "
                               f"{arch['latent_shape']}: decode latents of the layer it was trained on "
                               "(same model and image size)")
        kind = arch["kind"]
        if kind == "map":
            s = arch["start_side"]
            return z if z.shape[-2:] == (s, s) else F.interpolate(z, size=(s, s), mode="bilinear",
                                                                   align_corners=False)
        if kind == "tokens":
            p, g = arch["prefix_tokens"], arch["start_side"]
            grid = z[:, p:].transpose(1, 2).reshape(z.shape[0], z.shape[2], g, g)
            if p == 0:
                return grid
            prefix = z[:, :p].mean(1)[:, :, None, None].expand(-1, -1, g, g)
            return torch.cat([grid, prefix], 1)
        s = arch["start_side"]
        return F.leaky_relu(self.front(z.flatten(1)), 0.3).view(z.shape[0], -1, s, s)

    def conv(self, z: torch.Tensor) -> torch.Tensor:
        """The conv decoder ``D(z)`` alone (sigmoid output in [0, 1]): what training fits."""
        h = self.body(self._front(z))
        size = int(self.arch["image_size"])
        if h.shape[-1] != size or h.shape[-2] != size:
            h = F.interpolate(h, size=(size, size), mode="bilinear", align_corners=False)
        out = self.out(h)
        if self.linear and self.linear.get("logit_residual"):
            eps = _LOGIT_EPS
            out = out + torch.logit(self.linear_part(z).clamp(eps, 1 - eps))
        return torch.sigmoid(out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = self.conv(z)
        if not self.linear:
            return d
        lin = self.linear_part(z)
        return (lin + self.gate * (d - lin)).clamp(0, 1)

    def extra_repr(self) -> str:
        a = self.arch
        return f"kind={a['kind']}, latent={a['latent_shape']}, image={a['image_size']}, widths={a['widths']}"


def build_decoder(latent_shape: Sequence[int], image_size: int, *, seed: int = 0, **arch_options) -> Decoder:
    """A freshly initialised :class:`Decoder` (seeded; torch's global RNG state is left alone).

    ``arch_options`` go to :func:`decoder_arch` (``prefix_tokens``, ``width``, ``min_width``,
    ``blocks``, ``linear``, ``max_linear_dim``). A linear decoder's linear part is zero until
    :meth:`Decoder.set_linear`.
    """
    arch = decoder_arch(latent_shape, image_size, **arch_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return Decoder(arch)


def train_epoch(decoder: Decoder, optimizer: torch.optim.Optimizer, batches, *, on_step=None) -> float:
    """One pass of MSE training of the conv decoder ``decoder.conv`` over ``batches``; returns the
    sample-weighted mean training MSE (of the conv decoder; the linear part and the gate are
    buffers, fitted in closed form).

    Parameters
    ----------
    decoder : Decoder
    optimizer : torch.optim.Optimizer
        Over ``decoder``'s parameters (study 001: Adam, lr 1e-3).
    batches : iterable of (Tensor, Tensor)
        ``(z [B, *latent_shape], x [B, 3, S, S])`` pairs on the decoder's device.
    on_step : callable, optional
        Called with each batch's loss (a float), e.g. to advance a progress bar.

    Raises
    ------
    DecoderError
        A non-finite loss (the step is not taken).
    """
    decoder.train()
    total, n = 0.0, 0
    for z, x in batches:
        loss = F.mse_loss(decoder.conv(z), x)
        if not torch.isfinite(loss):
            raise DecoderError(f"decoder training diverged (loss {loss.item()}); lower the learning "
                               "rate (--lr) and train again")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        n += len(x)
        if on_step is not None:
            on_step(loss.item())
    decoder.eval()
    return total / max(n, 1)


@torch.no_grad()
def decode(decoder: Decoder, z: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Images decoded from latents ``z [B, *latent_shape]`` (eval mode, in chunks, no grad).

    Returns float32 ``[B, 3, S, S]`` in [0, 1] on ``z``'s device.
    """
    was_training = decoder.training
    decoder.eval()
    p = next(decoder.parameters())
    try:
        outs = [decoder(z[s:s + batch_size].to(p.device, p.dtype)).to(z.device)
                for s in range(0, z.shape[0], batch_size)]
    finally:
        decoder.train(was_training)
    if not outs:
        size = int(decoder.arch["image_size"])
        return z.new_zeros((0, int(decoder.arch["channels"]), size, size))
    return torch.cat(outs)


class LinearDecoder(nn.Module):
    """``x = clip(W z + b, 0, 1)``: the least-squares baseline (see :func:`fit_linear_decoder`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, out_shape: Sequence[int]):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.out_shape = tuple(int(s) for s in out_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z.flatten(1).to(self.weight.dtype) @ self.weight + self.bias
        return x.clamp(0, 1).to(z.dtype).view(z.shape[0], *self.out_shape)


def fit_linear_decoder(z: torch.Tensor, x: torch.Tensor, *, ridge: float = 1e-4) -> LinearDecoder:
    """Least-squares linear map from latents to images, in closed form (float64).

    Ridge-regularised normal equations on centred data, in the primal form ``(ZᵀZ + λI)⁻¹ZᵀX``
    when the latent is shorter than the sample count and the dual form ``Zᵀ(ZZᵀ + λI)⁻¹X``
    otherwise, so the solve is ``min(N, D)``-sized. ``λ = ridge · mean(diag Gram)``.

    Parameters
    ----------
    z : Tensor [N, *latent_shape]
    x : Tensor [N, *image_shape]
    ridge : float
        Relative regularisation (keeps the solve finite when the Gram matrix is singular).

    Returns
    -------
    LinearDecoder
        Outputs clipped to [0, 1] (clipping only lowers its MSE: the bar stays fair).
    """
    if z.shape[0] != x.shape[0] or z.shape[0] < 2:
        raise DecoderError(f"need the same number (>= 2) of latents and images, got {z.shape[0]} and {x.shape[0]}")
    zf = z.flatten(1).double()
    xf = x.flatten(1).double()
    zm, xm = zf.mean(0), xf.mean(0)
    zc, xc = zf - zm, xf - xm
    n, d = zc.shape
    if d <= n:
        gram = zc.T @ zc
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device), zc.T @ xc)
    else:
        gram = zc @ zc.T
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        w = zc.T @ torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device), xc)
    b = xm - zm @ w
    return LinearDecoder(w, b, x.shape[1:])


class RidgeStats:
    """Running float64 sums for a least-squares fit from ``r [N, D]`` to ``x [N, P]``, chunk by chunk.

    Holds ``n``, ``Σr``, ``Σx``, ``Σ‖x‖²``, ``RᵀR [D, D]`` and ``RᵀX [D, P]``: the normal
    equations of any number of samples in ``O(D² + DP)`` memory.
    """

    def __init__(self, dim: int, n_out: int, *, device="cpu"):
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sum_r = torch.zeros(dim, **kw)
        self.sum_x = torch.zeros(n_out, **kw)
        self.sum_xx = torch.zeros((), **kw)
        self.rr = torch.zeros(dim, dim, **kw)
        self.rx = torch.zeros(dim, n_out, **kw)

    @torch.no_grad()
    def update(self, r: torch.Tensor, x: torch.Tensor) -> "RidgeStats":
        """Add a chunk: ``r [B, D]`` (reduced latents), ``x [B, ...]`` (images, flattened)."""
        r = r.flatten(1).to(self.rr.device, torch.float64)
        x = x.flatten(1).to(self.rr.device, torch.float64)
        if r.shape[0] != x.shape[0] or r.shape[1] != self.rr.shape[0] or x.shape[1] != self.rx.shape[1]:
            raise DecoderError(f"chunk of {list(r.shape)} latents and {list(x.shape)} images does not fit "
                               f"statistics of {self.rr.shape[0]} → {self.rx.shape[1]}")
        if not (torch.isfinite(r).all() and torch.isfinite(x).all()):
            raise DecoderError("non-finite latents or images in the least-squares fit; check the model "
                               "and the data (a NaN latent cannot be decoded)")
        self.n += r.shape[0]
        self.sum_r += r.sum(0)
        self.sum_x += x.sum(0)
        self.sum_xx += (x * x).sum()
        self.rr.addmm_(r.T, r)
        self.rx.addmm_(r.T, x)
        return self

    def centred(self, mu_r: torch.Tensor, mu_x: torch.Tensor):
        """``Σ(r−μr)(r−μr)ᵀ``, ``Σ(r−μr)(x−μx)ᵀ``, ``Σ‖x−μx‖²`` about given means."""
        n = self.n
        rr = self.rr - torch.outer(self.sum_r, mu_r) - torch.outer(mu_r, self.sum_r) + n * torch.outer(mu_r, mu_r)
        rx = self.rx - torch.outer(self.sum_r, mu_x) - torch.outer(mu_r, self.sum_x) + n * torch.outer(mu_r, mu_x)
        xx = self.sum_xx - 2 * (mu_x @ self.sum_x) + n * (mu_x @ mu_x)
        return rr, rx, xx


def fit_ridge(fit: RidgeStats, holdout: RidgeStats | None = None, *,
              grid: Sequence[float] = RIDGE_GRID) -> dict:
    """Closed-form ridge least squares ``x ≈ r W + b`` from accumulated statistics (float64).

    ``W = (Rcᵀ Rc + λ I)⁻¹ Rcᵀ Xc`` on data centred by the fit means, ``b = μx − μr W``,
    ``λ = ridge · mean eigenvalue of RcᵀRc``. With ``holdout`` statistics the relative ``ridge``
    is the value of ``grid`` with the least held-out squared error (all values scored in closed
    form from one eigendecomposition); without, the first value of ``grid``.

    Returns
    -------
    dict
        ``weight [D, P]``, ``bias [P]`` (float64), ``ridge`` (relative), ``lam`` (absolute),
        ``holdout_mse`` (per grid value, per number; ``None`` without a holdout).
    """
    if fit.n < 2:
        raise DecoderError(f"a least-squares fit needs at least 2 samples, got {fit.n}: train the "
                           "decoder on more images (--max-train)")
    mu_r, mu_x = fit.sum_r / fit.n, fit.sum_x / fit.n
    c, b_, _ = fit.centred(mu_r, mu_x)
    s, v = torch.linalg.eigh(c)
    s = s.clamp_min(0)
    scale = float(s.mean().clamp_min(1e-12))
    a = v.T @ b_                                             # [D, P]
    grid = [float(g) for g in grid]
    scores = None
    best = grid[0]
    if holdout is not None and holdout.n > 0 and len(grid) > 1:
        # SSE(W) = Σ‖x'‖² − 2 tr(Wᵀ H_rx) + tr(Wᵀ H_rr W) with W = V diag(d) A, d = 1/(s+λ):
        # both traces are d-weighted sums of quantities computed once.
        h_rr, h_rx, h_xx = holdout.centred(mu_r, mu_x)
        cross = (a * (v.T @ h_rx)).sum(1)                    # [D]
        quad = (v.T @ h_rr @ v) * (a @ a.T)                  # [D, D]
        n_out = b_.shape[1]
        scores = []
        for g in grid:
            d = 1.0 / (s + g * scale)
            sse = h_xx - 2 * (d @ cross) + d @ quad @ d
            scores.append(float(sse) / (holdout.n * n_out))
        best = grid[min(range(len(grid)), key=lambda i: scores[i])]
    lam = best * scale
    weight = v @ (a / (s + lam)[:, None])
    bias = mu_x - mu_r @ weight
    return {"weight": weight, "bias": bias, "ridge": best, "lam": lam, "holdout_mse": scores}


@torch.no_grad()
def fit_gate(decoder: Decoder, chunks, *, set_gate: bool = True) -> torch.Tensor:
    """Per-pixel gate ``g = clip(Σ(x−L)(D−L) / Σ(D−L)², 0, 1)`` over ``(z, x)`` chunks.

    For each pixel this is the least-squares blend of the linear part ``L`` and the conv decoder
    ``D`` on those samples, constrained to [0, 1]; since ``g = 0`` (the linear part alone) is
    allowed, the blend's squared error on them (before the final clip) is never above the
    linear part's. Sets ``decoder.gate`` unless ``set_gate=False``; returns the gate.
    """
    if not decoder.linear:
        raise DecoderError("this decoder has no linear part to gate (built with linear=False)")
    was_training = decoder.training
    decoder.eval()
    num = torch.zeros_like(decoder.gate, dtype=torch.float64)
    den = torch.zeros_like(num)
    try:
        for z, x in chunks:
            lin = decoder.linear_part(z)
            diff = (decoder.conv(z) - lin).double()
            num += (diff * (x.to(diff) - lin.double())).sum(0)
            den += (diff * diff).sum(0)
    finally:
        decoder.train(was_training)
    gate = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)).clamp(0, 1)
    if set_gate:
        decoder.gate.copy_(gate.to(decoder.gate))
    return gate.to(decoder.gate.dtype)


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, ``peak``] with mean squared error ``mse``."""
    return float("inf") if mse <= 0 else float(10 * math.log10(peak * peak / mse))

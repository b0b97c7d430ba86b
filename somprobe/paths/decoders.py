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
on the same latents (:func:`fit_linear_decoder`).
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
]

#: Study 001 Table 4: first hidden layer (spatial latents) vs last layer (vector latents).
STUDY_DEFAULTS = {
    "spatial": {"batch_size": 32, "epochs": 10, "lr": 1e-3},
    "vector": {"batch_size": 128, "epochs": 5, "lr": 1e-3},
}
_START_SIDE = 4  # Table 2 reshapes the flat input to 128×4×4


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


def decoder_arch(latent_shape: Sequence[int], image_size: int, *, prefix_tokens: int = 0,
                 width: int = 64, min_width: int = 16, blocks: int = 2, channels: int = 3) -> dict:
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

    Returns
    -------
    dict
        ``kind, latent_shape, image_size, prefix_tokens, start_side, widths, blocks, channels``.
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
            "widths": widths, "blocks": int(blocks), "channels": int(channels)}


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.3), nn.BatchNorm2d(c_out)]


class Decoder(nn.Module):
    """Latent ``[B, *latent_shape]`` → image ``[B, channels, S, S]`` in [0, 1].

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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self._front(z))
        size = int(self.arch["image_size"])
        if h.shape[-1] != size or h.shape[-2] != size:
            h = F.interpolate(h, size=(size, size), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(h))

    def extra_repr(self) -> str:
        a = self.arch
        return f"kind={a['kind']}, latent={a['latent_shape']}, image={a['image_size']}, widths={a['widths']}"


def build_decoder(latent_shape: Sequence[int], image_size: int, *, seed: int = 0, **arch_options) -> Decoder:
    """A freshly initialised :class:`Decoder` (seeded; torch's global RNG state is left alone).

    ``arch_options`` go to :func:`decoder_arch` (``prefix_tokens``, ``width``, ``min_width``,
    ``blocks``).
    """
    arch = decoder_arch(latent_shape, image_size, **arch_options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return Decoder(arch)


def train_epoch(decoder: Decoder, optimizer: torch.optim.Optimizer, batches, *, on_step=None) -> float:
    """One pass of MSE training over ``batches``; returns the sample-weighted mean training MSE.

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
        loss = F.mse_loss(decoder(z), x)
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


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, ``peak``] with mean squared error ``mse``."""
    return float("inf") if mse <= 0 else float(10 * math.log10(peak * peak / mse))

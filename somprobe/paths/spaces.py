"""Spaces a path can live in: pixels, or the latent of a probed layer.

A :class:`Space` bundles the map from images to points of the space (``encode``), the map from
points to logits (``logits``) and the box the points must stay in (``clip``). Every path method
works on any space the same way, so the pixel space and the latent of ``CL3`` differ only in the
space object passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ModelError

__all__ = ["Space", "make_space", "encode_images", "INPUT"]

#: Name of the pixel space.
INPUT = "input"


@dataclass(frozen=True)
class Space:
    """A representation space with its map to logits.

    Attributes
    ----------
    name : str
        ``"input"``, ``"CL1"``..``"CL4"``, ``"CLS3"``, ``"module:layer2.0"`` ...
    encode : callable
        Images ``[B, 3, S, S]`` in [0, 1] → points ``[B, *shape]`` (identity for ``input``, the
        head of :func:`somprobe.models.split_model` otherwise).
    logits : callable
        Points ``[M, *shape]`` → logits ``[M, C]`` (the normalising model for ``input``, the
        split's tail otherwise).
    clip : tuple of float or None
        ``(0., 1.)`` for pixels; ``None`` for latents (unbounded).
    affine : bool
        ``logits`` is an affine map (:func:`somprobe.models.affine_tail`: a ResNet's ``CL4``
        tail, average pooling + linear layer). Dense checks along segments then interpolate the
        logits of the segments' ends instead of running every point through ``logits``: the
        same values up to float rounding, at the cost of the ends alone.
    """

    name: str
    encode: Callable[[Tensor], Tensor]
    logits: Callable[[Tensor], Tensor]
    clip: tuple[float, float] | None = None
    affine: bool = False

    def project(self, x: Tensor) -> Tensor:
        """Points moved into the space's box (a no-op for latents)."""
        return x if self.clip is None else x.clamp(*self.clip)


def _identity(x: Tensor) -> Tensor:
    return x


def make_space(model: nn.Module, name: str) -> Space:
    """The space ``name`` of ``model``.

    Parameters
    ----------
    model : nn.Module
        A :class:`~somprobe.models.NormalizedModel` (pixels in [0, 1]); put it in eval mode
        first (batch norm must not update statistics while paths are evaluated).
    name : str
        ``"input"`` for pixels, or a layer :func:`somprobe.models.split_model` can split at.

    Returns
    -------
    Space

    Raises
    ------
    ModelError
        The model cannot be split at ``name``; the message says what is supported.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError("empty space name: use 'input' or a layer such as CL1")
    name = name.strip()
    if name.lower() == INPUT:
        return Space(INPUT, _identity, model, (0.0, 1.0))
    from ..models import affine_tail, split_model

    try:
        head, tail = split_model(model, name)
    except ModelError as e:
        raise ModelError(f"space {name!r}: {e}") from e
    canonical = name.upper() if not name.startswith("module:") else name
    return Space(canonical, head, tail, None, affine=affine_tail(tail))


@torch.no_grad()
def encode_images(space: Space, images: Tensor, *, chunk: int = 256) -> Tensor:
    """``space.encode`` in chunks of ``chunk`` images, without autograd."""
    return torch.cat([space.encode(images[i:i + chunk]) for i in range(0, len(images), chunk)])

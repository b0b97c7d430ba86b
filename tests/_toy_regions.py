"""Toy classifiers on R² whose regions are known in closed form (barrier and region-path tests)."""
from __future__ import annotations

import torch
from torch import nn

from somprobe.paths.spaces import Space


def _two(s: torch.Tensor) -> torch.Tensor:
    # logit difference s between class 0 and class 1
    return torch.stack([s / 2, -s / 2], 1)


class Bump(nn.Module):
    """Class 0 everywhere except Gaussian bumps of class 1 centred at ``centres``."""

    def __init__(self, centres=((0.0, -0.3),), height=8.0, base=5.0, width=0.5):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres))
        self.height, self.base, self.width = height, base, width

    def forward(self, x):
        r2 = (x[:, None, :] - self.centres[None]).pow(2).sum(2)
        return _two(self.base - self.height * torch.exp(-r2 / self.width).sum(1))


class Ring(nn.Module):
    """Class 0 on the annulus 1 < |x| < 2, class 1 elsewhere."""

    def forward(self, x):
        r = x.pow(2).sum(1).add(1e-12).sqrt()
        return _two(4 * torch.minimum(r - 1, 2 - r))


class HalfSpace(nn.Module):
    """Class 0 where w·x > c, class 1 elsewhere (a convex region)."""

    def __init__(self, w=(1.0, 0.5), c=0.0, scale=3.0):
        super().__init__()
        self.register_buffer("w", torch.tensor(w))
        self.c, self.scale = c, scale

    def forward(self, x):
        return _two(self.scale * (x @ self.w - self.c))


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        poison = (x[:, :1] > 10).expand_as(g)
        return torch.where(poison, torch.full_like(g, float("nan")), g)


class NanGradBump(Bump):
    """Bumps whose gradient is NaN where x₀ > 10 (the loss itself stays finite)."""

    def forward(self, x):
        return super().forward(_NanGrad.apply(x))


class NanRegion(nn.Module):
    """Class 0 everywhere, logits NaN on the unit disc around (0, 5)."""

    def forward(self, x):
        out = _two(torch.full_like(x[:, 0], 4.0))
        inside = (x - torch.tensor([0.0, 5.0])).pow(2).sum(1, keepdim=True) < 1
        return torch.where(inside, torch.full_like(out, float("nan")), out)


class FlatGap(nn.Module):
    """Class 0 where |x₀| > 1; in between, class 1 with a flat logit (no gradient to follow)."""

    def forward(self, x):
        return _two(torch.relu(x[:, 0].abs() - 1) - 0.5 + 0.0 * x[:, 1])


def space(module: nn.Module, name: str = "toy") -> Space:
    return Space(name, lambda x: x, module.eval(), None)

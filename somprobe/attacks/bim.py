"""BIM, the basic iterative method (Kurakin et al. 2017): iterated FGSM without a random start.

BIM is PGD (Linf) started at the clean image: each step adds ``step_size * sign(grad)`` and
clips to the eps-ball and the pixel range. So it is :func:`somprobe.attacks.pgd` with
``rand_init=False`` and Kurakin's defaults, not a second implementation; the test checks that it
gives torchattacks 3.5.1's ``BIM`` images.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .core import check_eps, pgd

__all__ = ["bim", "kurakin_steps"]


def kurakin_steps(eps: float) -> int:
    """Kurakin et al.'s number of iterations: ``min(eps*255 + 4, 1.25 * eps*255)``, at least 1.

    (torchattacks' ``BIM(steps=0)`` rule; with 1/255 steps it walks 1.25 eps for small eps.)
    """
    e = float(eps) * 255.0
    return max(1, int(min(e + 4.0, 1.25 * e)))


def bim(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float = 4 / 255,
    steps: int | None = None,
    step_size: float | None = None,
    targeted: bool = False,
    clip: tuple[float, float] = (0.0, 1.0),
    loss_fn: Callable | None = None,
) -> torch.Tensor:
    """Basic iterative method (iterative FGSM), Linf, no random start.

    Parameters
    ----------
    model, images, labels, targeted, clip, loss_fn
        As in :func:`somprobe.attacks.pgd`.
    eps : float
        Linf radius in pixel units, in ``(0, 1]``.
    steps : int, optional
        Iterations; ``None``: Kurakin's rule :func:`kurakin_steps`.
    step_size : float, optional
        Step per iteration; ``None``: Kurakin's one grey level, ``min(1/255, eps)``.

    Returns
    -------
    Tensor
        Adversarial images, same shape/dtype/device as ``images``.
    """
    eps = check_eps(eps)
    steps = kurakin_steps(eps) if steps is None else steps
    step_size = min(1.0 / 255.0, eps) if step_size is None else step_size
    return pgd(model, images, labels, eps=eps, steps=steps, step_size=step_size, norm="linf",
               rand_init=False, targeted=targeted, clip=clip, loss_fn=loss_fn)

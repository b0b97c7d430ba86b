"""A smooth surrogate of a ReLU network: every ``nn.ReLU`` replaced by ``Softplus(beta)``.

A ReLU network is piecewise linear, so its input Hessian is zero almost everywhere and the
finite-difference "Hessian-vector product" ``(∇F(z + h u) - ∇F(z - h u)) / 2h`` is not linear in
the direction ``u`` (it counts the activation boundaries the segment crosses); Lanczos on it gives
eigenvalues that depend on the start vector. Replacing ReLU by ``softplus(βx)/β`` (Dombrowski et
al. 2019 do the same to measure the curvature of ReLU networks) gives a smooth network that tends
to the original as ``β → ∞``, whose exact Hessian (double backprop) is a symmetric linear operator.
"""
from __future__ import annotations

import copy

from torch import nn

from ..errors import GeometryError

__all__ = ["softplus_surrogate"]


def softplus_surrogate(model: nn.Module, beta: float = 10.0) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)``.

    Parameters
    ----------
    model : nn.Module
        The network (left unchanged; the copy shares no parameters with it).
    beta : float
        Softplus sharpness (> 0); larger is closer to ReLU.

    Returns
    -------
    nn.Module
        The surrogate, in the same training/eval mode.

    Raises
    ------
    GeometryError
        ``beta`` not positive, or the model has no ``nn.ReLU`` module (functional ``F.relu`` calls
        cannot be replaced: the surrogate would equal the model).
    """
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise GeometryError(f"beta must be a number > 0, got {beta!r}") from None
    if not beta > 0:
        raise GeometryError(f"beta must be a number > 0, got {beta}")
    smooth = copy.deepcopy(model)
    replaced = 0
    for parent in list(smooth.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=beta))
                replaced += 1
    if replaced == 0:
        raise GeometryError("the model has no nn.ReLU module to smooth (activations called as "
                            "functions cannot be replaced); use method='fd' instead")
    return smooth

"""Margin functions F = f_i - f_j of a classifier and their gradients, batched.

A *margin function* here is any callable ``F(points, rows=None)``: ``points`` has shape
``[n, *E, *input_shape]`` (``n`` samples, any extra dimensions ``E`` of points per sample) and
``rows`` (LongTensor ``[n]``, default ``arange(n)``) says which sample each leading row belongs
to; it returns ``[n, *E]``, each value depending on its own point only. The per-sample classes of
:class:`Margin` follow ``rows``, so the curvature code can split a batch into chunks of samples
and replicate points along ``E`` (directions, finite-difference signs) without copying the model
or the class indices. A plain quadratic ``lambda p, rows=None: ...`` is a margin function too.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import GeometryError

__all__ = ["Margin", "margin_grad"]


class Margin:
    """``F(x) = f_i(x) - f_j(x)`` per sample (study 002: ``F = f_i - f_k̂``).

    Parameters
    ----------
    model : nn.Module
        Classifier in eval mode (logits ``[N, L]``).
    i, j : LongTensor [B]
        Classes of every sample: ``F = logit_i - logit_j``. Negative inside class ``j``'s region
        when ``j`` is the prediction, zero on the boundary between the two.
    input_ndim : int
        Number of trailing dimensions of one input (3 for images ``C, H, W``).
    """

    def __init__(self, model: nn.Module, i: torch.Tensor, j: torch.Tensor, *, input_ndim: int = 3):
        i, j = torch.as_tensor(i).long(), torch.as_tensor(j).long()
        if i.ndim != 1 or i.shape != j.shape:
            raise GeometryError(f"class indices i and j must be 1-D of equal length, got shapes "
                                f"{tuple(i.shape)} and {tuple(j.shape)}")
        self.model, self.i, self.j, self.input_ndim = model, i, j, int(input_ndim)

    def __len__(self) -> int:
        return int(self.i.shape[0])

    def __call__(self, points: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        n = points.shape[0]
        lead = points.shape[: points.ndim - self.input_ndim]
        logits = self.model(points.reshape(-1, *points.shape[len(lead):]))
        logits = logits.reshape(*lead, logits.shape[-1])
        rows = torch.arange(n, device=self.i.device) if rows is None else rows.to(self.i.device)
        shape = (n,) + (1,) * (len(lead) - 1)
        ii = self.i[rows].to(points.device).view(shape).expand(lead)
        jj = self.j[rows].to(points.device).view(shape).expand(lead)
        return logits.gather(-1, ii[..., None]).squeeze(-1) - logits.gather(-1, jj[..., None]).squeeze(-1)


def margin_grad(F, points: torch.Tensor, rows: torch.Tensor | None = None, *,
                create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and input gradients of a margin function at every point, in one backward pass.

    Because each value depends on its own point only, the gradient of their sum with respect to
    the stacked points is every point's own gradient.

    Returns
    -------
    (values [n, *E], grads [n, *E, *input_shape])
    """
    with torch.enable_grad():
        p = points if (create_graph and points.requires_grad) else points.detach().requires_grad_(True)
        values = F(p, rows)
        (grads,) = torch.autograd.grad(values.sum(), p, create_graph=create_graph)
    return (values if create_graph else values.detach()), grads

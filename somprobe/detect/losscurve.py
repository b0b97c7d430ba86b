"""The loss-curve detector of study 000 (Vrabel et al.): the loss along the straight segment from
an input to a low-loss reference image of its predicted class, fed to logistic regression."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import DetectError
from .base import LogisticDetector, as_images, eval_mode

__all__ = ["straight_line_loss", "class_references", "LossCurveDetector"]


def straight_line_loss(model, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, *,
                       n_points: int = 16, chunk: int = 1024) -> np.ndarray:
    """Cross-entropy of ``target`` at ``n_points`` evenly spaced points from ``a`` to ``b``.

    A thin wrapper of :func:`somprobe.paths.core.linear_profile` in input space (the one place
    for the straight-line loss): all ``P × n_points`` points go through the model in chunks.

    Parameters
    ----------
    model : nn.Module
        Pixels → logits, in eval mode.
    a, b : Tensor [P, C, H, W]
        Start and end of each segment (on the model's device).
    target : LongTensor [P]
    n_points : int
        Points per segment, both ends included (``alpha = linspace(0, 1, n_points)``).

    Returns
    -------
    ndarray [P, n_points]
        Loss at ``(1 - alpha) * a + alpha * b``.
    """
    from ..paths.core import linear_profile
    from ..paths.spaces import make_space

    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 2:
        raise DetectError(f"n_points must be an integer >= 2, got {n_points!r}")
    with torch.no_grad():
        prof = linear_profile(make_space(model, "input"), a, b, target, T=int(n_points), chunk=chunk)
    return np.asarray(prof["loss"], dtype=np.float64)


def class_references(model, images, labels, *, num_classes: int | None = None, device="auto",
                     batch_size: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    """For each class, the image of that class with the lowest loss (study 000's low-loss reference).

    Parameters
    ----------
    model : nn.Module
    images : Tensor or ndarray [N, C, H, W]
        Candidate (training) images in [0, 1].
    labels : ndarray of int [N]
    num_classes : int, optional
        Classes to cover (default ``max(labels) + 1``); a class without a candidate is an error.

    Returns
    -------
    references : Tensor [num_classes, C, H, W] (CPU)
    positions : ndarray int64 [num_classes]
        Row of ``images`` chosen for each class.
    """
    x = as_images(images)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.numel() != x.shape[0]:
        raise DetectError(f"{x.shape[0]} candidate images but {y.numel()} labels")
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    missing = sorted(set(range(k)) - set(y.tolist()))
    if missing:
        raise DetectError(f"no reference candidate for classes {missing[:10]}: give candidate "
                          f"images of every class (more per class)")
    dev = resolve_device(device)
    model.to(dev)
    losses = []
    with eval_mode(model), torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s:s + batch_size].to(dev))
            losses.append(F.cross_entropy(logits, y[s:s + batch_size].to(dev), reduction="none").cpu())
    loss = torch.cat(losses).double()
    # lowest loss per class without a loop over classes: sort by (class, loss), take each first
    order = np.lexsort((loss.numpy(), y.numpy()))
    ys = y.numpy()[order]
    first = order[np.searchsorted(ys, np.arange(k))]
    return x[torch.as_tensor(first)].clone(), first.astype(np.int64)


class LossCurveDetector(LogisticDetector):
    """Study 000's detector: the loss curve towards a class reference as characteristics.

    For an input ``x`` predicted as class ``c`` the characteristics are the cross-entropy of ``c``
    at ``n_points`` points of the straight segment from ``x`` to ``references[c]``. A natural
    image lies in the same low-loss region as its class reference, so its curve stays low; an
    adversarial one sits just across a decision boundary, so the curve climbs over a barrier.

    Parameters
    ----------
    model : nn.Module
    references : Tensor [num_classes, C, H, W]
        One low-loss image per class (:func:`class_references`).
    n_points : int
        Points on each segment (both ends included; default 16).
    C, max_iter
        Logistic regression.
    device, batch_size
        Where and how many inputs at a time (each brings ``n_points`` images).
    """

    name = "loss_curve"

    def __init__(self, model, references, *, n_points: int = 16, C: float = 1.0,
                 max_iter: int = 2000, device="auto", batch_size: int = 64):
        super().__init__(C=C, max_iter=max_iter)
        self.model = model
        self.references = references
        self.n_points = n_points
        self.device = device
        self.batch_size = batch_size

    def features(self, x, **context) -> np.ndarray:
        x = as_images(x)
        refs = as_images(self.references)
        if refs.shape[1:] != x.shape[1:]:
            raise DetectError(f"references have shape {tuple(refs.shape[1:])} but inputs "
                              f"{tuple(x.shape[1:])}: take references from the same data")
        dev = resolve_device(self.device)
        self.model.to(dev)
        refs = refs.to(dev)
        out = []
        with eval_mode(self.model), torch.no_grad():
            for s in range(0, x.shape[0], int(self.batch_size)):
                b = x[s:s + self.batch_size].to(dev)
                pred = self.model(b).argmax(1)
                if int(pred.max()) >= refs.shape[0]:
                    raise DetectError(f"the model predicts class {int(pred.max())} but there are "
                                      f"only {refs.shape[0]} references: give one per class")
                out.append(straight_line_loss(self.model, b, refs[pred], pred,
                                              n_points=self.n_points))
        return np.concatenate(out)

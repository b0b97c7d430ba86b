"""DeepFool (Moosavi-Dezfooli et al. 2016), batched over samples, with a targeted projection.

One iteration linearises the classifier around the current iterate of every still-active sample
at once and steps to the nearest linearised boundary. The update is torchattacks 3.5.1's
(``torchattacks.DeepFool``): the step ``(1 + overshoot) * delta`` is taken from the current
iterate and clipped to ``clip`` after every iteration, a sample stops as soon as its prediction
differs from its label, and it is never moved again. torchattacks loops over the samples in
Python (one forward/backward per sample and class); here a forward pass and one backward pass per
candidate class serve the whole batch, so the images are the same (to float rounding) and the
time is that of ``num_classes`` batched backward passes per iteration.

Samples that do not cross within ``max_iter`` iterations are returned where the last step left
them with ``converged=False`` (no error): callers decide what to do with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AttackError
from .core import (_attack_mode, _check_clip, _check_images, _check_labels, _check_number,
                   _num_classes, predict_labels)

__all__ = ["deepfool", "DeepFoolResult"]

# Gradient differences smaller than this cannot be stepped along (flat logits); the sample then
# stays where it is and is reported as not converged.
_TINY = 1e-12


@dataclass
class DeepFoolResult:
    """What :func:`deepfool` returns (all tensors on the images' device, detached).

    Attributes
    ----------
    images : Tensor [B, C, H, W]
        Perturbed images, clipped to ``clip``.
    r : Tensor [B, C, H, W]
        The perturbation ``images - x`` (DeepFool's r(x), with the overshoot).
    converged : BoolTensor [B]
        Untargeted: the prediction on ``images`` differs from the label; targeted: it is the
        target with a logit margin of at least ``margin``.
    iterations : LongTensor [B]
        Steps taken for each sample (0 when it was already misclassified / in the target class).
    labels : LongTensor [B]
        The labels moved away from (untargeted) or the targets (targeted).
    preds : LongTensor [B]
        Predictions on ``images``.
    """

    images: torch.Tensor
    r: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    labels: torch.Tensor
    preds: torch.Tensor


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1)


def deepfool(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    target: torch.Tensor | None = None,
    margin: float = 0.0,
    overshoot: float = 0.02,
    max_iter: int = 50,
    num_classes: int | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> DeepFoolResult:
    """DeepFool's minimal L2 perturbation, batched; optionally a projection into a target class.

    Parameters
    ----------
    model : nn.Module
        Classifier on pixels in ``clip`` (put in eval mode for the attack, restored after; its
        parameter gradients are untouched).
    images : Tensor [B, C, H, W]
        Clean pixels in ``clip``.
    labels : Tensor [B] of int, optional
        Classes to move away from (untargeted). ``None``: the model's predictions on ``images``.
        Ignored when ``target`` is given.
    target : Tensor [B] of int, optional
        Targeted projection: move each image into class ``target`` until
        ``f_target - max_{k != target} f_k >= margin``. Each step goes to the linearised boundary
        of the most violated constraint (largest ``(f_k - f_target + margin) / ||grad||``).
    margin : float
        Logit margin a targeted projection must reach (>= 0; untargeted attacks ignore it).
    overshoot : float
        Each step is ``(1 + overshoot)`` times the linearised step (default 0.02, torchattacks').
    max_iter : int
        Maximum number of steps per sample (torchattacks' ``steps``).
    num_classes : int, optional
        Candidate classes of an untargeted attack: the ``num_classes`` classes with the largest
        logits on the clean image, the label included (the original DeepFool's ``num_classes``).
        ``None``: every class (as torchattacks).
    clip : (float, float) or None
        Valid pixel range; every iterate is clipped to it (torchattacks'). ``None``: no box, the
        minimal perturbation in the whole input space (what the geometry of study 002 measures;
        clipping can stall DeepFool on images with many saturated pixels, e.g. digits).

    Returns
    -------
    DeepFoolResult
        ``images``, ``r``, ``converged``, ``iterations``, ``labels``, ``preds``.

    Raises
    ------
    AttackError
        Bad images, labels, targets or hyperparameters.
    """
    lo, hi = (float("-inf"), float("inf")) if clip is None else _check_clip(clip)
    x = _check_images(images, (lo, hi))
    overshoot = _check_number("overshoot", overshoot, low=0.0, low_open=False)
    margin = _check_number("margin", margin, low=0.0, low_open=False)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise AttackError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    targeted = target is not None
    if targeted:
        goal = _check_labels(target, x, model, "target")
    elif labels is None:
        goal = predict_labels(model, x)
    else:
        goal = _check_labels(labels, x, model, "labels")

    with _attack_mode(model):
        with torch.no_grad():
            logits0 = model(x)
        n_cls = logits0.shape[1]
        if n_cls < 2:
            raise AttackError(f"the model has {n_cls} output; DeepFool needs at least 2 classes")
        if num_classes is None:
            k = n_cls
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise AttackError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        else:
            k = min(num_classes, n_cls)
        model_classes = _num_classes(model)
        if model_classes is not None and model_classes != n_cls:
            raise AttackError(f"the model says it has {model_classes} classes but outputs {n_cls} logits")
        # Candidate classes (the goal's competitors): fixed at the start, as the original DeepFool.
        masked = logits0.masked_fill(torch.nn.functional.one_hot(goal, n_cls).bool(), float("-inf"))
        cand = masked.topk(n_cls - 1 if targeted else k - 1, dim=1).indices  # [B, K]
        if not targeted and num_classes is None:
            # torchattacks' order (class index) so ties in the arg-min resolve the same way.
            cand = cand.sort(dim=1).values

        cur = x.clone()
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        iterations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        crossed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(max_iter):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa = cur[idx].clone().requires_grad_(True)
            logits = model(xa)
            g = goal[idx]
            done = _done(logits.detach(), g, targeted, margin)
            c = cand[idx]
            f_goal = logits.gather(1, g[:, None])  # [b, 1]
            diffs = logits.gather(1, c) - f_goal  # f_k - f_goal, [b, K]
            grads = []
            for j in range(c.shape[1]):
                (gj,) = torch.autograd.grad(diffs[:, j].sum(), xa, retain_graph=j + 1 < c.shape[1])
                grads.append(gj)
            w = torch.stack(grads, dim=1)  # [b, K, C, H, W]
            with torch.no_grad():
                f = diffs.detach()
                wn = w.flatten(2).norm(p=2, dim=2)  # [b, K]
                if targeted:
                    f = f + margin
                    score = torch.where(f > 0, f / wn.clamp_min(_TINY), torch.full_like(f, -1.0))
                    best = score.argmax(dim=1)
                else:
                    best = (f.abs() / wn).argmin(dim=1)  # torchattacks: |f'| / ||w'||
                rows = torch.arange(len(idx), device=x.device)
                fb = f[rows, best]
                wb = w[rows, best]
                nb = wn[rows, best]
                movable = nb > _TINY
                coef = torch.where(movable, fb.abs() / nb.clamp_min(_TINY) ** 2, torch.zeros_like(fb))
                if targeted:
                    wb = -wb  # decrease f_k - f_target
                step = (1 + overshoot) * coef.view(-1, *([1] * (x.ndim - 1))) * wb
                keep = ~done & movable
                upd = idx[keep]
                cur[upd] = (cur[upd] + step[keep]).clamp_(lo, hi)
                iterations[upd] += 1
                active[idx[done]] = False
                crossed[idx[done]] = True
                active[idx[~movable & ~done]] = False
        with torch.no_grad():
            final = model(cur)
        # A sample seen across the boundary in the loop stays converged even when the final
        # full-batch forward pass puts it back on the tie within float rounding (the logits of a
        # batch and of a sub-batch differ in the last bits).
        converged = crossed | _done(final, goal, targeted, margin)
        preds = final.argmax(dim=1)
    cur = cur.detach()
    return DeepFoolResult(images=cur, r=cur - x, converged=converged, iterations=iterations,
                          labels=goal, preds=preds)


def _done(logits: torch.Tensor, goal: torch.Tensor, targeted: bool, margin: float) -> torch.Tensor:
    pred = logits.argmax(dim=1)
    if not targeted:
        return pred != goal
    other = logits.scatter(1, goal[:, None], float("-inf")).amax(dim=1)
    return (pred == goal) & (logits.gather(1, goal[:, None]).squeeze(1) - other >= margin)

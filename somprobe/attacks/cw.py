"""Carlini–Wagner L2 (Carlini & Wagner 2017), batched, with the binary search over ``c``.

Follows the authors' reference implementation (``nn_robust_attacks/l2_attack.py``): the image is
``tanh(w)`` rescaled to the pixel range, ``w`` starts at the clean image (scaled by 0.999999 so
pixels at exactly 0 or 1 can still move), Adam minimises ``||x' - x||² + c · max(z_y - max_{k≠y}
z_k + κ, 0)`` (targeted: ``max(max_{k≠t} z_k - z_t + κ, 0)``) for every sample at once, the best
(smallest L2) successful image of every sample is kept, and after each run ``c`` is bisected per
sample (×10 while no success was found). torchattacks 3.5.1's ``CW`` is the same objective with
one fixed ``c`` and no search; the tests compare success rates and L2 norms with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AttackError
from .core import _attack_mode, _check_clip, _check_images, _check_labels, _check_number, predict_labels

__all__ = ["cw_l2", "CWResult"]

_BIG = 1e10


@dataclass
class CWResult:
    """What :func:`cw_l2` returns (detached tensors on the images' device).

    Attributes
    ----------
    images : Tensor [B, C, H, W]
        Best (smallest-L2) successful image of each sample; the clean image where none succeeded.
    success : BoolTensor [B]
        Whether a successful image was found.
    l2 : Tensor [B]
        ``||images - x||_2`` (0 where no success).
    const : Tensor [B]
        The last ``c`` tried for each sample.
    labels : LongTensor [B]
        Labels moved away from (untargeted) or targets.
    """

    images: torch.Tensor
    success: torch.Tensor
    l2: torch.Tensor
    const: torch.Tensor
    labels: torch.Tensor


def _margin_loss(logits, goal, targeted, kappa):
    real = logits.gather(1, goal[:, None]).squeeze(1)
    other = logits.scatter(1, goal[:, None], float("-inf")).amax(dim=1)
    gap = (other - real) if targeted else (real - other)
    return (gap + kappa).clamp_min(0.0)


def _succeeds(logits, goal, targeted, kappa):
    # The reference's compare(): the goal logit shifted by κ must (not) be the arg-max.
    shifted = logits.clone()
    shifted.scatter_add_(1, goal[:, None], torch.full_like(goal[:, None], -kappa if targeted else kappa,
                                                          dtype=logits.dtype))
    pred = shifted.argmax(dim=1)
    return pred == goal if targeted else pred != goal


def cw_l2(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    targeted: bool = False,
    kappa: float = 0.0,
    initial_const: float = 0.1,
    binary_search_steps: int = 5,
    steps: int = 100,
    lr: float = 0.01,
    abort_early: bool = True,
    clip: tuple[float, float] = (0.0, 1.0),
) -> CWResult:
    """Carlini–Wagner L2 attack with a per-sample binary search over ``c``.

    Parameters
    ----------
    model : nn.Module
        Classifier on pixels in ``clip`` (eval mode during the attack, restored after).
    images : Tensor [B, C, H, W]
        Clean pixels in ``clip``.
    labels : Tensor [B] of int, optional
        Labels (untargeted) or targets (``targeted=True``); ``None`` (untargeted): predictions.
    targeted : bool
        Move into ``labels`` instead of away from them.
    kappa : float
        Confidence κ >= 0: the logit margin the attack must reach.
    initial_const : float
        First ``c`` (> 0) of the search.
    binary_search_steps : int
        Runs of Adam, each with its own ``c`` per sample (1 = torchattacks' fixed ``c``).
    steps : int
        Adam iterations per run.
    lr : float
        Adam's learning rate.
    abort_early : bool
        Stop a run when the batch loss has not fallen by 0.01% over ``steps // 10`` iterations.
    clip : (float, float)
        Pixel range (the tanh box).

    Returns
    -------
    CWResult
    """
    lo, hi = _check_clip(clip)
    x = _check_images(images, (lo, hi))
    kappa = _check_number("kappa", kappa, low=0.0, low_open=False)
    c0 = _check_number("initial_const", initial_const, low=0.0)
    lr = _check_number("lr", lr, low=0.0)
    for name, v in (("binary_search_steps", binary_search_steps), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AttackError(f"{name} must be an integer >= 1, got {v!r}")
    if labels is None:
        if targeted:
            raise AttackError("a targeted attack needs labels (the target classes); pass labels=<targets>")
        goal = predict_labels(model, x)
    else:
        goal = _check_labels(labels, x, model, "targets" if targeted else "labels")

    b = x.shape[0]
    view = (-1,) + (1,) * (x.ndim - 1)
    mul, plus = (hi - lo) / 2.0, (hi + lo) / 2.0
    w0 = torch.atanh(((x - plus) / mul) * 0.999999)
    x_box = torch.tanh(w0) * mul + plus  # the reference measures L2 to the tanh-rounded image
    lower = torch.zeros(b, dtype=x.dtype, device=x.device)
    upper = torch.full((b,), _BIG, dtype=x.dtype, device=x.device)
    const = torch.full((b,), c0, dtype=x.dtype, device=x.device)
    best_l2 = torch.full((b,), _BIG, dtype=x.dtype, device=x.device)
    best_img = x.clone()
    check_every = max(steps // 10, 1)
    with _attack_mode(model):
        for _ in range(binary_search_steps):
            modifier = torch.zeros_like(x, requires_grad=True)
            opt = torch.optim.Adam([modifier], lr=lr)
            run_best = torch.full((b,), _BIG, dtype=x.dtype, device=x.device)
            run_ok = torch.zeros(b, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for it in range(steps):
                adv = torch.tanh(w0 + modifier) * mul + plus
                l2 = (adv - x_box).flatten(1).pow(2).sum(dim=1)
                logits = model(adv)
                loss = l2.sum() + (const * _margin_loss(logits, goal, targeted, kappa)).sum()
                opt.zero_grad()
                loss.backward()
                with torch.no_grad():
                    ok = _succeeds(logits.detach(), goal, targeted, kappa)
                    better = ok & (l2 < run_best)
                    run_best = torch.where(better, l2, run_best)
                    run_ok |= ok
                    improve = ok & (l2 < best_l2)
                    best_l2 = torch.where(improve, l2, best_l2)
                    best_img = torch.where(improve.view(view), adv.detach(), best_img)
                opt.step()
                if abort_early and it % check_every == 0:
                    if loss.item() > prev * 0.9999:
                        break
                    prev = loss.item()
            # Bisect c: smaller after a success, larger (×10 until bracketed) after a failure.
            upper = torch.where(run_ok, torch.minimum(upper, const), upper)
            lower = torch.where(run_ok, lower, torch.maximum(lower, const))
            bracketed = upper < _BIG
            const = torch.where(bracketed, (lower + upper) / 2, const * 10)
    success = best_l2 < _BIG
    final_l2 = torch.where(success, (best_img - x).flatten(1).norm(dim=1), torch.zeros_like(best_l2))
    return CWResult(images=best_img.detach(), success=success, l2=final_l2, const=const, labels=goal)

"""Perturbations in pixel space: PGD (Linf, L2), FGSM and the uniform-noise control.

All functions take a model whose input is pixels in ``[0, 1]`` (somprobe's normalising wrapper)
and a batch of images ``[B, C, H, W]`` on the model's device, and return perturbed images of the
same shape, dtype and device. They run the whole batch at once; only iterations loop.

The built-in PGD reproduces advertorch 0.2.3's ``LinfPGDAttack`` / ``L2PGDAttack`` operation by
operation (random start, step, projection and clipping in the same order, the same summed
cross-entropy), so with ``generator=None`` and the same ``torch.manual_seed`` both give the same
adversarial images. ``backend="advertorch"`` runs advertorch itself.

During an attack the model is in eval mode (each submodule's previous mode is restored after) and
its parameters' ``.grad`` are left untouched: gradients are taken with ``torch.autograd.grad`` with
respect to the perturbation only.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import AttackError

__all__ = [
    "pgd", "fgsm", "uniform_noise", "predict_labels", "default_step_size", "check_pgd_params",
    "check_eps",
    "advertorch_available", "import_advertorch_attacks", "NORMS", "BACKENDS",
]

NORMS = ("linf", "l2")
BACKENDS = ("builtin", "advertorch")

# advertorch divides the L2 gradient by max(norm, this) (normalize_by_pnorm's small_constant).
_L2_SMALL = 1e-6


# --------------------------------------------------------------------------- advertorch
def _restore_zero_gradients() -> None:
    """Put back ``torch.autograd.gradcheck.zero_gradients`` so advertorch 0.2.3 can be imported.

    advertorch 0.2.3 (the last PyPI release) does ``from torch.autograd.gradcheck import
    zero_gradients`` at import time; torch 1.9 removed that helper, so the import fails. We set
    the attribute on the *module object* from ``sys.modules``: ``import torch.autograd.gradcheck
    as m`` would bind the function ``torch.autograd.gradcheck`` (same name, re-exported by
    ``torch.autograd``), not the module.
    """
    import torch.autograd.gradcheck  # noqa: F401  (make sure the module is loaded)

    module = sys.modules["torch.autograd.gradcheck"]
    if hasattr(module, "zero_gradients"):
        return

    def zero_gradients(x):  # the torch < 1.9 implementation
        if isinstance(x, torch.Tensor):
            if x.grad is not None:
                x.grad.detach_()
                x.grad.zero_()
        else:
            for elem in x:
                zero_gradients(elem)

    module.zero_gradients = zero_gradients


def import_advertorch_attacks():
    """Import and return ``advertorch.attacks`` (with the torch ≥ 1.9 shim).

    Raises
    ------
    AttackError
        When advertorch is not installed or still fails to import; the message says how to fix it
        and that ``backend="builtin"`` needs no advertorch.
    """
    try:
        _restore_zero_gradients()
        import advertorch.attacks as attacks
    except Exception as exc:  # ImportError, or anything advertorch raises while importing
        raise AttackError(
            f"backend 'advertorch' is not available: importing advertorch failed "
            f"({type(exc).__name__}: {exc}). Install it with `pip install advertorch==0.2.3`, "
            f"or use backend='builtin' (the default), which gives the same images."
        ) from exc
    return attacks


def advertorch_available() -> bool:
    """Whether ``backend="advertorch"`` can be used in this environment."""
    try:
        import_advertorch_attacks()
    except AttackError:
        return False
    return True


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration of an attack, restored after.

    Each submodule's own ``training`` flag is restored (``model.train(old)`` would overwrite a
    deliberately mixed state, e.g. frozen BatchNorm). Switching ``requires_grad`` off saves the
    parameter-gradient work and guarantees ``.grad`` stays as it was, whatever the backend does.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in params:
            p.requires_grad_(flag)


def default_step_size(eps: float) -> float:
    """The paper's step size for PGD: ``eps * 2 / 100`` (study 003, Table 2: (4/255)·(2/100))."""
    return float(eps) * 2.0 / 100.0


def _check_number(name: str, value, *, low=None, high=None, low_open=True) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AttackError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise AttackError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise AttackError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise AttackError(f"{name} must be <= {high}, got {value}")
    return value


def _check_clip(clip) -> tuple[float, float]:
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise AttackError(f"clip must be a pair (min, max) of numbers, got {clip!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise AttackError(f"clip must be finite with min < max, got {clip!r}")
    return lo, hi


def _check_images(images, clip: tuple[float, float]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise AttackError(
            f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}; "
            f"convert with torch.as_tensor(array, dtype=torch.float32)"
        )
    if not images.is_floating_point():
        raise AttackError(
            f"images must be floating point pixels in [{clip[0]:g}, {clip[1]:g}], got dtype "
            f"{images.dtype}; divide uint8 images by 255"
        )
    if images.ndim < 2 or images.shape[0] == 0:
        raise AttackError(f"images must be a non-empty batch [B, ...], got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise AttackError("images contain NaN or infinite values; check the data loading")
    lo, hi = float(images.min()), float(images.max())
    if lo < clip[0] or hi > clip[1]:
        raise AttackError(
            f"images have values in [{lo:.4g}, {hi:.4g}], outside [{clip[0]:g}, {clip[1]:g}]: the "
            f"model wrapper expects pixels in [0, 1] and normalises them itself; pass the images "
            f"before normalisation (not mean/std-normalised tensors)"
        )
    return images.detach()


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if n is None:
        n = getattr(getattr(model, "net", None), "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _check_labels(labels, images: torch.Tensor, model: nn.Module, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels, device=images.device)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise AttackError(
            f"{what} must be a 1-D tensor with one class index per image ({images.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise AttackError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    labels = labels.long()
    n = _num_classes(model)
    if int(labels.min()) < 0 or (n is not None and int(labels.max()) >= n):
        raise AttackError(
            f"{what} must lie in [0, {n if n is not None else 'num_classes'}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; check the dataset's class indices"
        )
    return labels


@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Arg-max predictions of ``model`` (in eval mode, restored after) for ``images``.

    Used as attack labels when none are given, as advertorch does ("prevents label leaking").
    """
    with _attack_mode(model):
        return model(images).argmax(dim=1)


def _check_common(model, images, labels, *, targeted, clip, loss_fn):
    if not callable(model):
        raise AttackError(f"model must be a callable nn.Module, got {type(model).__name__}")
    clip = _check_clip(clip)
    x = _check_images(images, clip)
    if labels is None:
        if targeted:
            raise AttackError(
                "a targeted attack needs labels (the target classes); pass labels=<targets>"
            )
        labels = predict_labels(model, x)
    else:
        labels = _check_labels(labels, x, model, "targets" if targeted else "labels")
    if loss_fn is None:
        # advertorch's default: the *summed* cross-entropy, so each sample's gradient is its own.
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
    elif not callable(loss_fn):
        raise AttackError(f"loss_fn must be callable(logits, labels) -> scalar, got {loss_fn!r}")
    return x, labels, clip, loss_fn


def _norm_name(norm) -> str:
    key = str(norm).lower().replace("_", "")
    key = {"inf": "linf", "linf": "linf", "l2": "l2", "2": "l2"}.get(key)
    if key is None:
        raise AttackError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    return key


def _batch_norm2(t: torch.Tensor) -> torch.Tensor:
    # advertorch's _get_norm_batch(x, 2), written the same way so the rounding is the same.
    return t.abs().pow(2).view(t.shape[0], -1).sum(dim=1).pow(1.0 / 2)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def _clamp_by_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norm = _batch_norm2(delta)
    factor = torch.min(eps / norm, torch.ones_like(norm))
    return delta * _per_sample(factor, delta)


def _project_to_box(x: torch.Tensor, delta: torch.Tensor, buf: torch.Tensor, lo: float, hi: float):
    # delta <- clamp(x + delta, lo, hi) - x, in place (advertorch's order of rounding).
    torch.add(x, delta, out=buf).clamp_(lo, hi)
    torch.sub(buf, x, out=delta)


# --------------------------------------------------------------------------- attacks
def check_pgd_params(*, eps, steps, step_size=None, norm="linf", backend="builtin"):
    """Validate PGD's hyperparameters; return ``(norm, eps, steps, step_size)`` normalised.

    ``step_size=None`` becomes :func:`default_step_size`. Raises :class:`AttackError` naming the
    bad value and the fix (used by :func:`pgd` and by the attack job before it writes anything).
    """
    norm = _norm_name(norm)
    eps = _check_number("eps", eps, low=0.0)
    if norm == "linf" and eps > 1.0:
        raise AttackError(
            f"eps={eps:g} is larger than the whole pixel range [0, 1] for an Linf attack; "
            f"give eps in pixel units, e.g. 4/255 = {4 / 255:.4f}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AttackError(f"steps must be an integer >= 1, got {steps!r}")
    step_size = default_step_size(eps) if step_size is None else _check_number("step_size", step_size, low=0.0)
    if step_size > eps:
        raise AttackError(
            f"step_size={step_size:g} is larger than eps={eps:g}: every step would leave the "
            f"eps-ball and be projected back; use step_size <= eps (default eps*2/100)"
        )
    if backend not in BACKENDS:
        raise AttackError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return norm, eps, steps, step_size


def check_eps(eps) -> float:
    """Validate an Linf amplitude in pixel units (FGSM, noise): finite, in ``(0, 1]``."""
    return _check_number("eps", eps, low=0.0, high=1.0)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float = 4 / 255,
    steps: int = 50,
    step_size: float | None = None,
    norm: str = "linf",
    rand_init: bool = True,
    targeted: bool = False,
    clip: tuple[float, float] = (0.0, 1.0),
    loss_fn: Callable | None = None,
    generator: torch.Generator | None = None,
    backend: str = "builtin",
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018), as advertorch 0.2.3 runs it.

    Parameters
    ----------
    model : nn.Module
        Classifier taking pixels in ``clip`` (somprobe's normalising wrapper); put in eval mode
        for the attack and restored after; its parameter gradients are not touched.
    images : Tensor [B, C, H, W]
        Clean pixels in ``[0, 1]`` on the model's device.
    labels : Tensor [B] of int, optional
        True classes (untargeted) or target classes (``targeted=True``). ``None`` (untargeted
        only): the model's predictions on ``images``, as advertorch does.
    eps : float
        Radius of the perturbation ball: Linf in pixel units (default 4/255, the paper's) or L2.
    steps : int
        Number of iterations (default 50).
    step_size : float, optional
        Step per iteration; ``None`` → ``eps * 2 / 100`` (the paper's ``eps_iter``).
    norm : {"linf", "l2"}
        Linf steps along the gradient sign; L2 along the L2-normalised gradient.
    rand_init : bool
        Start from a random point: Linf uniform in ``[-eps, eps]``; L2 advertorch's draw (uniform
        image in ``clip`` minus ``x``, shrunk into the L2 ball); both then clipped to ``clip``.
    targeted : bool
        Minimise the loss towards ``labels`` instead of maximising it away from them.
    clip : (float, float)
        Valid pixel range; every iterate is clipped to it.
    loss_fn : callable, optional
        ``loss_fn(logits, labels) -> scalar``; default summed cross-entropy (advertorch's).
    generator : torch.Generator, optional
        Source of the random start. ``None`` draws from torch's default generator exactly as
        advertorch does, so ``torch.manual_seed(s)`` before either gives the same images.
    backend : {"builtin", "advertorch"}
        ``"advertorch"`` runs ``advertorch.attacks.LinfPGDAttack`` / ``L2PGDAttack`` itself; it
        draws from torch's default generator, so with a ``generator`` the start is seeded from it
        inside ``torch.random.fork_rng`` (global state unchanged) and differs from the builtin's.

    Returns
    -------
    Tensor
        Adversarial images, same shape/dtype/device as ``images``, detached.

    Raises
    ------
    AttackError
        Parameters out of range, images outside ``clip``, bad labels, advertorch not importable.
    """
    norm, eps, steps, step_size = check_pgd_params(eps=eps, steps=steps, step_size=step_size,
                                                   norm=norm, backend=backend)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise AttackError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    x, labels, (lo, hi), loss_fn = _check_common(
        model, images, labels, targeted=targeted, clip=clip, loss_fn=loss_fn)

    if backend == "advertorch":
        return _pgd_advertorch(model, x, labels, eps=eps, steps=steps, step_size=step_size,
                               norm=norm, rand_init=rand_init, targeted=targeted, lo=lo, hi=hi,
                               loss_fn=loss_fn, generator=generator)

    with _attack_mode(model):
        delta = torch.zeros_like(x)
        buf = torch.empty_like(x)
        if rand_init:
            if norm == "linf":
                _uniform_(delta, -1.0, 1.0, generator)
                delta.mul_(eps)
            else:
                _uniform_(delta, lo, hi, generator)
                delta = _clamp_by_l2(delta - x, eps)
            # advertorch clips the start twice (rand_init_delta, then perturb); the second is not
            # always a no-op in floating point, so do both.
            _project_to_box(x, delta, buf, lo, hi)
            _project_to_box(x, delta, buf, lo, hi)
        delta.requires_grad_(True)
        for _ in range(steps):
            loss = loss_fn(model(x + delta), labels)
            if targeted:
                loss = -loss
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if norm == "linf":
                    delta.add_(grad.sign_().mul_(step_size))
                    delta.clamp_(-eps, eps)
                    _project_to_box(x, delta, buf, lo, hi)
                else:
                    gnorm = _batch_norm2(grad)
                    gnorm = torch.max(gnorm, torch.ones_like(gnorm) * _L2_SMALL)
                    grad.mul_(_per_sample(1.0 / gnorm, grad)).mul_(step_size)
                    delta.add_(grad)
                    _project_to_box(x, delta, buf, lo, hi)
                    delta.copy_(_clamp_by_l2(delta, eps))
        with torch.no_grad():
            return torch.add(x, delta, out=buf).clamp_(lo, hi).detach()


def _uniform_(t: torch.Tensor, lo: float, hi: float, generator: torch.Generator | None) -> None:
    if generator is None:
        t.uniform_(lo, hi)  # torch's default generator, as advertorch draws
    elif generator.device == t.device:
        t.uniform_(lo, hi, generator=generator)
    else:
        draw = torch.empty(t.shape, dtype=t.dtype, device=generator.device)
        t.copy_(draw.uniform_(lo, hi, generator=generator))


def _pgd_advertorch(model, x, labels, *, eps, steps, step_size, norm, rand_init, targeted, lo, hi,
                    loss_fn, generator):
    attacks = import_advertorch_attacks()
    cls = attacks.LinfPGDAttack if norm == "linf" else attacks.L2PGDAttack
    adversary = cls(model, loss_fn=loss_fn, eps=float(eps), nb_iter=int(steps),
                    eps_iter=float(step_size), rand_init=bool(rand_init), clip_min=float(lo),
                    clip_max=float(hi), targeted=bool(targeted))
    with _attack_mode(model), _seeded_default_rng(generator, x.device):
        return adversary.perturb(x.clone(), labels.clone()).detach()


@contextlib.contextmanager
def _seeded_default_rng(generator: torch.Generator | None, device: torch.device):
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    eps: float = 4 / 255,
    targeted: bool = False,
    clip: tuple[float, float] = (0.0, 1.0),
    loss_fn: Callable | None = None,
) -> torch.Tensor:
    """Fast gradient sign method: one Linf step of size ``eps`` (advertorch's GradientSignAttack).

    Parameters
    ----------
    model, images, labels, targeted, clip, loss_fn
        As in :func:`pgd`.
    eps : float
        Step size = Linf radius, in pixel units, in ``(0, 1]``.

    Returns
    -------
    Tensor
        ``clamp(images + eps * sign(grad), clip)``, detached.
    """
    eps = check_eps(eps)
    x, labels, (lo, hi), loss_fn = _check_common(
        model, images, labels, targeted=targeted, clip=clip, loss_fn=loss_fn)
    with _attack_mode(model):
        xg = x.clone().requires_grad_(True)
        loss = loss_fn(model(xg), labels)
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, xg)
        with torch.no_grad():
            return (x + grad.sign_().mul_(eps)).clamp_(lo, hi)


def uniform_noise(
    images: torch.Tensor,
    *,
    eps: float = 4 / 255,
    symmetric: bool = False,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """The random-noise control: independent uniform noise added to every pixel, then clipped.

    Parameters
    ----------
    images : Tensor [B, C, H, W]
        Clean pixels in ``clip``.
    eps : float
        Noise amplitude, in ``(0, 1]``.
    symmetric : bool
        ``False`` (the paper's control): noise in ``[0, eps]``; ``True``: in ``[-eps, eps]``.
    seed : int
        Seed of a local CPU generator (used when ``generator`` is None). Noise is drawn on the
        CPU and moved, so a seed gives the same noise on every device.
    generator : torch.Generator, optional
        Draw from this generator instead.
    clip : (float, float)
        Valid pixel range.

    Returns
    -------
    Tensor
        ``clamp(images + noise, clip)``.
    """
    eps = check_eps(eps)
    lo, hi = _check_clip(clip)
    x = _check_images(images, (lo, hi))
    if generator is None:
        if seed is None or isinstance(seed, bool) or not isinstance(seed, int):
            raise AttackError(f"seed must be an integer (or pass a generator), got {seed!r}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise AttackError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    noise = (u * 2.0 - 1.0) * eps if symmetric else u * eps
    return (x + noise).clamp_(lo, hi)

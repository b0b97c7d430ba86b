"""Perturbations in pixel space and the run-level attack job.

:mod:`.core` holds the pure tensor attacks (PGD, FGSM, the uniform-noise control; no I/O);
:mod:`.job` runs one over a clean split of a run and stores images, summary and perturbed codes
(``somprobe attack``). Everything public in :mod:`.core` is importable from here, and so are
BIM (:mod:`.bim`), DeepFool (:mod:`.deepfool`) and Carlini–Wagner L2 (:mod:`.cw`).
"""
from __future__ import annotations

from . import core  # noqa: F401  (somprobe.attacks.core stays reachable as an attribute)
from .core import *  # noqa: F401,F403  (the attack functions are this package's API)
from .core import __all__ as _core_all
from .core import _restore_zero_gradients  # noqa: F401  (tests check the advertorch shim)

from .bim import bim, kurakin_steps
from .cw import CWResult, cw_l2
from .deepfool import DeepFoolResult, deepfool

__all__ = list(_core_all) + ["bim", "kurakin_steps", "deepfool", "DeepFoolResult", "cw_l2", "CWResult"]

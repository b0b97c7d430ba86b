"""InputMFS (Harder et al. 2021): the Fourier magnitude spectrum of the input as characteristics."""
from __future__ import annotations

import numpy as np
import torch

from .base import LogisticDetector, as_images

__all__ = ["magnitude_spectrum", "InputMFSDetector"]


def magnitude_spectrum(x) -> np.ndarray:
    """Per channel ``|FFT2(x)|`` with the zero frequency in the centre, flattened.

    Parameters
    ----------
    x : Tensor or ndarray [N, C, H, W]
        Images in [0, 1].

    Returns
    -------
    ndarray float64 [N, C*H*W]
        ``abs(fftshift(fft2(x, axes=(-2, -1)), axes=(-2, -1)))`` flattened per input.
    """
    t = as_images(x).double()
    spec = torch.fft.fftshift(torch.fft.fft2(t, dim=(-2, -1)), dim=(-2, -1)).abs()
    return spec.reshape(spec.shape[0], -1).numpy()


class InputMFSDetector(LogisticDetector):
    """Harder et al.'s InputMFS: magnitude Fourier spectrum of the input + logistic regression.

    Needs no model: adversarial perturbations (especially the Linf ones) add energy at high
    spatial frequencies that the spectrum shows directly.

    Parameters
    ----------
    C, max_iter
        Logistic regression (see :class:`~somprobe.detect.base.LogisticDetector`).
    """

    name = "input_mfs"

    def features(self, x, **context) -> np.ndarray:
        return magnitude_spectrum(x)

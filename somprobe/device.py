"""Device resolution, shared by every module that runs torch code (the SOM knows no network, so
this lives apart from :mod:`somprobe.models`)."""
from __future__ import annotations

import torch

from .errors import ModelError

__all__ = ["resolve_device"]

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:1"``, a ``torch.device``) into a device.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` picks CUDA when it is available, else the CPU.

    Returns
    -------
    torch.device
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ModelError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but CUDA is not available: use --device cpu or auto")
    return dev


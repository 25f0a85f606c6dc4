"""Turning a user's device string into a usable :class:`torch.device`, or one clear error.

``Engine.sampling(device=...)`` and every CLI ``--device`` go through
:func:`check_device`, so a typo, a GPU that is not there or an index past the last GPU
is reported before any work starts, never as a CUDA traceback half-way through a run.
"""

from __future__ import annotations

import torch

from diffuse_engine.core.errors import DiffuseError

#: device types the engine runs on (``meta`` and friends hold no data to sample into)
SUPPORTED = ("cpu", "cuda", "mps")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine.

    Raises :class:`~diffuse_engine.core.errors.DiffuseError` naming the device and what is
    allowed when the string does not parse, the type is unsupported, or the backend or
    the index is not available here.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DiffuseError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type not in SUPPORTED:
        raise DiffuseError(f"unsupported device {str(device)!r}; use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffuseError(
                f"device {str(device)!r} requested but CUDA is not available here; use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DiffuseError(
                f"device {str(device)!r}: this machine has {count} CUDA "
                f"device(s), cuda:0..cuda:{count - 1}"
            )
    if dev.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise DiffuseError(
            f"device {str(device)!r} requested but MPS is not available here; use --device cpu"
        )
    return dev

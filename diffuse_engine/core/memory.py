"""Memory estimates made before allocating, so a request too large for the machine is
refused in one line (with the estimate and what is available) instead of ending in an
out-of-memory kill hours later.

Available memory is ``psutil.virtual_memory().available`` for the CPU (and Apple's
unified-memory ``mps``) and ``torch.cuda.mem_get_info`` for a CUDA device. Estimates
are meant as lower bounds of what the request needs (the tensors it must hold at
once), so that a refusal is not a false alarm; they are taken when the check runs,
after whatever is already allocated (a built model's weights are then counted in what
is used and in the estimate: a margin of one copy). Requests that pass may still need
more.
"""

from __future__ import annotations

import math

import torch

from diffuse_engine.core.errors import DiffuseError

#: bytes of one float32 value
FLOAT32 = 4
#: requests below this are not checked: they fit wherever torch runs, and reading what
#: is free (a /proc read on the CPU) would be most of a small sampling call's set-up
SMALL_REQUEST = 32 * 2**20


class ResourceError(DiffuseError):
    """A request needs more memory than the machine has."""


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory free for new tensors on ``device`` (``None`` if it cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil / no /proc: we cannot tell, so we do not refuse
        return None


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``12 MiB``, ``8.0e+03 TiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    if n < 1024:
        return f"{int(n)} B"
    k = min(int(math.log(n, 1024)), len(units) - 1)
    value = n / 1024**k
    return f"{value:.3g} {units[k]}" if value < 1e4 else f"{value:.2g} {units[k]}"


def check_fits(need: float, device: str | torch.device, what: str, hint: str) -> None:
    """Raise :class:`ResourceError` if ``need`` bytes exceed what ``device`` has free:
    ``"{what} needs at least 8 TiB ...; {hint}"``. Requests under
    :data:`SMALL_REQUEST` pass unchecked (running out there is still one clean line)."""
    if need < SMALL_REQUEST:
        return
    have = available_bytes(device)
    if have is not None and need > have:
        raise ResourceError(
            f"{what} needs at least {format_bytes(need)} of memory and {torch.device(device)} "
            f"has {format_bytes(have)} available; {hint}"
        )


def training_bytes(num_params: int, batch_values: int, activations_per_value: int = 8) -> int:
    """A lower bound on training memory: weights, gradients, two AdamW moments and the
    EMA copy (5 float32 copies of the parameters), plus ``activations_per_value`` float32
    tensors of the batch's size (data, noise, perturbed data, output, their gradients)."""
    return FLOAT32 * (5 * num_params + activations_per_value * batch_values)

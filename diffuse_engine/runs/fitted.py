"""A fitted time grid kept as a registry entry, so a schedule fitted once (``gits``'s
pilot batch, Chen et al. 2024 fit theirs once per model too; ``ipndm``'s fitted weights
with it) is reused instead of fitted on every run: ``diffuse run`` and ``diffuse
sample`` write ``fitted.toml`` into the run folder, and ``--registry OUT/fitted.toml
--solver NAME-fitted`` samples on that grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import tomli_w

from diffuse_engine.output.files import atomic_write_bytes

#: the file in a run folder that holds the fitted solver entry
FITTED_FILE = "fitted.toml"
#: fields an explicit ``times`` grid replaces, or that only the fit reads
REPLACED = (
    "name",
    "schedule",
    "steps",
    "eps",
    "nfe",
    "times",
    "step_weights",
    "pilot",
    "pilot_seed",
    "fine",
    "fit_ridge",
    "rho",
)


def fitted_entry_name(solver: str) -> str:
    """The registry name of ``solver``'s entry on its fitted grid."""
    return f"{solver}-fitted"


def fitted_toml(solver: dict[str, Any], fitted: dict[str, Any], *, fitted_on: str) -> str:
    """A registry file with one entry, ``[solver.NAME-fitted]``: the run's resolved
    solver config ``solver`` (its ``name``, ``type`` and fields) with the ``fitted``
    fields (:attr:`SamplingResult.fitted_fields`: ``times``, and ``ipndm``'s fitted
    ``step_weights``), so it samples on them without a pilot.

    Fields the grid replaces (schedule, steps, eps, nfe, the fit's own) are left out, and
    so are unset (``None``) ones, which TOML cannot write, and non-finite floats (EDM's
    ``s_tmax = inf``), which a registry file may not set. Configs refuse non-finite
    input, and every optional field of the solvers that fit a grid defaults to ``None``
    (``--set FIELD=null`` can unset a field, but only ``dpm_adaptive``'s have other
    defaults, and it fits no grid), so the entry gets the same values back."""
    entry = {k: v for k, v in solver.items() if k not in REPLACED and not _default_only(v)}
    entry["times"] = [float(t) for t in fitted["times"]]
    if "step_weights" in fitted:
        entry["step_weights"] = [[float(c) for c in w] for w in fitted["step_weights"]]
    name = fitted_entry_name(solver["name"])
    what = " and with the step weights" if "step_weights" in fitted else ""
    head = (
        f"# {solver['name']!r} on the time grid{what} fitted for {fitted_on}.\n"
        f"# Reuse it without the pilot: --registry THIS_FILE --solver {name}\n"
    )
    return head + tomli_w.dumps({"solver": {name: entry}})


def _default_only(value: Any) -> bool:
    """``None`` or a non-finite float: a value no registry entry can set."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def write_fitted(folder: Path, result) -> str | None:
    """Write ``folder/fitted.toml`` for a :class:`SamplingResult` whose schedule (or
    weights) was fitted; the entry's name. ``None``, and no file, for a solver without a
    ``times`` field (the PC sampler, the ODE solver): it fits a grid but cannot be given
    one."""
    cfg = result.config
    if "times" not in cfg["solver"]:  # the resolved config lists every field
        return None
    shape = tuple(result.samples.shape[1:])
    on = (
        f"score {cfg['score']['name']!r} / SDE {cfg['sde']['name']!r}, samples of shape "
        f"{shape}, {result.samples.dtype} on {result.samples.device.type}"
    )
    text = fitted_toml(cfg["solver"], result.fitted_fields, fitted_on=on)
    atomic_write_bytes(Path(folder) / FITTED_FILE, text.encode())
    return fitted_entry_name(cfg["solver"]["name"])

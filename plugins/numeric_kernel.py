"""The ``numeric`` perturbation kernel: any linear SDE's kernel from its moment ODEs.

Select it for an SDE entry with ``kernel = "numeric"`` (it replaces a closed form,
e.g. to cross-check one); SDEs derived from :class:`diffuse_engine.LinearSDE` use it
automatically. The implementation lives in :mod:`diffuse_engine.components.linear`.
"""

from __future__ import annotations

from diffuse_engine import hookimpl
from diffuse_engine.components.linear import NumericKernel


@hookimpl
def diffuse_register_kernels():
    return [NumericKernel]

"""The ``discrete`` SDE: the VP chain of an explicit ``alphas_cumprod`` table.

``[sde.my_chain] type = "discrete" alphas_cumprod = [0.9999, 0.9997, ...]`` gives the
chain of any DDPM-family noise schedule (step ``i`` of ``N`` at ``t = i / N``; see
:mod:`diffuse_engine.interop.discrete`). The built-in ``ddpm`` SDE is the special case of
linear betas; the ``diffusers`` SDE reads the table from a diffusers scheduler.
"""

from __future__ import annotations

from diffuse_engine import hookimpl
from diffuse_engine.interop.discrete import DiscreteChain


@hookimpl
def diffuse_register_sdes():
    return [DiscreteChain]

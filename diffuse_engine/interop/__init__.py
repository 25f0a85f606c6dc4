"""Adapters between outside models and tools and the engine's components.

* :mod:`~diffuse_engine.interop.kdiffusion`: k-diffusion's denoiser convention both ways,
  :func:`from_denoiser` (a ``D(x, sigma)`` becomes a score model for any SDE with a
  Gaussian kernel) and :func:`to_denoiser` (any score model becomes a ``D(x, sigma)``
  that k-diffusion's samplers accept).
* :mod:`~diffuse_engine.interop.discrete`: :class:`DiscreteChain`, the VP SDE of any
  discrete ``alphas_cumprod`` table (diffusers' DDPM-family schedulers).
* :mod:`~diffuse_engine.interop.diffusers_bridge`: diffusers model folders, their
  schedulers, the engine time of a diffusers timestep, and :func:`like_diffusers`, the
  solver settings that reproduce a diffusers scheduler step for step.

This layer sits above the components and below the services: it imports
``diffuse_engine.components`` and ``diffuse_engine.core`` only. The ``diffusers``
score and SDE plugins (``diffuse_plugins.diffusers_score``) are built on it.
"""

from diffuse_engine.interop.diffusers_bridge import (
    INSTALL_HINT,
    engine_time,
    like_diffusers,
    load_scheduler,
    require_diffusers,
    timestep_of,
)
from diffuse_engine.interop.discrete import DiscreteChain, DiscreteChainConfig
from diffuse_engine.interop.kdiffusion import (
    DenoiserScore,
    from_denoiser,
    time_of_sigma,
    to_denoiser,
)

__all__ = [
    "INSTALL_HINT",
    "DenoiserScore",
    "DiscreteChain",
    "DiscreteChainConfig",
    "engine_time",
    "from_denoiser",
    "like_diffusers",
    "load_scheduler",
    "require_diffusers",
    "time_of_sigma",
    "timestep_of",
    "to_denoiser",
]

"""The likelihood service: exact log-likelihoods through the probability-flow ODE.

Takes built components (an SDE and a score) and settings; never imports the engine.
"""

from diffuse_engine.likelihood.evaluate import (
    LikelihoodConfig,
    LikelihoodResult,
    bits_per_dim,
    dequantize,
    evaluate,
    likelihood_config,
    ode_log_likelihood,
    split_overrides,
)

__all__ = [
    "LikelihoodConfig",
    "LikelihoodResult",
    "bits_per_dim",
    "dequantize",
    "evaluate",
    "likelihood_config",
    "ode_log_likelihood",
    "split_overrides",
]

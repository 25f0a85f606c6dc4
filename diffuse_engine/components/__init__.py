"""Components and their contracts: the base classes every plugin implements (SDE,
perturbation kernel, score model, solver, schedule, loss, dataset, guidance), the
checkpoint format, the exact Gaussian-mixture test bed, and the :class:`Builder` that
turns registry entries into component objects.

Imports only from the foundation (:mod:`diffuse_engine.core`, :mod:`diffuse_engine.output`).
"""

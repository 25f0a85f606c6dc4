"""The ``checkpoint`` score model: a trained network loaded from a checkpoint file.

``[score.NAME] type = "checkpoint" path = "runs/ring/checkpoint.safetensors"`` makes
``score="NAME"`` (``diffuse run --score NAME``) sample with the trained model (EMA weights
unless ``ema = false``). The file is read with safetensors only (no unpickling); the
network is built from the implementation recorded in the checkpoint, looked up in the
engine's catalogue, so third-party networks load the same way. The model is bound to
the SDE it was trained with: sampling with another SDE is an error.
"""

from __future__ import annotations

from pydantic import Field

from diffuse_engine import DiffuseError, ScoreConfig, ScoreModel, hookimpl
from diffuse_engine.components.checkpoint import load_trained


class CheckpointConfig(ScoreConfig):
    path: str = Field(..., description="checkpoint file (or training folder)")
    ema: bool = Field(True, description="sample with the EMA weights")


class CheckpointScore(ScoreModel):
    """A trained score model loaded from a checkpoint (safetensors, no pickle)."""

    name = "checkpoint"
    Config = CheckpointConfig

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        self.inner = None

    def bind_builder(self, builder) -> None:
        """Load the checkpoint through ``builder``'s catalogue (called when it builds us)."""
        self.inner, ckpt = load_trained(
            builder, self.config.path, ema=self.config.ema, sde=self.sde
        )
        self.data_shape = self.inner.data_shape
        # a class-conditional network: its labels, and whether it has an unconditional score
        self.conditional = getattr(self.inner, "conditional", False)
        self.requires_cond = getattr(self.inner, "requires_cond", False)
        self.num_classes = getattr(self.inner, "num_classes", None)
        self.mixture = getattr(self.inner, "mixture", None)
        self.normaliser = getattr(self.inner, "normaliser", None)  # samples in user units
        self.step = ckpt.step

    def _model(self):
        if self.inner is None:
            raise DiffuseError(
                "a checkpoint score model must be built by the engine "
                "(score='NAME' with [score.NAME] type = 'checkpoint')"
            )
        return self.inner

    def to(self, device=None, dtype=None):
        self._model().to(device, dtype)
        return self

    def forward(self, x, t, cond=None):
        if self.conditional:
            return self._model().forward(x, t, cond)
        return self._model().forward(x, t)

    def __call__(self, x, t, cond=None):
        if self.conditional:
            return self._model()(x, t, cond)
        return self._model()(x, t)


@hookimpl
def diffuse_register_score_models():
    return [CheckpointScore]

"""diffusers models as score models: the ``diffusers`` score and SDE.

``[score.my_ddpm] type = "diffusers" path = "./ddpm-cifar10"`` loads a local diffusers
model folder (``config.json`` and ``diffusion_pytorch_model.safetensors``, or a pipeline
folder with ``unet/`` and ``scheduler/``) with ``from_pretrained(...,
local_files_only=True, use_safetensors=True)``: safetensors weights only, never a pickle,
never the network. Its ``scheduler_config.json`` fixes

* the SDE: ``[sde.my_ddpm] type = "diffusers" scheduler = "./ddpm-cifar10"`` is the VP
  chain of the scheduler's own ``alphas_cumprod`` (:mod:`diffuse_engine.interop.discrete`;
  for diffusers' default linear betas the built-in ``ddpm`` SDE is the same chain to
  4e-7 and is accepted too). The model refuses any other SDE, with a one-line error;
* the time map: engine time ``t`` is timestep ``t N - 1``
  (:func:`diffuse_engine.interop.timestep_of`);
* the output: ``prediction_type`` ``epsilon``, ``v_prediction`` and ``sample`` are the
  engine's ``epsilon``, ``v`` and ``x0`` parameterisations, converted through the kernel.

So every engine solver, the likelihood and guidance apply to the model; with
:func:`diffuse_engine.interop.like_diffusers` the engine's ``ddim`` and ``dpm_solver``
take the scheduler's own steps. A model with a learned variance (twice the input
channels out) is read through its first half, the mean, as diffusers' schedulers do.
diffusers is an optional extra (``pip install "diffuse-engine[diffusers]"``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from diffuse_engine import (
    DiffuseError,
    IncompatibleError,
    Parameterisation,
    ScoreConfig,
    ScoreModel,
    SDEConfig,
    hookimpl,
)
from diffuse_engine.interop import DiscreteChain, load_scheduler, require_diffusers, timestep_of
from diffuse_engine.interop.diffusers_bridge import alphas_cumprod_of

#: diffusers' prediction_type -> the engine's parameterisation
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
#: largest relative difference of alphas_cumprod between the model's schedule and an SDE
SAME_TABLE = 1e-5


class DiffusersScoreConfig(ScoreConfig):
    path: str = Field(..., description="local diffusers model folder")
    subfolder: str | None = Field(
        None, description="the model's subfolder (default: unet/ when the folder has one)"
    )
    model_class: str | None = Field(
        None, description="diffusers model class (default: the _class_name of its config.json)"
    )
    parameterisation: Parameterisation | None = Field(
        None, description="default: from the scheduler's prediction_type"
    )


def _model_folder(path: Path, subfolder: str | None) -> tuple[Path, str | None]:
    if subfolder is None and (path / "unet" / "config.json").is_file():
        subfolder = "unet"
    where = path / subfolder if subfolder else path
    if not (where / "config.json").is_file():
        raise DiffuseError(
            f"diffusers model {path}: no config.json in {where}; give a diffusers model "
            "folder (config.json + diffusion_pytorch_model.safetensors) or a pipeline folder"
        )
    return where, subfolder


class DiffusersScore(ScoreModel):
    """A diffusers model (``UNet2DModel`` and kin) read through its scheduler (module doc)."""

    name = "diffusers"
    Config = DiffusersScoreConfig

    def __init__(self, config=None, *, sde, **fields):
        super().__init__(config, sde=sde, **fields)
        diffusers = require_diffusers()
        c = self.config
        path = Path(c.path).expanduser()
        folder, subfolder = _model_folder(path, c.subfolder)
        self.scheduler = load_scheduler(path)
        self.N = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod_of(self.scheduler)
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if c.parameterisation is None:
            if prediction not in PREDICTIONS:
                raise IncompatibleError(
                    f"diffusers model {path}: prediction_type {prediction!r}; the engine "
                    f"reads {', '.join(PREDICTIONS)}"
                )
            self.config = c.model_copy(update={"parameterisation": PREDICTIONS[prediction]})
        cls_name = c.model_class
        if cls_name is None:
            try:
                meta = json.loads((folder / "config.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DiffuseError(
                    f"diffusers model {path}: cannot read {folder / 'config.json'} "
                    f"({type(exc).__name__}: {str(exc)[:120]})"
                ) from None
            if not isinstance(meta, dict):
                raise DiffuseError(
                    f"diffusers model {path}: {folder / 'config.json'} is not a JSON object"
                )
            cls_name = meta.get("_class_name", "UNet2DModel")
        cls = getattr(diffusers, str(cls_name), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise DiffuseError(
                f"diffusers model {path}: {cls_name!r} is not a model class of diffusers "
                f"{diffusers.__version__}"
            )
        try:
            self.net = cls.from_pretrained(
                path,
                subfolder=subfolder,
                local_files_only=True,
                use_safetensors=True,
                low_cpu_mem_usage=False,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DiffuseError(
                f"diffusers model {path}: cannot load safetensors weights ({first})"
            ) from None
        self.net.eval().requires_grad_(False)
        size = self.net.config.sample_size
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.data_shape = (int(self.net.config.in_channels), *map(int, hw))

    def forward(self, x, t):
        out = self.net(x, timestep_of(t, self.N).to(x.dtype))
        out = getattr(out, "sample", out)
        if isinstance(out, tuple):
            out = out[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: the mean is the first half
            out = out[:, : x.shape[1]]
        return out

    @classmethod
    def own_sde(cls, config) -> dict:
        """The VP chain of the folder's own scheduler: what ``engine.sample(score=
        "diffusers", path=...)`` samples with when the call names no SDE."""
        return {"type": "diffusers", "scheduler": config.path}

    def check_sde(self, sde) -> None:
        """Refuse an SDE whose kernel is not the scheduler's ``alphas_cumprod``."""
        t = (torch.arange(self.N, dtype=torch.float64) + 1) / self.N
        try:
            a, _ = sde.marginal(t)
            gap = float((a.double() ** 2 / self.alphas_cumprod - 1).abs().max())
        except (NotImplementedError, RuntimeError):
            gap = float("inf")
        if not gap <= SAME_TABLE:
            raise IncompatibleError(
                f"diffusers model {self.config.path} was trained on its scheduler's "
                f"alphas_cumprod, not SDE {sde.name!r}'s kernel; sample with "
                f'no sde= (the model\'s own scheduler), or sde="diffusers" and '
                f'scheduler="{self.config.path}" (or a [sde.NAME] table with type = "diffusers")'
            )

    def parameters(self):
        return self.net.parameters()

    def to(self, device=None, dtype=None):
        if device is not None:  # apart: diffusers warns about any dtype= argument
            self.net.to(device)
        if dtype is not None:
            self.net.to(dtype)
        return self


class DiffusersChainConfig(SDEConfig):
    # required, but checked when built: the engine validates entries before its overrides
    scheduler: str | None = Field(
        None,
        description="diffusers model folder, scheduler folder or scheduler_config.json",
    )


class DiffusersChain(DiscreteChain):
    """The VP chain of a diffusers scheduler's ``alphas_cumprod`` (see module doc)."""

    name = "diffusers"
    Config = DiffusersChainConfig

    def table(self):
        if self.config.scheduler is None:
            raise DiffuseError(
                'SDE "diffusers" needs scheduler=PATH (a diffusers model folder or its '
                "scheduler_config.json)"
            )
        return alphas_cumprod_of(load_scheduler(self.config.scheduler))


@hookimpl
def diffuse_register_score_models():
    return [DiffusersScore]


@hookimpl
def diffuse_register_sdes():
    return [DiffusersChain]

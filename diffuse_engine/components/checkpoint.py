"""Training checkpoints: one safetensors file, written atomically, loaded without pickle.

A checkpoint holds every tensor of a training state under a prefix, and everything
else as JSON in the safetensors metadata (key ``diffuse``):

========================  =========================================================
tensor key                 contents
========================  =========================================================
``model/NAME``             the backbone's ``state_dict`` (raw, trained weights)
``ema/NAME``               the EMA model's ``state_dict`` (used for sampling)
``optim/I/NAME``           optimiser state tensors of parameter ``I`` (AdamW moments)
``rng/NAME``               generator states (``torch_cpu``, ``data``, ``noise``, ...)
``history/loss``           the loss of every step so far (float64)
========================  =========================================================

The JSON metadata records ``format``, ``step``, the full resolved ``config`` (dataset,
SDE, score model, loss and training settings, each with its implementation ``type``)
and the optimiser's ``param_groups``. Files are written through a temporary file and an
atomic rename (:func:`~diffuse_engine.output.files.atomic_write_bytes`), so a process killed
at any moment leaves the previous checkpoint intact and never a partial one. Loading
uses ``safetensors`` only: no code in a checkpoint is ever executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from diffuse_engine.core.errors import DiffuseError, IncompatibleError
from diffuse_engine.output.files import atomic_write_bytes

FORMAT = "diffuse-checkpoint/1"
#: file name of the latest checkpoint inside a training folder
CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointError(DiffuseError):
    """A checkpoint file is missing, unreadable or not a diffuse-engine checkpoint."""


@dataclass
class Checkpoint:
    """A training state: ``tensors`` grouped by prefix plus JSON ``meta``."""

    step: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    optim: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: torch.Tensor | None = None

    # ---- writing ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}

        def put(prefix: str, d: dict[str, torch.Tensor]) -> None:
            for k, v in d.items():
                tensors[f"{prefix}/{k}"] = v.detach().cpu().contiguous().clone()

        put("model", self.model)
        put("ema", self.ema)
        put("rng", self.rng)
        groups = None
        if self.optim is not None:
            for idx, state in self.optim["state"].items():
                put(
                    f"optim/{idx}",
                    {k: v if torch.is_tensor(v) else torch.tensor(v) for k, v in state.items()},
                )
            groups = self.optim["param_groups"]
        if self.losses is not None:
            tensors["history/loss"] = self.losses.detach().cpu().double().contiguous()
        meta = {"format": FORMAT, "step": self.step, "config": self.config, "param_groups": groups}
        return st_save(tensors, metadata={"diffuse": json.dumps(meta, default=str)})

    def save(self, path: str | Path) -> Path:
        """Atomically write the checkpoint to ``path``."""
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        return path

    # ---- reading ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read a checkpoint file (a folder means its ``checkpoint.safetensors``)."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / CHECKPOINT_NAME
        if not p.is_file():
            raise CheckpointError(
                f"checkpoint {p}: no such file; give a {CHECKPOINT_NAME} file or a training folder"
            )
        try:
            with safe_open(p, framework="pt") as f:
                info = json.loads((f.metadata() or {})["diffuse"])
                if not isinstance(info, dict):  # checked before any tensor is read
                    raise CheckpointError(
                        f"checkpoint {p}: malformed metadata (a JSON "
                        f"{type(info).__name__}, not an object)"
                    )
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except RecursionError:
            raise CheckpointError(
                f"checkpoint {p}: malformed metadata (JSON nested too deeply)"
            ) from None
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {p}: not a diffuse-engine checkpoint ({type(exc).__name__})"
            ) from None
        if info.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint {p}: format {info.get('format')!r}; this version reads {FORMAT!r}"
            )
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            prefix, _, rest = key.partition("/")
            if prefix == "optim":
                idx, _, name = rest.partition("/")
                groups.setdefault("optim", {}).setdefault(idx, {})[name] = v
            else:
                groups.setdefault(prefix, {})[rest] = v
        optim = None
        _check_meta(info, p)
        if info.get("param_groups") is not None:
            try:
                [int(i) for i in groups.get("optim", {})]
            except ValueError:
                raise CheckpointError(
                    f"checkpoint {p}: malformed optimiser state (tensor keys optim/I/NAME "
                    "need an integer I)"
                ) from None
            if not isinstance(info["param_groups"], list) or not all(
                isinstance(g, dict) for g in info["param_groups"]
            ):
                raise CheckpointError(f"checkpoint {p}: malformed metadata (param_groups)")
            optim = {
                "state": {int(i): s for i, s in groups.get("optim", {}).items()},
                "param_groups": info["param_groups"],
            }
        return cls(
            step=int(info["step"]),
            config=info["config"],
            model=groups.get("model", {}),
            ema=groups.get("ema", {}),
            optim=optim,
            rng=groups.get("rng", {}),
            losses=groups.get("history", {}).get("loss"),
        )

    # ---- models ----------------------------------------------------------------------
    def sampling_weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The backbone weights to sample with: the EMA's when present and ``ema``."""
        if ema and self.ema:
            return {
                k.removeprefix("module."): v for k, v in self.ema.items() if k.startswith("module.")
            }
        return self.model


#: the recorded components every checkpoint carries, each ``{"type": name, **fields}``
RECORDED = ("data", "sde", "score", "loss")


def _check_meta(info: dict[str, Any], path: Path) -> None:
    """The metadata's shape (files are untrusted): a clean error, never a KeyError."""
    config = info.get("config")
    step = info.get("step")
    problem = None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problem = f"step {step!r} is not a count"
    elif not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        problem = "no training settings recorded"
    else:
        bad = [
            k
            for k in RECORDED
            if not (isinstance(config.get(k), dict) and isinstance(config[k].get("type"), str))
        ]
        if bad:
            problem = f"no valid {', '.join(bad)} recorded"
    if problem:
        raise CheckpointError(f"checkpoint {path}: malformed metadata ({problem})")


def check_recorded_model(catalogue, ckpt: Checkpoint, sde, where: str, kind: str = "score") -> None:
    """Refuse, before the model is allocated, a recorded score-model config whose weights
    would not be the file's tensors (e.g. metadata asking for ``hidden = 10**7`` beside
    32-wide tensors): the model is built on the ``meta`` device (shapes, no memory) and
    its ``state_dict`` shapes are compared with the checkpoint's. ``kind``: the recorded
    model's kind (``classifier`` for ``task = "classifier"`` runs)."""
    spec = dict(ckpt.config["score"])
    try:
        cls = catalogue.get(kind, spec.pop("type"))
    except DiffuseError as exc:
        raise CheckpointError(f"{where}: recorded score: {exc}") from None
    spec.pop("name", None)
    cfg = recorded_config(cls, spec, f"{where}: recorded score")
    try:
        with torch.device("meta"):
            net = cls(cfg, sde=sde).net
    except DiffuseError:
        raise
    except Exception:  # a model that cannot be built on meta: checked when loading instead
        return
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt.model.items()}
    if want == have:
        return
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensor(s) of the wrong shape (model/{k}: the recorded config "
            f"needs {list(want[k])}, the file holds {list(have[k])})"
        )
    if missing:
        parts.append(f"{len(missing)} missing (model/{missing[0]}, ...)")
    if extra:
        parts.append(f"{len(extra)} unexpected (model/{extra[0]}, ...)")
    raise CheckpointError(
        f"{where}: its weights do not match its recorded score model "
        f"{ckpt.config['score'].get('type')!r}: " + "; ".join(parts)
    )


def check_optimizer_state(optim: dict[str, Any] | None, params: list[torch.Tensor]) -> None:
    """The recorded optimiser state fits ``params``: one state per parameter index, each
    tensor scalar or of its parameter's shape (a wrong shape would otherwise fail at the
    first optimiser step, after the resume was accepted)."""
    if optim is None:
        raise ValueError("no optimiser state recorded")
    for idx, state in optim["state"].items():
        if not 0 <= idx < len(params):
            raise ValueError(f"optimiser state for parameter {idx}; the model has {len(params)}")
        for name, v in state.items():
            if torch.is_tensor(v) and v.dim() and tuple(v.shape) != tuple(params[idx].shape):
                raise ValueError(
                    f"optimiser state optim/{idx}/{name} has shape {list(v.shape)}, its "
                    f"parameter {list(params[idx].shape)}"
                )


def recorded_config(cls, fields: dict[str, Any], where: str):
    """``cls.Config`` from recorded ``fields``; an invalid record is a CheckpointError."""
    from pydantic import ValidationError

    from diffuse_engine.core.registry_text import format_validation_error

    try:
        return cls.Config.model_validate(fields)
    except ValidationError as exc:
        raise CheckpointError(format_validation_error(where, exc, cls.Config)) from None


def sde_spec(sde) -> dict[str, Any]:
    """``{"type": name, **config}`` of an SDE object, as checkpoints record it."""
    return {"type": type(sde).name, **sde.config.model_dump(mode="json")}


def check_same_sde(trained: dict[str, Any], sde, where: str) -> None:
    """Refuse to use a model with an SDE other than the one it was trained for."""
    spec = sde_spec(sde)
    want = {k: v for k, v in trained.items() if k != "name"}
    if spec != want:
        raise IncompatibleError(
            f"{where} was trained with sde {json.dumps(want)} but is used with "
            f"{json.dumps(spec)}; sample with the training SDE (diffuse sample picks it)"
        )


def build_model(
    catalogue, ckpt: Checkpoint, sde, *, ema: bool = True, where: str = "checkpoint",
    kind: str = "score",
):  # fmt: skip
    """The trained model of ``ckpt`` (a score model, or a classifier with
    ``kind="classifier"``; ``config["score"]`` records either), bound to ``sde``."""
    what = "score model" if kind == "score" else kind
    spec = dict(ckpt.config["score"])
    type_name = spec.pop("type")
    spec.pop("name", None)
    check_same_sde(ckpt.config["sde"], sde, where)
    cls = catalogue.get(kind, type_name)
    check_recorded_model(catalogue, ckpt, sde, where, kind=kind)
    model = cls(recorded_config(cls, spec, f"{where}: recorded {kind}"), sde=sde)
    try:
        model.net.load_state_dict(ckpt.sampling_weights(ema))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: weights do not fit {what} {type_name!r} ({str(exc).splitlines()[0]})"
        ) from None
    model.eval()
    model.checkpoint_step = ckpt.step
    model.trained_config = ckpt.config
    return model


def _recorded_normaliser(ckpt: Checkpoint, model, where: str):
    """The data normalisation the run recorded (``None``: none or the identity)."""
    from diffuse_engine.components.normalise import Normaliser

    rec = ckpt.config.get("normalise")
    shape = getattr(model, "data_shape", None)
    if rec is None or shape is None:
        return None
    try:
        norm = Normaliser.from_record(rec, shape)
    except DiffuseError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return None if norm.identity else norm


def load_trained(builder, path: str | Path, *, ema: bool = True, sde=None):
    """``(model, checkpoint)``: the trained model of a checkpoint, bound to its SDE.

    ``builder`` is a :class:`~diffuse_engine.components.builder.Builder` (an ``Engine``
    is accepted too and its builder used). A recorded dataset that knows its exact
    mixture lends it to the model, so runs can score samples against it.
    """
    builder = getattr(builder, "builder", builder)
    ckpt = Checkpoint.load(path)
    sde = sde if sde is not None else builder.build_recorded("sde", ckpt.config["sde"])
    model = build_model(builder.catalogue, ckpt, sde, ema=ema, where=f"checkpoint {path}")
    norm = _recorded_normaliser(ckpt, model, f"checkpoint {path}")
    if norm is not None:  # samples and likelihoods in the user's units
        model.normaliser = norm
    data_spec = ckpt.config.get("data")
    if data_spec is not None and builder.catalogue.has("data", data_spec.get("type", "")):
        mix = getattr(builder.build_recorded("data", data_spec), "mixture", None)
        if mix is not None:
            model.mixture = mix
    return model, ckpt

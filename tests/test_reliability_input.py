"""Bad input, one test per class of mistake: one clear line, exit 2, no traceback.

Registry files, ``--set`` values, run options, devices, data files and score models
that break the contract are each fed to the real CLI (typer's CliRunner on
``build_app()``) or the Python API; a few go through a real ``diffuse`` subprocess so
the console script, the exit status and the absence of a traceback are checked end to
end.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine, RegistryError
from diffuse_engine.cli import build_app

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    return build_app()


def one_line_error(res, *needles: str) -> str:
    """Assert the CLI failed with status 2 and exactly one 'error:' line naming needles."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "reg.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---- registry files ---------------------------------------------------------------
REGISTRY_MISTAKES = {
    # class of mistake: (file text, what the one line must name)
    "malformed TOML": ('[sde.vp]\ntype = "vp"\nbeta_min = \n', ["invalid TOML", "line 3"]),
    "unknown kind": ('[sdee.vp]\ntype = "vp"\n', ["[sdee] unknown table", "allowed kinds: sde"]),
    "unknown field": (
        '[sde.vp]\ntype = "vp"\nbeta_mni = 0.2\n',
        ["[sde.vp] beta_mni: unknown field", "allowed: beta_max, beta_min"],
    ),
    "wrong type": (
        '[sde.vp]\ntype = "vp"\nbeta_min = "small"\n',
        ["[sde.vp] beta_min", "valid number", "'small'"],
    ),
    "out of range": (
        '[solver.pc]\ntype = "pc"\nsteps = 0\n',
        ["[solver.pc] steps", "greater than or equal to 1", "got 0"],
    ),
    "inconsistent fields": (
        '[sde.vp]\ntype = "vp"\nbeta_min = 30.0\n',
        ["[sde.vp]", "beta_min (30.0) must be < beta_max (20.0)"],
    ),
    "infinite value": (
        '[sde.vp]\ntype = "vp"\nbeta_max = inf\n',
        ["[sde.vp] beta_max", "finite number"],
    ),
    "unknown implementation": (
        '[sde.mine]\ntype = "vpp"\n',
        ["[sde.mine] type: unknown sde 'vpp'", "choices:", "vp"],
    ),
    "type not a string": (
        '[sde.mine]\ntype = ["vp"]\n',
        ["[sde.mine] type: must be a string", "choices:"],
    ),
    "missing type": ("[sde.mine]\nbeta_min = 0.2\n", ["[sde.mine] type: missing", "choices:"]),
    "kind is not a table of entries": ("sde = 3\n", ["[sde] must hold named entries"]),
    "unknown component reference": (
        '[solver.pc]\ntype = "pc"\npredictor = "magic"\n',
        ["[solver.pc] predictor", "unknown predictor 'magic'", "choices:"],
    ),
    "preset naming a missing entry": (
        '[run.mine]\nsde = "nope"\n',
        ["[run.mine] sde", "no sde entry named 'nope'"],
    ),
    "preset field out of range": ("[run.mine]\nn = -3\n", ["[run.mine] n", "got -3"]),
}


@pytest.mark.parametrize("mistake", sorted(REGISTRY_MISTAKES))
def test_registry_file_mistake_is_one_line(app, tmp_path, mistake):
    text, needles = REGISTRY_MISTAKES[mistake]
    path = write(tmp_path, text)
    line = one_line_error(runner.invoke(app, ["registry", "check", str(path)]), *needles)
    assert str(path) in line  # the file is always named


def test_missing_registry_file(app, tmp_path):
    res = runner.invoke(app, ["run", "--registry", str(tmp_path / "nope.toml"), "--dry-run"])
    one_line_error(res, "nope.toml", "cannot read registry file")


def test_registry_mistakes_raise_registry_error_in_python(tmp_path):
    for mistake, (text, needles) in REGISTRY_MISTAKES.items():
        with pytest.raises(RegistryError) as info:
            Engine(registry=write(tmp_path, text, f"{len(mistake)}.toml"), autoload=False)
        assert all(n in str(info.value) for n in needles), (mistake, str(info.value))


# ---- --set values -------------------------------------------------------------------
SET_MISTAKES = {
    "no equals sign": (["--set", "steps"], ["expected KEY=VALUE"]),
    "empty key": (["--set", "=3"], ["expected KEY=VALUE"]),
    "unknown field": (
        ["--set", "stepz=3"],
        ["no chosen entry has that field", "allowed:", "solver.steps"],
    ),
    "wrong type": (["--set", "steps=many"], ["[solver.pc] steps", "valid integer", "'many'"]),
    "out of range": (["--set", "snr=-1"], ["[solver.pc] snr", "greater than 0"]),
    # pydantic would read true as 1: a one-evaluation run nobody asked for
    "boolean for a number": (["--set", "nfe=true"], ["[solver.pc] nfe", "not a boolean"]),
    "not a finite number": (["--set", "snr=nan"], ["snr"]),
    "kind not in this call": (["--set", "loss.foo=1"], ["'loss' is not part of this call"]),
    "qualified, unknown field": (
        ["--set", "sde.vp.betamax=3"],
        ["--set sde.vp.betamax", "unknown field"],
    ),
    "qualified, unknown kind": (["--set", "sdf.vp.beta_max=3"], ["[sdf] unknown table"]),
    "qualified, non-string type": (
        ["--set", "sde.vp.type=[1]"],
        ["--set sde.vp.type", "must be a string"],
    ),
}


@pytest.mark.parametrize("mistake", sorted(SET_MISTAKES))
def test_set_mistake_is_one_line(app, tmp_path, mistake):
    args, needles = SET_MISTAKES[mistake]
    res = runner.invoke(app, ["run", "-n", "10", "--out", str(tmp_path / "o"), "-q", *args])
    one_line_error(res, *needles)
    assert not list(tmp_path.iterdir())  # nothing written


# ---- run options ------------------------------------------------------------------------
OPTION_MISTAKES = {
    "zero samples": (["-n", "0"], ["--n must be >= 1, got 0"]),
    "zero steps": (["--steps", "0"], ["--steps must be >= 1, got 0"]),
    # named as the option, not as the best-at-budget entry it would have picked
    "zero nfe": (["--nfe", "0"], ["--nfe must be >= 1, got 0"]),
    "negative nfe": (["--nfe", "-4"], ["--nfe must be >= 1, got -4"]),
    # refused before the time grid of 10**12 floats is built (it would exhaust memory)
    "absurd steps": (["--steps", str(10**12)], ["steps", "less than or equal to 10000000"]),
    "seed out of range": (["--seed", str(2**70)], ["seed", "less than"]),
    "unknown preset": (["--preset", "nope"], ["no run entry named 'nope'", "default"]),
    "unknown sde": (["--sde", "vpp"], ["no sde entry named 'vpp'", "implementations:"]),
    "unknown sample format": (["--format", "csv"], ["unknown sample format 'csv'", "pt, npz"]),
    "unknown device": (["--device", "gpu0"], ["unknown device 'gpu0'", "cpu, cuda"]),
    "unsupported device": (["--device", "meta"], ["unsupported device 'meta'"]),
}


@pytest.mark.parametrize("mistake", sorted(OPTION_MISTAKES))
def test_run_option_mistake_is_one_line(app, tmp_path, mistake):
    args, needles = OPTION_MISTAKES[mistake]
    res = runner.invoke(
        app, ["run", "-n", "10", "--steps", "2", "-q", "--out", str(tmp_path / "o"), *args]
    )
    one_line_error(res, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(app, tmp_path):
    res = runner.invoke(app, ["run", "--device", "cuda", "--out", str(tmp_path / "o")])
    one_line_error(res, "'cuda'", "CUDA is not available", "--device cpu")


def test_cuda_index_past_the_last_gpu(app, tmp_path):
    res = runner.invoke(app, ["run", "--device", "cuda:99", "--out", str(tmp_path / "o")])
    one_line_error(res, "'cuda:99'")


def test_out_is_a_file_or_cannot_be_created(app, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    base = ["run", "-n", "10", "--steps", "2", "-q"]
    one_line_error(
        runner.invoke(app, base + ["--out", str(afile), "--overwrite"]),
        "exists and is not a folder",
    )
    assert afile.read_text() == "mine"
    one_line_error(
        runner.invoke(app, base + ["--out", str(afile / "sub")]), "cannot create run folder"
    )


def test_engine_rejects_bad_device_and_seed():
    engine = Engine(autoload=False)
    for kwargs, needle in (
        (dict(device="tpu"), "unknown device"),
        (dict(device="cuda:99"), "cuda:99"),
        (dict(seed=-1), "seed must be in"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(check_every=-2), "check_every"),
    ):
        with pytest.raises(DiffuseError, match=needle):
            engine.sample(shape=(4, 2), steps=2, **kwargs)


# ---- score models that break the contract ---------------------------------------------
SCORE_MISTAKES = {
    "wrong shape": (lambda x, t: x[:, :1], "shape (4, 1)"),
    "wrong dtype": (lambda x, t: (-x).double(), "dtype torch.float64"),
    "not a tensor": (lambda x, t: (-x).numpy(), "returned ndarray"),
    "batch dropped": (lambda x, t: -x[0], "shape (2,)"),
}


@pytest.mark.parametrize("mistake", sorted(SCORE_MISTAKES))
def test_score_model_breaking_the_contract(mistake):
    fn, needle = SCORE_MISTAKES[mistake]
    with pytest.raises(DiffuseError) as info:
        Engine(autoload=False).sample(score=fn, shape=(4, 2), steps=2)
    msg = str(info.value)
    assert needle in msg and "expected a tensor of the input's shape (4, 2)" in msg, msg
    assert "\n" not in msg


def test_score_on_the_wrong_device():
    def meta_score(x, t):
        return torch.empty_like(x, device="meta")

    with pytest.raises(DiffuseError, match="on meta; expected .* on cpu"):
        Engine(autoload=False).sample(score=meta_score, shape=(4, 2), steps=2)


# ---- data files of the wrong shape or dtype ---------------------------------------------
def _save_npy(path, arr):
    np.save(path, arr, allow_pickle=True)
    return path


DATA_MISTAKES = {
    "one-dimensional array": (lambda p: _save_npy(p / "a.npy", np.zeros(5)), "shape (5,)"),
    "empty array": (lambda p: _save_npy(p / "a.npy", np.zeros((0, 2))), "n >= 1"),
    "complex dtype": (
        lambda p: _save_npy(p / "a.npy", np.zeros((4, 2), np.complex64)),
        "holds complex values",
    ),
    "boolean dtype": (
        lambda p: _save_npy(p / "a.npy", np.zeros((4, 2), bool)),
        "holds boolean values",
    ),
    "object array (needs pickle)": (
        lambda p: _save_npy(p / "a.npy", np.array([{"a": 1}, None], dtype=object)),
        "holds object (pickled) values",
    ),
    "NaN values": (lambda p: _save_npy(p / "a.npy", np.full((4, 2), np.nan)), "NaN or Inf"),
    "not a tensor in .pt": (
        lambda p: (torch.save({"x": torch.zeros(3, 2)}, p / "a.pt"), p / "a.pt")[1],
        "expected a single tensor",
    ),
    "unsupported suffix": (
        lambda p: (p / "a.csv").write_text("1,2\n") and p / "a.csv",
        "unsupported suffix '.csv'",
    ),
    "missing path": (lambda p: p / "missing.npy", "missing.npy"),
    "corrupt file": (
        lambda p: (p / "a.npy").write_bytes(b"not numpy") and p / "a.npy",
        "cannot read as .npy",
    ),
}


@pytest.mark.parametrize("mistake", sorted(DATA_MISTAKES))
def test_data_file_mistake(tmp_path, mistake):
    engine = Engine(autoload=False)
    if not engine.catalogue.has("data", "file"):
        pytest.skip("the 'file' dataset plugin is not installed")
    make, needle = DATA_MISTAKES[mistake]
    path = make(tmp_path)
    with pytest.raises(DiffuseError) as info:
        engine.build("data", "file", path=str(path)).sample(2)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


# ---- the real console script --------------------------------------------------------------
def _diffuse(*args, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "diffuse_engine", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_subprocess_bad_registry_file_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, '[sde.vp]\ntype = "vp"\nbeta_min = "x"\n')
    res = _diffuse("registry", "check", str(path))
    assert res.returncode == 2, res
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(f"error: {path}: [sde.vp] beta_min")
    assert "Traceback" not in res.stderr + res.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "-n", "many"], "Invalid value for '--n'"),
        (["run", "--bogus"], "No such option: --bogus"),
    ],
)
def test_subprocess_option_errors_are_one_line(args, needle):
    """Through the console script, click's usage errors are one line too (exit 2)."""
    res = _diffuse(*args)
    assert res.returncode == 2, res
    assert res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith("error: ") and needle in res.stderr


def test_subprocess_debug_shows_the_traceback(tmp_path):
    res = _diffuse("run", "--device", "nonsense", "--debug", "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "Traceback" in res.stderr
    assert "DiffuseError: unknown device 'nonsense'" in res.stderr


def test_train_device_from_settings_is_checked(app, tmp_path):
    res = runner.invoke(
        app, ["train", "--steps", "1", "-q", "--out", str(tmp_path / "t"), "--set", "device=tpu"]
    )
    one_line_error(res, "unknown device 'tpu'")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(shape=(-5, 2)), "n >= 1"),
        (dict(shape=(0, 2)), "n >= 1"),
        (dict(shape=(4,)), "(n, *dims)"),
        (dict(shape="ab"), "of integers"),
        (dict(shape=(4, 3)), "this score model's data are (2,)"),
        (dict(shape=(4, 2, 1)), "this score model's data are (2,)"),
        (dict(shape=(4, 2), dtype=torch.int64), "floating-point"),
    ],
)
def test_engine_rejects_bad_shapes_and_dtypes(kwargs, needle):
    with pytest.raises(DiffuseError) as info:
        Engine(autoload=False).sample(steps=2, **kwargs)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        ["run", "-n", "many"],
        ["likelihood", "--seed", str(2**70)],
        ["sample", "--checkpoint", "x", "--steps", "1.5"],
    ],
)
def test_option_type_errors_are_usage_errors(app, args):
    """Values of the wrong type for an option: typer's usage message, exit 2, no traceback."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Invalid value for" in res.output, res.output
    assert "Traceback" not in res.output

"""The example third-party plugin, installed by pip as a real distribution.

The plugin is installed into a throw-away virtual environment layered on the test
environment (its ``.pth`` file adds this interpreter's site-packages, so torch and the
engine come from here), with pip's ``--python`` option: a real wheel build and install,
entry points found through ``importlib.metadata``, then a real ``pip uninstall``. The
test environment itself is never modified, so tests running in parallel under xdist
never see the plugin come and go, and nothing needs a lock.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from diffuse_engine import Engine
from diffuse_engine.testbed.conformance import quality_checks

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffuse-plugin-example"


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_layered_env(root: Path) -> Path:
    """A venv without pip whose site-packages also loads ours (``.pth`` + addsitedir)."""
    env = root / "env"
    venv.create(env, with_pip=False)
    py = _python(env)
    purelib = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
    Path(purelib, "_diffuse_test_parent.pth").write_text(lines)
    return py


def run(py: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DIFFUSE_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["COLUMNS"] = "250"  # rich tables: no truncated names
    return subprocess.run(
        [str(py), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def pip(py: Path, *args: str, cwd: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            *args,
            "--disable-pip-version-check",
            "-q",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def install_example(tmp_path: Path) -> Path:
    src = tmp_path / "src"  # build from a copy: pip writes build files next to the source
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    py = make_layered_env(tmp_path)
    # build with this environment's setuptools (offline) when it has one; otherwise let
    # pip fetch it into an isolated build environment (Python >= 3.12 venvs lack it)
    has_setuptools = importlib.util.find_spec("setuptools") is not None
    offline = ["--no-build-isolation", "--no-index"] if has_setuptools else []
    pip(py, "install", "--no-deps", *offline, str(src), cwd=tmp_path)
    return py


def test_example_plugin_install_use_and_uninstall(tmp_path):
    py = install_example(tmp_path)

    # discovered through its entry point, with its distribution and version
    proc = run(py, "-m", "diffuse_engine", "plugins", "--verbose", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "diffuse-plugin-example" in out and "0.1.0" in out
    for impl in ("example_ou", "example_ddim", "example_mlp"):
        assert impl in out, impl

    # its CLI command
    proc = run(py, "-m", "diffuse_engine", "example-info", "--theta", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert len(rows) == 4
    for _, a, a_ref, s, s_ref in rows:  # numeric kernel vs closed form, printed to 6 digits
        assert abs(float(a) / float(a_ref) - 1) < 1e-5 and abs(float(s) / float(s_ref) - 1) < 1e-5

    # its SDE and its solver through `diffuse run`, scored against the exact mixture
    run_dir = tmp_path / "run"
    proc = run(
        py,
        "-m",
        "diffuse_engine",
        "run",
        "--sde",
        "example_ou",
        "--solver",
        "example_ddim",
        "--steps",
        "100",
        "-n",
        "4000",
        "--quiet",
        "--out",
        str(run_dir),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    samples = torch.load(run_dir / "samples.pt")
    assert samples.shape == (4000, 2)
    mixture = (
        Engine(autoload=False)
        .build("score", "gmm", sde=Engine(autoload=False).build("sde", "vp"))
        .mixture
    )
    checks = quality_checks(samples, mixture, z=5.0)  # 5 standard errors at n = 4000
    assert all(c.passed for c in checks), [(c.check, c.measured) for c in checks]

    # its network trains on its SDE (numeric kernel) and the checkpoint samples with its
    # solver: training and sampling of a plugin model need nothing from the engine's code
    ckpt = tmp_path / "train"
    proc = run(
        py,
        "-m",
        "diffuse_engine",
        "train",
        "--data",
        "gmm",
        "--sde",
        "example_ou",
        "--model",
        "example_mlp",
        "--steps",
        "20",
        "--quiet",
        "--out",
        str(ckpt),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run(
        py,
        "-m",
        "diffuse_engine",
        "sample",
        "--checkpoint",
        str(ckpt),
        "--solver",
        "example_ddim",
        "--steps",
        "10",
        "-n",
        "64",
        "--quiet",
        "--out",
        str(tmp_path / "sampled"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # uninstall: the engine is back to its built-ins, and says what is missing
    pip(py, "uninstall", "-y", "diffuse-plugin-example", cwd=tmp_path)
    proc = run(py, "-m", "diffuse_engine", "plugins", cwd=tmp_path)
    assert proc.returncode == 0 and "diffuse-plugin-example" not in proc.stdout
    assert "example_ou" not in proc.stdout
    proc = run(py, "-m", "diffuse_engine", "run", "--sde", "example_ou", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown sde 'example_ou'" in proc.stderr or "example_ou" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run(py, "-m", "diffuse_engine", "example-info", cwd=tmp_path)
    assert proc.returncode != 0


@pytest.mark.slow
def test_example_plugins_own_suite_passes_with_the_pytest_fixture(tmp_path):
    """The example's tests use the engine's pytest11 fixture ``diffuse_check``."""
    py = install_example(tmp_path)
    proc = run(
        py,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        str(tmp_path / "src" / "tests"),
        cwd=tmp_path / "src",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout

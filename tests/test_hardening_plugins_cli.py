"""A broken plugin never takes down every command; mistakes are reported where the user
made them, with the closest names; the command line's small promises (``--nproc`` in
``run --help``, ``check --steps 0``, ``bench --out``, tables that do not wrap or eat
brackets when piped)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from importlib import metadata

import pytest
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine, ScoreModel, module_plugin
from diffuse_engine.cli import build_app, common

runner = CliRunner()

PLUGINS = {
    "clash_plugin": '''
        import torch
        from diffuse_engine import SDE, hookimpl

        class Mine(SDE):
            """An SDE that takes a built-in's name."""
            name = "vp"
            def drift_coeff(self, t): return torch.zeros_like(t)
            def diffusion(self, t): return torch.ones_like(t)

        @hookimpl
        def diffuse_register_sdes():
            return [Mine]
    ''',
    "dict_plugin": """
        from diffuse_engine import hookimpl

        @hookimpl
        def diffuse_register_solvers():
            return {"not": "a list"}
    """,
}


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    """Two installed distributions whose plugins are broken (fake entry points)."""
    import diffuse_engine.core.plugins as plugins_mod

    for name, code in PLUGINS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    real = metadata.entry_points

    class Dist:
        def __init__(self, name):
            self.metadata, self.version = {"Name": name}, "1.0"

    def entry_points(group=None):
        eps = list(real(group=group))
        if group == plugins_mod.ENTRY_POINT_GROUP:
            for name in PLUGINS:
                ep = metadata.EntryPoint(name, name, group)
                object.__setattr__(ep, "dist", Dist(name.replace("_", "-")))
                eps.append(ep)
        return eps

    monkeypatch.setattr(plugins_mod.metadata, "entry_points", entry_points)
    monkeypatch.setattr(common.STATE, "reported", set())


def test_broken_plugins_are_reported_skipped_and_the_rest_load(broken_plugins):
    engine = Engine()
    errors = {i.name: i.error for i in engine.plugin_infos if not i.ok}
    assert (
        "its sde 'vp' (clash_plugin.Mine) clashes with sde 'vp' from plugin 'vp'"
        in (errors["clash_plugin"])
    )
    assert "diffuse_register_solvers returned dict" in errors["dict_plugin"]
    assert engine.catalogue.get("sde", "vp").__qualname__ == "VPSDE"  # the built-in kept it
    assert "pc" in engine.catalogue.names("solver")


def test_plugins_command_always_runs_and_names_the_culprits(broken_plugins, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # pytest-xdist workers set 80
    res = runner.invoke(build_app(), ["plugins"])
    assert res.exit_code == 1, res.output  # something failed: say so in the status too
    assert "clash-plugin" in res.stdout and "dict-plugin" in res.stdout
    assert "FAILED: skipped: its sde 'vp'" in res.stdout
    assert "Traceback" not in res.output


def test_other_commands_warn_once_at_start_up_and_work(broken_plugins, tmp_path):
    res = runner.invoke(build_app(), ["run", "-n", "8", "--steps", "2", "-q", "--out",
                                      str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 0, res.output
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning: plugin")]
    assert len(warnings) == 2, res.stderr
    assert any(
        "plugin 'clash_plugin' (clash-plugin 1.0, entry point clash_plugin = clash_plugin) did "
        "not load: skipped: its sde 'vp'" in w
        for w in warnings
    ), warnings


def test_a_trainable_model_breaking_the_contract_is_refused_when_it_loads():
    class NoDtype(ScoreModel):
        """Trainable, but its to() cannot change dtype."""

        name = "nodtype"
        needs_training = True

        def parameters(self):
            return iter(())

        def to(self, device):
            return self

        def train(self, mode=True):
            return self

        def eval(self):
            return self

        def with_net(self, net):
            return self

    engine = Engine(plugins=[module_plugin(diffuse_register_score_models=lambda: [NoDtype])],
                    autoload=False)  # fmt: skip
    (info,) = [i for i in engine.plugin_infos if not i.ok]
    assert "trainable score model 'nodtype' has to() without a dtype= argument" in info.error
    assert "nodtype" not in engine.catalogue.names("score")


@pytest.mark.parametrize("sets", [[5], 5, "steps=3", [None], [b"x=1"]])
def test_engine_type_mistakes_raise_the_engine_error(sets):
    with pytest.raises(DiffuseError, match="sets must be"):
        Engine(sets=sets, autoload=False)


# ---- mistakes named where they were made, with the closest names -----------------------
@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--model", "mpl"], "--model 'mpl': no score entry named 'mpl' (did you mean "
                                      "'mlp'?)"),
        (["train", "--data", "swisroll"], "--data 'swisroll': no data entry named 'swisroll' "
                                          "(did you mean 'swissroll'?)"),
        (["run", "--sde", "vpp"], "--sde 'vpp': no sde entry named 'vpp' (did you mean 'vp'"),
        (["run", "--solver", "dpm_solverpp"], "(did you mean 'dpm_solver_pp'"),
        (["run", "--set", "stepz=3"], "(did you mean 'steps'?)"),
        (["check", "vp", "--solver", "odee"], "--solver 'odee'"),
        (["run", "--set", "predictor=reverse_difusion"], "(did you mean 'reverse_diffusion'?)"),
        (["train", "--set", "embedding=fourer"], "(got 'fourer') (did you mean 'fourier'?)"),
        (["likelihood", "--set", "rtoll=1e-3"], "(did you mean 'rtol' or 'atol'?)"),
        (["bench", "--schedules", "karas"], "(did you mean 'karras'?)"),
    ],
)  # fmt: skip
def test_unknown_names_say_where_and_suggest(tmp_path, args, needle):
    out = ["--out", str(tmp_path / "o")] if args[0] in ("run", "train", "bench") else []
    res = runner.invoke(build_app(), [*args, *out])
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "[train.default]" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_check_with_zero_steps_is_refused_before_any_check():
    t0 = time.perf_counter()
    res = runner.invoke(build_app(), ["check", "vp", "--steps", "0"])
    assert res.exit_code == 2 and "--steps" in res.output, res.output
    assert "PASS" not in res.output and "FAIL" not in res.output
    assert time.perf_counter() - t0 < 5  # nothing ran (a check run takes far longer)


def test_run_help_lists_nproc():
    res = runner.invoke(build_app(), ["run", "--help"])
    assert res.exit_code == 0 and "--nproc" in res.output


def test_bench_writes_into_its_run_folder_not_docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--solvers", "ode", "--schedules", "uniform", "--nfe", "5",
            "--problems", "gmm", "-n", "200", "--n-ref", "50", "--no-overhead"]  # fmt: skip
    res = runner.invoke(build_app(), [*args, "--out", "b"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"benchmarks.jsonl", "benchmarks.md"}
    assert not (tmp_path / "docs").exists()
    res = runner.invoke(build_app(), args)  # no --out: a fresh runs/bench-TIME
    assert res.exit_code == 0, res.output
    made = [p.name[:6] for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert made == ["bench-"]
    assert not (tmp_path / "docs").exists()


def test_piped_tables_neither_wrap_nor_eat_brackets():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = subprocess.run([sys.executable, "-m", "diffuse_engine", "plugins"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode in (0, 1), res.stderr
    line = next(x for x in res.stdout.splitlines() if "euler_maruyama" in x)
    assert "Euler-Maruyama on the reverse SDE ``dx = [f - g^2 s] dt + g dw_bar``." in line
    assert len(line) > 80  # one row, not wrapped at the 80 columns of a non-terminal

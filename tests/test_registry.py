"""The declarative registry: merging, validation and one-line errors."""

from __future__ import annotations

import pytest

from diffuse_engine import Engine, RegistryError
from diffuse_engine.core.registry import parse_assignment
from diffuse_engine.core.registry_text import parse_value


def write(tmp_path, text, name="my.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_registry_has_paper_defaults(engine):
    _, vp = engine.resolve("sde", "vp")
    _, ve = engine.resolve("sde", "ve")
    _, ddpm = engine.resolve("sde", "ddpm")
    assert (vp.beta_min, vp.beta_max) == (0.1, 20.0)
    assert (ve.sigma_min, ve.sigma_max) == (0.01, 50.0)
    assert (ddpm.N, ddpm.beta_1, ddpm.beta_N) == (1000, 1e-4, 0.02)
    _, pc = engine.resolve("solver", "pc")
    assert (pc.predictor, pc.corrector, pc.snr, pc.steps) == (
        "reverse_diffusion",
        "langevin",
        0.16,
        1000,
    )


def test_user_file_merges_field_by_field(tmp_path):
    p = write(tmp_path, '[sde.vp]\nbeta_max = 10.0\n\n[sde.fast]\ntype = "vp"\nbeta_min = 0.2\n')
    e = Engine(registry=p, autoload=False)
    assert e.resolve("sde", "vp")[1].beta_max == 10.0
    assert e.resolve("sde", "vp")[1].beta_min == 0.1  # kept from the default
    assert e.resolve("sde", "fast")[1].beta_min == 0.2


def test_different_type_replaces_entry(tmp_path):
    p = write(tmp_path, '[solver.pc]\ntype = "ode"\nmethod = "heun"\n')
    cls, cfg = Engine(registry=p, autoload=False).resolve("solver", "pc")
    assert cls.name == "ode" and cfg.method == "heun"


def test_sets_qualified_and_unqualified(engine):
    e = Engine(autoload=False, sets=["sde.vp.beta_max=5", "steps=7"])
    assert e.resolve("sde", "vp")[1].beta_max == 5.0
    r = e.sampling(score="gmm", sde="vp", solver="pc", shape=4, corrector="none", denoise=False)
    assert r.nfe == 7


@pytest.mark.parametrize("item", ["solver.dpm_adaptive_ms.sigma_end=null", "sigma_end=null"])
def test_a_bare_null_unsets_a_field(item):
    """TOML has no null, so ``--set FIELD=null`` is how an entry's value is taken back
    (``dpm_adaptive_ms`` sets ``sigma_end``; without it the run ends at ``eps``)."""
    assert Engine().resolve("solver", "dpm_adaptive_ms")[1].sigma_end == 3e-3
    e = Engine(sets=[item])
    r = e.sampling(score="gmm", solver="dpm_adaptive_ms", shape=300)
    assert r.config["solver"]["sigma_end"] is None
    assert parse_value('"null"') == "null"  # quoted, it is the string


def test_null_for_a_field_that_needs_a_value_names_it():
    e = Engine(sets=["steps=null"])
    with pytest.raises(RegistryError, match=r"steps: Input should be a valid integer \(got None\)"):
        e.sampling(score="gmm", solver="ddim", shape=4)


def test_implementation_name_without_entry_gets_defaults(engine):
    cls, cfg = engine.resolve("solver", "ode")
    assert cfg.method == "rk4"  # from the default registry's [solver.ode]
    cls, cfg = engine.resolve("sde", "subvp")
    assert cls.name == "subvp"


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "[sde.vp]\nbeta_min = 30.0\n",
            r"my.toml: \[sde.vp\] .*beta_min \(30.0\) must be < beta_max",
        ),
        (
            "[sde.vp]\nbeta_min = -1\n",
            r"my.toml: \[sde.vp\] beta_min: Input should be greater than 0 \(got -1\)",
        ),
        (
            "[sde.vp]\nbeta = 1\n",
            r"my.toml: \[sde.vp\] beta: unknown field \(did you mean 'beta_min' or 'beta_max'\?\); "
            r"allowed: beta_max, beta_min, kernel",
        ),
        ('[sde.vp]\nbeta_min = "a lot"\n', r"\[sde.vp\] beta_min: Input should be a valid number"),
        (
            '[sde.x]\ntype = "vq"\n',
            r"my.toml: \[sde.x\] type: unknown sde 'vq'; choices: .*ddpm.*subvp.*ve.*vp",
        ),
        (
            '[sdee.x]\ntype = "vp"\n',
            r"my.toml: \[sdee\] unknown table \(did you mean 'sde'\?\); allowed kinds: sde",
        ),
        (
            "[solver.pc]\nsteps = 0\n",
            r"\[solver.pc\] steps: Input should be greater than or equal to 1",
        ),
        (
            '[solver.pc]\npredictor = "leapfrog"\n',
            r"\[solver.pc\] predictor: unknown predictor 'leapfrog'; "
            r"choices: ancestral, euler_maruyama",
        ),
        ("[sde.ve]\nsigma_min = 0\n", r"\[sde.ve\] sigma_min: Input should be greater than 0"),
        ('[run.default]\nsde = "nope"\n', r"\[run.default\] sde: no sde entry named 'nope'"),
        ("[sde.vp\nbeta = 1\n", r"my.toml: invalid TOML: .*line 1"),
        ("sde = 3\n", r"\[sde\] must hold named entries"),
    ],
)
def test_registry_errors_name_file_table_field_and_choices(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(RegistryError, match=expected) as exc:
        Engine(registry=p, autoload=False)
    assert "\n" not in str(exc.value)


def test_override_errors(engine):
    with pytest.raises(
        RegistryError,
        match=r"override 'stepz': no chosen entry has that field \(did you mean 'steps'\?\); "
        r"allowed: .*solver.steps",
    ):
        engine.sample(score="gmm", shape=4, stepz=3)
    with pytest.raises(
        RegistryError,
        match=r"solver.steps: Input should be greater than or equal to 1|steps: Input should be",
    ):
        engine.sample(score="gmm", shape=4, steps=0)


def test_parse_assignment():
    assert parse_assignment("snr=0.2") == ("snr", 0.2)
    assert parse_assignment("predictor=ancestral") == ("predictor", "ancestral")
    assert parse_assignment("denoise=false") == ("denoise", False)
    assert parse_assignment("stds=[0.1, 0.2]") == ("stds", [0.1, 0.2])
    with pytest.raises(RegistryError, match="expected KEY=VALUE"):
        parse_assignment("snr")


def test_engine_sets_skip_calls_without_the_field_but_catch_typos():
    """An engine-wide set applies to each call that has the field (``hidden`` to a
    network, not to the exact gmm score); a field no installed component has is a typo."""
    e = Engine(autoload=False, sets=["hidden=32"])
    assert (
        e.sampling(score="gmm", shape=4, steps=2).nfe == 5
    )  # PC: 2 x (corrector + predictor) + denoise
    e = Engine(autoload=False, sets=["stpes=7"])
    with pytest.raises(RegistryError, match="override 'stpes': no chosen entry"):
        e.sampling(score="gmm", shape=4, steps=2)


def test_registry_show_leaves_a_field_unset_by_null_out():
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    res = CliRunner().invoke(
        build_app(), ["registry", "show", "--set", "solver.dpm_adaptive_ms.sigma_end=null"]
    )
    assert res.exit_code == 0, res.output
    entry = res.output.split("[solver.dpm_adaptive_ms]")[1].split("\n[")[0]
    assert "ntol = " in entry and "sigma_end" not in entry


@pytest.mark.parametrize(
    ("text", "why"),
    [("[1, null]", "Invalid value.*null is a value only on its own"), ("[1, 2", "Unclosed")],
)
def test_a_set_value_that_opens_an_array_but_is_not_toml_is_refused(text, why):
    """Taken as a bare string, ``[1, null]`` would reach a list field as text."""
    with pytest.raises(RegistryError, match=rf"--set value '\[1.*' is not a TOML value: {why}"):
        parse_value(text)
    assert parse_value("pc") == "pc"  # a bare word is still a string

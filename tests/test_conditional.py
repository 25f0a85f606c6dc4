"""Conditional generation against closed forms (the built-in mixture knows its modes).

The class-conditional score of mode ``k`` is that Gaussian's score under the kernel, and
the exact classifier is the softmax of the per-mode log-densities of ``x_t``. So:

* sampling with the exact conditional score recovers mode ``k``;
* classifier guidance with the exact classifier and the exact unconditional score at
  scale 1 is Bayes' rule: the same law, and from the same noise the same samples;
* classifier-free guidance at scale 0 is conditional sampling, and larger scales
  shrink the mode's spread monotonically.

Statistical bounds: with ``n`` samples of ``N(mu, sigma^2 I)`` in 2-D the per-coordinate
mean error is ``sigma / sqrt(n)`` and the relative std error ``1 / sqrt(2 n)`` (standard
deviations of the estimators); tests allow 5 of them (a chance failure ~1e-6 per check).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_engine import DiffuseError, Engine, IncompatibleError

N = 4000
K = 3  # the ring's fourth mode, at 135 degrees
CENTRE_TOL = 5 / math.sqrt(N)  # in units of the mode's std, per coordinate
STD_TOL = 5 / math.sqrt(2 * N)  # relative


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


@pytest.fixture(scope="module")
def mode(engine):
    mix = engine.build("score", "gmm", sde=engine.build("sde", "vp")).mixture
    return mix.means[K].float(), float(mix.stds[K])


def labels(n=N, k=K):
    return {"label": torch.full((n,), k)}


def _errors(x, mode):
    mu, sd = mode
    return ((x.mean(0) - mu).abs() / sd).max().item(), (x.std(0) / sd - 1).abs().max().item()


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("solver", ["pc", "unipc"])
def test_exact_conditional_score_recovers_the_mode(engine, mode, sde, solver):
    x = engine.sample(sde=sde, solver=solver, shape=(N, 2), seed=1, cond=labels())
    centre, std = _errors(x, mode)
    assert centre < CENTRE_TOL and std < STD_TOL, (centre, std)


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
def test_classifier_guidance_at_scale_one_is_bayes_rule(engine, mode, sde):
    """Same noise, deterministic solver: grad log p_t(x) + grad log p_t(y | x) is the
    conditional score, so samples agree to float32 round-off of the autograd path."""
    kw = dict(sde=sde, solver="unipc", shape=(N, 2), seed=2, cond=labels())
    cond = engine.sample(**kw)
    guided = engine.sample(**kw, guidance="classifier", classifier="gmm", scale=1.0)
    assert (guided - cond).abs().max() < 1e-3
    centre, std = _errors(guided, mode)
    assert centre < CENTRE_TOL and std < STD_TOL, (centre, std)


def test_classifier_guidance_with_pc_samples_the_conditional_law(engine, mode):
    x = engine.sample(
        sde="vp", solver="pc", shape=(N, 2), seed=3, cond=labels(),
        guidance="classifier", classifier="gmm",
    )  # fmt: skip
    centre, std = _errors(x, mode)
    assert centre < CENTRE_TOL and std < STD_TOL, (centre, std)


def test_cfg_at_scale_zero_is_conditional_sampling(engine):
    kw = dict(sde="vp", solver="pc", shape=(500, 2), seed=4, steps=100, cond=labels(500))
    assert torch.equal(engine.sample(**kw), engine.sample(**kw, guidance="cfg", scale=0.0))


def test_cfg_shrinks_the_mode_monotonically(engine, mode):
    """Paired noise and a deterministic solver: the spread falls with every scale."""
    spread = []
    for w in (0.0, 0.5, 1.0, 2.0, 4.0):
        x = engine.sample(
            sde="vp", solver="unipc", shape=(N, 2), seed=5, cond=labels(),
            guidance="cfg", scale=w,
        )  # fmt: skip
        spread.append(float(x.std(0).mean()) / mode[1])
    assert all(b < a for a, b in zip(spread, spread[1:], strict=False)), spread
    assert abs(spread[0] - 1) < STD_TOL and spread[-1] < 0.6, spread


def test_conditional_callables_get_their_shard_of_the_condition(engine, mode):
    """A user's fn(x, t, cond) sees the rows of its shard: each sample lands on the mode
    its own label names, across shard boundaries."""
    gmm = engine.build("score", "gmm", sde=engine.build("sde", "vp"))
    seen = []

    def fn(x, t, cond):
        seen.append(cond["label"].shape[0])
        return gmm(x, t, cond)

    y = torch.arange(300) % 8
    x = engine.sample(
        score=fn, sde="vp", solver="ddim", shape=(300, 2), seed=0, shard_size=128, cond={"label": y}
    )
    assert set(seen) == {128, 300 - 256}
    assert torch.equal(gmm.mixture.assign(x.double()), y)


def test_sharded_conditional_run_is_the_same_on_any_split(engine):
    """Shard j of a conditional run depends only on (seed, j): sampling the two shards'
    labels as one call equals the rows of the whole call (what --nproc relies on)."""
    y = torch.arange(200) % 8
    whole = engine.sample(sde="vp", solver="pc", shape=(200, 2), seed=7, steps=50,
                          shard_size=100, cond={"label": y})  # fmt: skip
    again = engine.sample(sde="vp", solver="pc", shape=(200, 2), seed=7, steps=50,
                          shard_size=100, cond={"label": y.clone()})  # fmt: skip
    assert torch.equal(whole, again)


def test_plain_callables_still_work_and_refuse_a_condition(engine):
    gmm = engine.build("score", "gmm", sde=engine.build("sde", "vp"))
    x = engine.sample(score=lambda x, t: gmm(x, t), sde="vp", solver="ddim", shape=(10, 2))
    assert x.shape == (10, 2)
    with pytest.raises(IncompatibleError, match="needs a conditional score model"):
        engine.sample(score=lambda x, t: gmm(x, t), sde="vp", solver="ddim", shape=(10, 2),
                      cond=labels(10))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"cond": {"label": torch.zeros(5, dtype=torch.long)}}, "per-sample values need first dimension n = 10"),
        ({"cond": {"label": torch.zeros(10)}}, "integer tensor of labels"),
        ({"cond": {"label": torch.full((10,), 8)}}, "knows 8 classes"),
        ({"cond": {"label": torch.full((10,), -1)}}, "negative labels"),
        ({"cond": {"mask": torch.ones(2)}}, "needs guidance="),
        ({"cond": [1, 2]}, "needs guidance="),
        ({"guidance": "cfg"}, "needs cond="),
        ({"cond": labels(10), "guidance": "classifier"}, "needs classifier="),
        ({"cond": labels(10), "guidance": "cfg", "scale": -1}, "scale"),
        ({"cond": labels(10), "guidance": "nope"}, "no guidance entry named 'nope'"),
        ({"classifier": "gmm"}, "pass guidance= too"),
        ({"noise": torch.zeros(3, 2)}, "noise has shape"),
    ],
)
def test_bad_conditions_are_one_line_errors(engine, kwargs, words):
    with pytest.raises(DiffuseError, match=words) as info:
        engine.sample(sde="vp", solver="ddim", shape=(10, 2), **kwargs)
    assert "\n" not in str(info.value)


def test_projection_guidance_is_refused_by_solvers_that_cannot_apply_it(engine):
    from diffuse_engine import Guidance, Guided, hookimpl

    class Project(Guidance):
        name = "project_test"
        projects = True

        def bind(self, score, sde, cond, *, classifier=None, generator=None):
            return Guided(score=lambda x, t: score(x, t, None), transform=lambda x, i, t: x)

    class Plugin:
        @staticmethod
        @hookimpl
        def diffuse_register_guidance():
            return [Project]

    e = Engine(autoload=False, plugins=[Plugin])
    kw = dict(sde="vp", shape=(10, 2), cond={"y": torch.zeros(10, 2)}, guidance="project_test")
    with pytest.raises(IncompatibleError, match="cannot"):
        e.sample(solver="ode_adaptive", **kw)
    assert e.sample(solver="ddim", steps=5, **kw).shape == (10, 2)


def test_given_noise_is_the_starting_point(engine):
    """noise=x_T replaces the prior draw: two seeds give the same deterministic samples."""
    x_T = engine.build("sde", "vp").prior_sample(
        (50, 2), generator=torch.Generator().manual_seed(9)
    )
    a = engine.sample(sde="vp", solver="ddim", shape=(50, 2), seed=0, noise=x_T)
    b = engine.sample(sde="vp", solver="ddim", shape=(50, 2), seed=1, noise=x_T)
    assert torch.equal(a, b)


def test_the_run_config_records_condition_and_guidance(engine):
    r = engine.sampling(sde="vp", solver="ddim", shape=(20, 2), cond=labels(20), guidance="cfg")
    assert r.config["guidance"] == {"name": "cfg", "type": "cfg", "scale": 2.0}
    assert r.config["cond"]["label"]["counts"] == {K: 20}

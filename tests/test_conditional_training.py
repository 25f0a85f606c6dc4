"""Class-conditional training (issue 14): labelled data, conditional networks with label
dropout, checkpoints that know their classes, the noise-conditional classifier, and the
CLI's ``--label`` / ``--guidance`` / ``--task classifier`` and the conditional run presets."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine
from diffuse_engine.cli import build_app
from diffuse_engine.training import load_trained

runner = CliRunner()
app = build_app()
# a tiny conditional MLP on the 8-mode ring: a few steps, seconds in all
TINY = dict(
    data="gmm", sde="vp", model="mlp", loss="dsm", steps=6, batch_size=32, warmup=2,
    log_every=2, plot_n=0, hidden=16, depth=1, threads=1, seed=3, num_classes=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    return Engine()


def train(engine, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.training(**{**TINY, **kw})


# ---- labelled data ---------------------------------------------------------------------------
def test_gmm_labels_are_the_modes_and_the_draws_of_sample(engine):
    data = engine.build("data", "gmm")
    x, y = data.sample_labelled(4000, torch.Generator().manual_seed(0))
    assert data.num_classes == 8 and y.dtype == torch.int64 and x.shape == (4000, 2)
    assert torch.equal(x, data.sample(4000, torch.Generator().manual_seed(0)))
    # each point lies within 5 of its own mode's stds of that mode's centre (chance ~1e-5)
    mix = data.mixture
    dist = (x.double() - mix.means[y]).norm(dim=1) / mix.stds[y]
    assert float(dist.max()) < 5.5


def test_digits_labels_follow_their_images(engine):
    data = engine.build("data", "digits")
    x, y = data.sample_labelled(64, torch.Generator().manual_seed(1))
    again = data.sample(64, torch.Generator().manual_seed(1))
    assert data.num_classes == 10 and torch.equal(x, again)
    idx = torch.randint(0, len(data), (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, data.labels[idx])


def test_npz_with_labels_and_class_folders(engine, tmp_path):
    from PIL import Image

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(30, 2)),
             labels=np.arange(30) % 3)  # fmt: skip
    data = engine.build("data", "file", path=str(tmp_path / "d.npz"))
    x, y = data.sample_labelled(10, torch.Generator().manual_seed(0))
    assert data.num_classes == 3 and x.shape == (10, 2)
    assert torch.equal(
        y, data.labels[torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(0))]
    )
    np.savez(tmp_path / "plain.npz", x=np.zeros((5, 2)))
    assert engine.build("data", "file", path=str(tmp_path / "plain.npz")).num_classes is None
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(2 + value // 255):
            Image.fromarray(np.full((4, 4), value, np.uint8)).save(
                tmp_path / "img" / cls / f"{i}.png"
            )
    folder = engine.build("data", "file", path=str(tmp_path / "img"))
    assert folder.num_classes == 2 and folder.class_names == ["cat", "dog"]
    assert folder.labels.tolist() == [0, 0, 1, 1, 1]
    assert folder.data[:2].max() == -1 and folder.data[2:].min() == 1  # labels follow pixels


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"y": np.zeros((3, 2))}, "no array 'x'"),
        ({"x": np.zeros((3, 2)), "labels": np.zeros(3)}, "one integer per row"),
        ({"x": np.zeros((3, 2)), "labels": np.arange(2)}, "one integer per row"),
        ({"x": np.zeros((3, 2)), "labels": -np.arange(3)}, "negative"),
    ],
)
def test_bad_npz_is_a_one_line_error(engine, tmp_path, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DiffuseError, match=words):
        _ = engine.build("data", "file", path=str(tmp_path / "bad.npz")).data


# ---- conditional networks ---------------------------------------------------------------------
def test_label_dropout_replaces_labels_at_its_rate(engine):
    sde = engine.build("sde", "vp")
    model = engine.build("score", "mlp", sde=sde, shape=[2], num_classes=8, label_dropout=0.2)
    n, p = 20000, 0.2
    y = {"label": torch.arange(n) % 8}
    dropped = model.drop_labels(y, torch.Generator().manual_seed(0))["label"]
    again = model.drop_labels(y, torch.Generator().manual_seed(0))["label"]
    assert torch.equal(dropped, again)  # drawn from the generator only
    kept = dropped != 8
    assert torch.equal(dropped[kept], y["label"][kept])
    # binomial: 5 standard deviations sqrt(p (1 - p) / n) ~ 0.014
    assert abs(float((~kept).float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    off = engine.build("score", "mlp", sde=sde, shape=[2], num_classes=8)
    assert off.drop_labels(y, torch.Generator()) is y and off.requires_cond


def test_conditional_training_is_reproducible_and_label_dropout_matters(engine):
    a, b = train(engine, label_dropout=0.3), train(engine, label_dropout=0.3)
    assert a.losses == b.losses and len(a.losses) == TINY["steps"]
    c = train(engine)  # no dropout: the same data and noise, other labels seen
    assert c.losses != a.losses
    x = torch.randn(5, 2)
    out = a.model(x, torch.full((5,), 0.5), {"label": torch.arange(5)})
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    assert a.model(x, torch.full((5,), 0.5), None).shape == (5, 2)  # the null label


def test_checkpoints_record_classes_and_refuse_a_missing_unconditional_score(engine, tmp_path):
    train(engine, label_dropout=0.2, out=tmp_path / "drop")
    train(engine, out=tmp_path / "nodrop")
    with_drop, ckpt = load_trained(engine, tmp_path / "drop")
    assert ckpt.config["score"]["num_classes"] == 8 and ckpt.config["score"]["label_dropout"] == 0.2
    assert with_drop.num_classes == 8 and with_drop.conditional and not with_drop.requires_cond
    kw = dict(sde="vp", solver="ddim", shape=(6, 2), steps=5)
    assert engine.sample(score=with_drop, **kw).shape == (6, 2)  # unconditional: the null label
    y = {"label": torch.arange(6)}
    assert engine.sample(score=with_drop, **kw, cond=y, guidance="cfg", scale=2.0).shape == (6, 2)
    no_drop, _ = load_trained(engine, tmp_path / "nodrop")
    assert no_drop.requires_cond
    assert engine.sample(score=no_drop, **kw, cond=y).shape == (6, 2)
    with pytest.raises(DiffuseError, match="without label dropout"):
        engine.sample(score=no_drop, **kw)
    with pytest.raises(DiffuseError, match="without label dropout"):
        engine.sample(score=no_drop, **kw, cond=y, guidance="cfg", scale=1.0)
    with pytest.raises(DiffuseError, match="knows 8 classes"):
        engine.sample(score=with_drop, **kw, cond={"label": torch.full((6,), 8)})


def test_conditional_training_needs_matching_labelled_data(engine):
    with pytest.raises(DiffuseError, match="has no labels"):
        train(engine, data="swissroll")
    with pytest.raises(DiffuseError, match="num_classes = 8"):
        train(engine, num_classes=5)


# ---- the noise-conditional classifier -------------------------------------------------------
CLF = dict(
    task="classifier", data="gmm", sde="vp", model="mlp", loss="cross_entropy", steps=8,
    batch_size=64, warmup=2, log_every=4, hidden=16, depth=1, threads=1, seed=3,
)  # fmt: skip  # the seed of TINY: the same data normalisation as its score models


def test_classifier_trains_saves_and_guides(engine, tmp_path):
    from diffuse_plugins.classifiers import load_classifier

    res = engine.training(out=tmp_path / "clf", **CLF)
    assert res.config["score"]["num_classes"] == 8 and res.config["train"]["plot_n"] == 0
    assert res.losses[0] > 0 and len(res.losses) == 8
    again = engine.training(**CLF)
    assert again.losses == res.losses  # reproducible from the seed
    clf = load_classifier(engine, tmp_path / "clf")
    logits = clf(torch.randn(7, 2), torch.full((7,), 0.3))
    assert logits.shape == (7, 8)
    score = train(engine, label_dropout=0.2).model  # has an unconditional score
    kw = dict(score=score, sde="vp", solver="ddim", shape=(6, 2), steps=5,
              cond={"label": torch.arange(6)}, guidance="classifier", scale=1.0)  # fmt: skip
    by_object = engine.sample(**kw, classifier=clf)
    by_name = engine.sample(
        **kw, classifier="checkpoint", **{"classifier.path": str(tmp_path / "clf")}
    )
    assert torch.equal(by_object, by_name)
    with pytest.raises(DiffuseError, match="not a classifier"):
        train(engine, out=tmp_path / "score")
        load_classifier(engine, tmp_path / "score")


def test_classifier_task_errors(engine):
    with pytest.raises(DiffuseError, match="needs labelled data"):
        engine.training(**{**CLF, "data": "swissroll"})
    with pytest.raises(DiffuseError, match="classifier loss"):
        engine.training(**{**CLF, "loss": "dsm"})
    with pytest.raises(DiffuseError, match="use --task classifier"):
        train(engine, loss="cross_entropy")


# ---- the command line ----------------------------------------------------------------------------
def test_cli_label_guidance_and_classifier_paths(engine, tmp_path):
    train(engine, label_dropout=0.2, out=tmp_path / "cond")
    args = ["sample", "-c", str(tmp_path / "cond"), "--solver", "ddim", "--steps", "5", "-q"]
    res = runner.invoke(app, [*args, "--label", "0..7", "--n", "3", "--guidance", "cfg",
                              "--scale", "2", "--out", str(tmp_path / "grid")])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "grid" / "config.json").read_text())["sampling"]
    assert cfg["guidance"]["type"] == "cfg" and cfg["guidance"]["scale"] == 2.0
    assert cfg["cond"]["label"]["counts"] == {str(k): 3 for k in range(8)}
    clf = str(tmp_path / "clf")
    res = runner.invoke(app, ["train", "--task", "classifier", "--data", "gmm", "--steps", "4",
                              "--batch-size", "32", "--set", "hidden=8", "--set", "depth=1",
                              "--set", "warmup=1", "--seed", "3", "-q", "--out", clf])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--label", "3", "--n", "4", "--guidance", "classifier",
                              "--classifier", clf, "--out", str(tmp_path / "g")])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["sampling"]
    assert cfg["classifier"] == "checkpoint" and cfg["cond"]["label"]["counts"] == {"3": 4}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--label", "x"], "give a class label"),
        (["--label", "8"], "knows 8 classes"),
        (["--scale", "2"], "pass --label too"),
        (["--label", "1", "--guidance", "nope"], "nope"),
    ],
)
def test_cli_bad_conditioning_exits_2_before_any_folder(engine, tmp_path, extra, words):
    train(engine, label_dropout=0.2, out=tmp_path / "cond")
    out = tmp_path / "never"
    res = runner.invoke(app, ["sample", "-c", str(tmp_path / "cond"), "--out", str(out), *extra])
    assert res.exit_code == 2 and words in res.output, res.output
    assert not list(tmp_path.glob("never*"))


def test_conditional_run_preset_records_condition_and_guidance(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "--preset", "conditional-cfg", "--n", "400", "--steps", "8",
                              "--out", str(out), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["plan"]["label"] == 3 and config["resolved"]["guidance"]["type"] == "cfg"
    assert config["resolved"]["cond"]["label"]["counts"] == {"3": 400}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weight_max"] == 0.0  # compared with mode 3 alone


def test_a_conditional_checkpoint_by_registry_name_keeps_its_labels(engine, tmp_path):
    train(engine, label_dropout=0.2, out=tmp_path / "cond")
    toml = tmp_path / "reg.toml"
    toml.write_text(f'[score.ring-cond]\ntype = "checkpoint"\npath = "{tmp_path / "cond"}"\n')
    named = Engine(registry=toml)
    kw = dict(score="ring-cond", sde="vp", solver="ddim", shape=(6, 2), steps=5, seed=1)
    y = {"label": torch.arange(6)}
    model, _ = load_trained(engine, tmp_path / "cond")
    direct = engine.sample(**{**kw, "score": model}, cond=y, guidance="cfg", scale=1.0)
    assert torch.equal(named.sample(**kw, cond=y, guidance="cfg", scale=1.0), direct)
    with pytest.raises(DiffuseError, match="knows 8 classes"):
        named.sample(**kw, cond={"label": torch.full((6,), 9)})


def test_classifier_guidance_refuses_other_coordinates_or_sde(engine):
    from diffuse_engine import IncompatibleError

    clf = engine.training(**CLF).model
    kw = dict(shape=(4, 2), steps=3, cond={"label": torch.arange(4)}, guidance="classifier")
    with pytest.raises(IncompatibleError, match="trained with sde"):
        engine.sample(score="gmm", sde="ve", solver="ddim", classifier=clf, **kw)
    # the exact mixture score works in raw data units, the classifier in normalised ones
    with pytest.raises(IncompatibleError, match="coordinates"):
        engine.sample(score="gmm", sde="vp", solver="ddim", classifier=clf, **kw)

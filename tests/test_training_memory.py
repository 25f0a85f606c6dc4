"""In-memory training data (issue 18): every accepted form, its one-line errors, what the
checkpoint records (never the data), and a checkpoint of such a run loading and sampling
in the user's units."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffuse_engine import DiffuseError
from diffuse_engine.components.memory_data import MemoryData

TINY = dict(
    steps=30,
    batch_size=64,
    log_every=10,
    warmup=5,
    plot_n=0,
    hidden=32,
    depth=1,
    threads=1,
    checkpoint_every=0,
)


def points(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * 10 + 3


class Items(torch.utils.data.Dataset):
    def __init__(self, x, y=None):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.y is None else (self.x[i], self.y[i])


def test_every_form_gives_the_same_points():
    x = points(50)
    y = torch.arange(50) % 3
    forms = [
        MemoryData(x),
        MemoryData(x.double().numpy()),
        MemoryData(Items(x)),
        MemoryData(list(x.split(16))),
        MemoryData(x.tolist()),  # nested lists of numbers
        MemoryData(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=7)),
    ]
    for d in forms:
        assert d.shape == (2,) and len(d) == 50 and d.data.dtype == torch.float32
        assert torch.allclose(d.data, x)
        assert d.num_classes is None
    labelled = [
        MemoryData(x, labels=y),
        MemoryData(Items(x, y)),
        MemoryData(iter([(x[:20], y[:20]), (x[20:], y[20:])])),  # a generator of batches
        MemoryData(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), 10)),
    ]
    for d in labelled:
        assert d.num_classes == 3 and torch.equal(d.labels, y)
        xs, ys = d.sample_labelled(8, torch.Generator().manual_seed(0))
        assert xs.shape == (8, 2) and ys.dtype == torch.int64
        # rows keep their labels
        rows = [int((d.data == r).all(1).nonzero()[0]) for r in xs]
        assert torch.equal(d.labels[rows], ys)


def test_images_keep_their_shape_and_dtype_is_recorded():
    img = np.random.default_rng(0).integers(0, 256, (10, 1, 4, 4)).astype(np.uint8)
    d = MemoryData(img)
    assert d.shape == (1, 4, 4)
    rec = d.record()
    assert rec == {
        "name": "memory",
        "type": "memory",
        "shape": [1, 4, 4],
        "rows": 10,
        "dtype": "uint8",
        "source": "ndarray",
        "num_classes": None,
    }


@pytest.mark.parametrize(
    ("data", "kw", "match"),
    [
        (torch.randn(5), {}, r"expected a \(n, \*dims\) array with n >= 1, got shape \(5,\)"),
        (torch.zeros(0, 2), {}, r"got shape \(0, 2\)"),
        (torch.tensor([[1.0, float("nan")]]), {}, "contains NaN or Inf values"),
        (torch.ones(3, 2, dtype=torch.bool), {}, "of bool"),
        (np.array([["a", "b"]]), {}, "NumPy array of <U1; expected numbers"),
        ([], {}, "empty; expected n >= 1"),
        ([torch.zeros(2, 2), torch.zeros(2, 3)], {}, "different shapes"),
        ({"x": 1}, {}, "a dict is not in-memory data"),
        (3.0, {}, "a float is not in-memory data"),
        ([torch.zeros(2, 2), "x"], {}, "item 1 is a str; expected a tensor or NumPy array"),
        (torch.zeros(4, 2), {"labels": torch.zeros(3)}, r"labels: expected shape \(4,\)"),
        (torch.zeros(4, 2), {"labels": torch.tensor([0, 1, -1, 0])}, "labels are 0 .. K - 1"),
        (torch.zeros(2, 2), {"labels": torch.tensor([0.5, 1.0])}, "integer class labels"),
        (
            Items(torch.zeros(2, 2), torch.zeros(2)),
            {"labels": torch.zeros(2)},
            "labels given twice",
        ),
        (
            [(torch.zeros(2, 2), torch.zeros(2)), torch.zeros(2, 2)],
            {},
            "give labels for all or none",
        ),
        ([(torch.zeros(2, 2), 1, 2)], {}, r"a tuple of 3; expected x or \(x, label\)"),
        ([torch.zeros(2, 2), torch.tensor(1.0)], {}, "batch 1 is a single number"),
        ([[1.0, 2.0], [3.0]], {}, "nested lists of numbers must be rectangular"),
    ],
)
def test_bad_data_is_a_one_line_error(data, kw, match):
    with pytest.raises(DiffuseError, match=match) as err:
        MemoryData(data, **kw)
    assert "\n" not in str(err.value)


def test_labels_need_in_memory_data(engine):
    with pytest.raises(DiffuseError, match="labels= goes with in-memory data="):
        engine.training(data="gmm", labels=torch.zeros(3), **TINY)


@pytest.fixture(scope="module")
def run(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "run"
    return engine.training(data=points(), out=out, **{**TINY, "steps": 300, "lr": 3e-3})


def test_checkpoint_records_what_the_data_looked_like_not_the_data(run):
    cfg = json.loads((run.out / "config.json").read_text())["config"]
    assert cfg["data"]["type"] == "memory" and cfg["data"]["shape"] == [2]
    assert cfg["data"]["rows"] == 200 and cfg["data"]["dtype"] == "float32"
    assert cfg["train"]["data"] == "memory"
    assert cfg["normalise"]["kind"] == "standard" and len(cfg["normalise"]["mean"]) == 2
    assert cfg["score"]["sigma_data"] == pytest.approx(1.0, abs=0.01)  # follows T(x)
    with safe_open(run.out / "checkpoint.safetensors", framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert all(k.split("/")[0] in ("model", "ema", "optim", "rng", "history") for k in shapes)
    assert not any(s[:1] == [200] for s in shapes.values())  # no tensor of the 200 rows


def test_checkpoint_of_in_memory_data_loads_and_samples_in_user_units(engine, run, tmp_path):
    """300 steps of a tiny MLP teach little, but the decoded samples must be in the data's
    units: the data have std 10 per coordinate, the model's normalised output about 1; an
    undecoded sample would have std ~1 (a factor 10 off), so 'within a factor 2' separates
    them."""
    reg = tmp_path / "reg.toml"
    reg.write_text(f'[score.mine]\ntype = "checkpoint"\npath = "{run.out}"\n')
    from diffuse_engine import Engine

    e2 = Engine(registry=str(reg), autoload=False)
    x = e2.sample(score="mine", sde="vp", solver="pc", shape=(2000, 2), steps=50)
    q = torch.quantile(x, torch.tensor([0.25, 0.75]), dim=0)
    sd = (q[1] - q[0]) / 1.349  # a robust std: a rough model's few outliers do not count
    assert bool(((sd > 5) & (sd < 20)).all()), sd
    direct = engine.sample(score=run.model, sde="vp", solver="pc", shape=(2000, 2), steps=50)
    assert torch.allclose(x, direct, atol=1e-4)  # the checkpoint is the returned model


def test_resume_needs_the_same_data(engine, tmp_path):
    out = tmp_path / "r"
    engine.training(data=points(), out=out, **{**TINY, "steps": 10})
    with pytest.raises(DiffuseError, match="trained on in-memory data; resume it with the same"):
        engine.training(out=out, resume=True, steps=20, threads=1)
    with pytest.raises(DiffuseError, match="in-memory data with shape \\[2\\]; these data have"):
        engine.training(data=torch.zeros(5, 3), out=out, resume=True, steps=20, threads=1)
    res = engine.training(data=points(), out=out, resume=True, steps=20, threads=1)
    assert res.step == 20
    with pytest.raises(DiffuseError, match="trained on data 'gmm'; resume it without data="):
        g = tmp_path / "g"
        engine.training(out=g, **{**TINY, "steps": 5})
        engine.training(data=points(), out=g, resume=True, steps=10, threads=1)

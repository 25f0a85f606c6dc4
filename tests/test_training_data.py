"""Datasets (issue 4): shapes, ranges, reproducibility, the exact mixture, user files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffuse_engine import DiffuseError, Engine, mode_statistics


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["swissroll", "moons", "checkerboard", "gmm"])
def test_toy_sets_are_2d_finite_and_seeded(engine, name):
    d = engine.build("data", name)
    a, b = d.sample(500, gen(1)), d.sample(500, gen(1))
    assert d.shape == (2,) and a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b), "same generator seed must give the same data"
    assert not torch.equal(a, d.sample(500, gen(2)))
    assert torch.isfinite(a).all() and a.abs().max() < 5


def test_checkerboard_only_black_squares(engine):
    x = engine.build("data", "checkerboard").sample(4000, gen())
    cell = torch.floor((x + 2) / 1.0).long()  # 4 squares of width 1 on [-2, 2]
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()


def test_gmm_data_matches_score_mixture(engine):
    d = engine.build("data", "gmm")
    score = engine.build("score", "gmm", sde=engine.build("sde", "vp"))
    assert torch.equal(d.mixture.means, score.mixture.means)
    assert torch.equal(d.mixture.weights, score.mixture.weights)
    n = 20000
    stats = mode_statistics(d.sample(n, gen()), d.mixture)
    # exact samples: weight error per mode ~ sqrt(w(1-w)/n) <= 0.0028; 5 sigma bound
    assert stats["weight_max"] < 5 * 0.0028
    # relative std error per mode ~ 1/sqrt(2 n_k), n_k >= n/16 = 1250 -> 0.02; 5 sigma
    assert stats["std_error"] < 5 * 0.02


def test_digits_range_split_and_centring(engine):
    tr = engine.build("data", "digits")
    te = engine.build("data", "digits", split="test")
    assert tr.shape == (1, 8, 8) and len(tr) + len(te) == 1797
    assert abs(len(te) - 0.2 * 1797) <= 1
    assert tr.data.min() >= -1 and tr.data.max() <= 1
    assert set(tr.labels.tolist()) == set(range(10))
    c = engine.build("data", "digits", centre=True, flatten=True)
    assert c.shape == (64,)
    assert c.data.mean(0).abs().max() < 1e-5  # centred by the training mean
    assert torch.allclose(c.to_pixels(c.data)[:, None], tr.data, atol=1e-6)
    # train and test are disjoint: no test image appears in the training split
    flat_tr = {tuple(r) for r in tr.data.reshape(len(tr), -1).tolist()}
    overlap = sum(tuple(r) in flat_tr for r in te.data.reshape(len(te), -1).tolist())
    assert overlap < 5  # the digits set itself holds a few exact duplicates


def test_file_npy_pt_and_images(engine, tmp_path):
    arr = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    torch.save(torch.from_numpy(arr), tmp_path / "x.pt")
    for f in ("x.npy", "x.pt"):
        d = engine.build("data", "file", path=str(tmp_path / f))
        assert d.shape == (3,)
        assert torch.allclose(d.data, torch.from_numpy(arr))
        assert d.sample(7, gen()).shape == (7, 3)
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 5), 255 * (i % 2), np.uint8)).save(folder / f"{i}.png")
    d = engine.build("data", "file", path=str(folder))
    assert d.shape == (1, 6, 5)
    assert d.data.min() == -1 and d.data.max() == 1


def test_file_errors_are_one_line(engine, tmp_path):
    (tmp_path / "x.txt").write_text("1 2 3")
    for path, words in [
        (tmp_path / "missing.npy", "cannot read"),
        (tmp_path / "x.txt", "unsupported suffix"),
        (tmp_path / "nothing", "does not exist"),
    ]:
        with pytest.raises(DiffuseError, match=words) as info:
            _ = engine.build("data", "file", path=str(path)).data
        assert "\n" not in str(info.value)
    torch.save({"a": torch.zeros(2)}, tmp_path / "d.pt")
    with pytest.raises(DiffuseError, match="expected a single tensor"):
        _ = engine.build("data", "file", path=str(tmp_path / "d.pt")).data

"""``diffuse inpaint`` and its helpers: masks, observations, grids, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffuse_engine.cli import build_app
from diffuse_engine.core.errors import DiffuseError
from diffuse_engine.testbed import inpaint as P

DIMS = (1, 8, 8)


@pytest.mark.parametrize(
    "text, hidden",
    [("top", (slice(0, 4), slice(None))), ("bottom", (slice(4, 8), slice(None))),
     ("left", (slice(None), slice(0, 4))), ("centre", (slice(2, 6), slice(2, 6)))],
)  # fmt: skip
def test_named_masks_hide_their_region(text, hidden):
    m = P.parse_mask(text, DIMS, 3)
    assert m.shape == (3, *DIMS)
    assert not m[:, 0][(slice(None), *hidden)].any() and m.sum() == 3 * (
        64 - 16 - 16 * (text != "centre")
    )


def test_random_and_file_masks(tmp_path):
    m = P.parse_mask("random:0.5", DIMS, 200, seed=1)
    assert abs(m.float().mean().item() - 0.5) < 5 * (0.25 / (200 * 64)) ** 0.5
    keep = np.zeros((8, 8), dtype=bool)
    keep[0] = True
    np.save(tmp_path / "m.npy", keep)
    assert P.parse_mask(str(tmp_path / "m.npy"), DIMS, 2).sum() == 16
    np.save(tmp_path / "bad.npy", keep.astype(float))
    for text, words in [("random:2", "fraction P"), ("diagonal", "choices are"),
                        (str(tmp_path / "bad.npy"), "bool array of shape")]:  # fmt: skip
        with pytest.raises(DiffuseError, match=words):
            P.parse_mask(text, DIMS, 2)


def test_conditions_and_observation_error():
    x = torch.rand(4, *DIMS) * 2 - 1
    cond = P.condition(x, mask=P.parse_mask("bottom", DIMS, 4))
    assert P.observation_error(x, cond) == 0.0
    assert torch.equal(P.observed_view(cond, x.shape)[:, :, 4:], torch.zeros(4, 1, 4, 8))
    op = P.parse_observe("downsample:2", DIMS)
    cond = P.condition(x, op=op)
    assert cond["y"].shape == (4, 16) and P.observation_error(x, cond) < 1e-6
    # the view of a 2x2-averaged image is the nearest upsampling of the averages
    assert torch.allclose(P.observed_view(cond, x.shape)[:, 0, ::2, ::2].reshape(4, 16), cond["y"])
    with pytest.raises(DiffuseError, match="greyscale, downsample:F"):
        P.parse_observe("blur", DIMS)


def test_inpaint_needs_one_of_mask_or_observe(tmp_path):
    res = CliRunner().invoke(build_app(False), ["inpaint", "-c", str(tmp_path)])
    assert res.exit_code == 2 and "give one of --mask" in res.output


def test_inpaint_refuses_an_existing_output_before_any_work(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    args = [
        "inpaint",
        "-c",
        str(tmp_path / "none"),
        "--mask",
        "bottom",
        "--out",
        str(tmp_path / "o"),
    ]
    res = CliRunner().invoke(build_app(False), args)
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output, res.output
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_inpaint_end_to_end(tmp_path):
    """A 3-step digits model: the command runs, pins the observed pixels, writes its files."""
    app = build_app(False)
    run = CliRunner().invoke
    res = run(app, ["train", "--preset", "digits", "--steps", "3", "--set", "plot_every=0",
                    "--set", "warmup=1", "--out", str(tmp_path / "m"), "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    args = ["--mask", "bottom", "--method", "replacement", "--steps", "10", "-n", "8"]
    res = run(app, ["inpaint", "-c", str(tmp_path / "m"), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["observation_error"] == 0.0 and (tmp_path / "o" / "inpaint.png").is_file()
    assert json.loads((tmp_path / "o" / "status.json").read_text())["complete"]  # a run folder
    # --nproc 2 (torchrun, 2 processes): the images are sharded, the samples are those of
    # one process, bit for bit (smc: each image's particles stay on its shard's rank).
    # torchrun gives each worker one thread; a convolution's rounding depends on the
    # thread count, so the single process gets one too
    two = ["-c", "m", "--mask", "bottom", "--method", "smc", "--steps", "6", "-n", "6",
           "--set", "particles=2", "--set", "shard_size=2"]  # fmt: skip
    for out, extra in (("p1", []), ("p2", ["--nproc", "2"])):
        subprocess.run([sys.executable, "-m", "diffuse_engine", "inpaint", *two, *extra, "-o", out],
                       cwd=tmp_path, check=True, capture_output=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    one, both = (torch.load(tmp_path / d / "samples.pt") for d in ("p1", "p2"))
    assert one.shape == (6, 1, 8, 8) and torch.equal(one, both)

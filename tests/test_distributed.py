"""Distributed training and sampling (issue 8) with 2 real processes on the CPU (gloo).

One ``torch.multiprocessing.spawn`` of two workers does everything a distributed run
must get right (starting processes costs more than the work here), and the parent
compares what they saved with single-process runs:

* sampling (plain, a fitted schedule, class labels, an inpainting smc run): the
  gathered samples equal a single-process run with the same seed and
  count, bit for bit (shards have a fixed size and their own seeds, so the ranks
  compute exactly the single-process shards);
* training: after 16 steps the weights and the EMA are bit-identical on both ranks;
  the loss curve equals a single-process run with the same global batch (``shards =
  2``: the same data and noise) up to float32 rounding (bound derived below);
* resume: a 2-process run stopped at step 8 and resumed to 16 gives the same losses
  and weights as the uninterrupted 2-process run; rank 0 alone wrote the folder.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from diffuse_engine import Engine
from diffuse_engine.cli.launch import split_nproc, torchrun_args
from diffuse_engine.core.distributed import (
    DistContext,
    DistributedError,
    ShardedBatches,
    shard_seed,
    shard_sizes,
)

WORLD = 2
SAMPLE = dict(
    score="gmm", sde="vp", solver="pc", shape=(50, 2), seed=3, steps=20, shard_size=7
)  # 8 shards, the last of 1 sample: uneven over 2 ranks
# a fitted schedule: rank 0's grid is used on every rank
SAMPLE_GITS = dict(
    score="gmm",
    sde="vp",
    solver="dpm_solver_pp",
    shape=(50, 2),
    seed=3,
    steps=6,
    schedule="gits",
    pilot=64,
    fine=30,
    shard_size=7,
)
# fitted multistep weights (and a fitted grid under them): rank 0's fit on every rank
SAMPLE_FITTED = {
    **{k: v for k, v in SAMPLE_GITS.items() if k != "steps"},
    **dict(solver="ipndm", coefficients="fitted", order=3, nfe=6),
}
# a class-conditional sample: each shard (and rank) gets its rows of the labels
SAMPLE_COND = dict(SAMPLE, cond={"label": torch.arange(50) % 8}, guidance="cfg", scale=1.0)
# an inverse problem: a per-sample mask and observation are sharded with their samples,
# and each sample's particle system stays on the rank of its shard
_MASK = torch.arange(100).reshape(50, 2) % 3 == 0
SAMPLE_INV = dict(
    SAMPLE,
    solver="ddim",
    cond={"mask": _MASK, "y": torch.linspace(-2, 2, 100).reshape(50, 2)},
    guidance="smc",
    particles=4,
)
TRAIN = dict(
    steps=16,
    batch_size=32,
    warmup=4,
    log_every=4,
    checkpoint_every=8,
    plot_n=64,
    plot_steps=5,
    hidden=32,
    depth=1,
    threads=1,
    seed=5,
    lr_horizon=16,  # the 16-step run's cosine decay, also for the 8 + 8 resume
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """One rank: sample, train (full, and stopped + resumed), save what it got."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        engine = Engine(autoload=False, distributed=True)
        gits = engine.sampling(**SAMPLE_GITS)
        got = {"samples": engine.sample(**SAMPLE), "gits": gits.samples}
        got["gits_setup_nfe"] = gits.setup_nfe
        fitted = engine.sampling(**SAMPLE_FITTED)
        got["fitted"], got["fitted_setup_nfe"] = fitted.samples, fitted.setup_nfe
        got["cond"] = engine.sample(**SAMPLE_COND)
        got["inverse"] = engine.sample(**SAMPLE_INV)
        full = engine.training(out=os.path.join(folder, "full"), **TRAIN)
        got.update(
            losses=torch.tensor(full.losses),
            checkpoints=len(full.checkpoints),
            weights={k: v.clone() for k, v in full.raw.net.state_dict().items()},
            ema={k: v.clone() for k, v in full.model.net.state_dict().items()},
        )
        part = os.path.join(folder, "part")
        engine.training(out=part, **{**TRAIN, "steps": 8})
        resumed = engine.training(out=part, resume=True, steps=16)
        got.update(
            resumed_losses=torch.tensor(resumed.losses),
            resumed_weights=dict(resumed.raw.net.state_dict()),
        )
        torch.save(got, os.path.join(folder, f"rank{rank}.pt"))
        # no rank tears its gloo connections down while another still uses them
        # (gloo aborts the other process: "terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(
        _worker, args=(WORLD, _free_port(), str(folder)), nprocs=WORLD, join=True
    )
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


def test_distributed_sampling_equals_single_process_bit_for_bit(ranks, engine):
    _, got = ranks
    single = engine.sample(**SAMPLE)
    single_gits = engine.sample(**SAMPLE_GITS)
    single_cond = engine.sample(**SAMPLE_COND)
    single_fitted = engine.sampling(**SAMPLE_FITTED)
    single_inverse = engine.sample(**SAMPLE_INV)
    for r in range(WORLD):
        assert torch.equal(got[r]["samples"], single), r
        assert torch.equal(got[r]["gits"], single_gits), r
        assert torch.equal(got[r]["cond"], single_cond), r
        assert torch.equal(got[r]["fitted"], single_fitted.samples), r
        assert torch.equal(got[r]["inverse"], single_inverse), r
    # the pilot ran on rank 0 alone (4 * fine + 1 evaluations of its batch)
    assert [got[r]["gits_setup_nfe"] for r in range(WORLD)] == [4 * 30 + 1, 0]
    assert [got[r]["fitted_setup_nfe"] for r in range(WORLD)] == [single_fitted.setup_nfe, 0]
    assert single_fitted.setup_nfe > 4 * 30 + 1  # the grid's pilot and the weights'


def test_weights_and_ema_identical_on_all_ranks(ranks):
    _, got = ranks
    for part in ("weights", "ema"):
        a, b = got[0][part], got[1][part]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    # and training moved them: the EMA lags the raw weights
    assert any(not torch.equal(got[0]["weights"][k], got[0]["ema"][k]) for k in got[0]["weights"])


def test_loss_curve_matches_single_process_with_same_global_batch(ranks, engine):
    _, got = ranks
    single = engine.training(**{**TRAIN, "shards": WORLD})
    ref = torch.tensor(single.losses)
    dist = got[0]["losses"]
    assert dist.shape == ref.shape == (16,)
    assert torch.equal(got[0]["losses"], got[1]["losses"])  # logged values are all-reduced
    # Same data, same noise, same shard shapes: the only difference is where the two
    # shard gradients are added (DDP's all-reduce of g_k / 2 vs accumulating
    # (l_k / 2)' on one process) and the thread count of the matmuls. Halving is exact
    # in binary, so the gradients agree to float32 rounding, ~1e-7 relative; Adam's
    # normalised steps keep parameter differences at lr * that per step, so over 16
    # steps the loss agrees to well under 1e-5 relative. A wrong global batch (same
    # data on both ranks, missing averaging, other noise) changes the loss at the
    # 1e-2 level (its Monte Carlo error with 32 samples).
    # (Measured on this machine, torch 2.13 CPU: the curves are bit-identical, max diff
    # 0.0; the bound allows other BLAS builds to round differently.)
    assert torch.allclose(dist, ref, rtol=1e-5, atol=0), (dist - ref).abs().max()


def test_resume_in_a_distributed_run_continues_exactly(ranks):
    folder, got = ranks
    for r in range(WORLD):
        assert torch.equal(got[r]["resumed_losses"], got[r]["losses"]), r
        for k, v in got[r]["weights"].items():
            assert torch.equal(got[r]["resumed_weights"][k], v), (r, k)
    assert got[0]["checkpoints"] == 2 and got[1]["checkpoints"] == 2  # steps 8 and 16
    status = json.loads((folder / "full" / "status.json").read_text())
    assert status["complete"] is True and status["step"] == 16
    cfg = json.loads((folder / "full" / "config.json").read_text())["config"]
    assert cfg["train"]["shards"] == WORLD
    assert (folder / "full" / "losses.csv").read_text().count("\n") == 17
    assert not [p for p in (folder / "full").iterdir() if p.name.endswith(".tmp")]


# ---- single-process pieces (no processes started) ---------------------------------------------
def test_each_shard_is_a_plain_run_seeded_by_its_shard_seed(engine):
    full = engine.sample(**SAMPLE)
    sizes = shard_sizes(50, 7)
    assert sizes == [7] * 7 + [1]
    start = 0
    for j, n in enumerate(sizes):
        alone = engine.sample(
            **{**SAMPLE, "shape": (n, 2), "seed": shard_seed(3, j), "shard_size": 10_000}
        )
        assert torch.equal(full[start : start + n], alone), j
        start += n
    assert shard_seed(3, 0) == 3 and len({shard_seed(3, j) for j in range(100)}) == 100


def test_bad_distributed_settings_are_one_line_errors():
    with pytest.raises(DistributedError, match="multiple of 2"):
        ShardedBatches(0, 3, 30, DistContext(0, 2), torch.device("cpu"))
    with pytest.raises(DistributedError, match="not divisible"):
        ShardedBatches(0, 4, 30, DistContext(0, 2), torch.device("cpu"))
    for argv in (["train", "--nproc"], ["train", "--nproc", "x"], ["train", "--nproc=0"]):
        with pytest.raises(DistributedError, match="--nproc"):
            split_nproc(argv)
    assert split_nproc(["train", "--nproc", "2", "--steps", "3"]) == (2, ["train", "--steps", "3"])
    assert split_nproc(["sample", "--nproc=4"]) == (4, ["sample"])
    assert DistContext(1, 2, 1).device("cuda") == torch.device("cuda", 1)
    assert DistContext(0, 1).device("cuda:3") == torch.device("cuda", 3)  # one process: as given
    with pytest.raises(DistributedError, match="CUDA_VISIBLE_DEVICES"):
        DistContext(0, 2).device("cuda:1")
    from torch.distributed.run import parse_args

    ns = parse_args(torchrun_args(2, ["train", "--steps", "3"]))
    assert ns.nproc_per_node == "2" and ns.standalone and ns.module
    assert ns.training_script == "diffuse_engine"
    assert ns.training_script_args == ["train", "--steps", "3"]


def test_bad_shard_size_is_a_one_line_error(engine):
    from diffuse_engine import DiffuseError

    for bad in (0, -1, 2.5, "10"):
        with pytest.raises(DiffuseError, match="shard_size"):
            engine.sample(**{**SAMPLE, "shard_size": bad})


# ---- the command line ----------------------------------------------------------------------------
def test_bad_nproc_is_one_line_and_exit_2(capsys):
    from diffuse_engine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sample", "--nproc", "x", "--checkpoint", "nowhere"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--nproc" in err and err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as exc:
        main(["--log-metrics", "m.csv", "likelihood", "--nproc", "2"])
    assert exc.value.code == 2
    assert "works with diffuse train, sample, run and inpaint, not 'likelihood'" in (
        capsys.readouterr().err
    )


def test_nproc_that_bypassed_main_is_refused_not_ignored():
    from typer.testing import CliRunner

    from diffuse_engine.cli import build_app

    result = CliRunner().invoke(build_app(), ["train", "--nproc", "2", "--steps", "1"])
    assert result.exit_code == 2 and "torchrun" in result.output


@pytest.mark.slow
def test_cli_nproc_2_trains_and_writes_the_single_process_samples(tmp_path):
    """The real thing: `diffuse train/sample --nproc 2` through torchrun (about a minute)."""
    import subprocess
    import sys

    def diffuse(*args):
        subprocess.run(
            [sys.executable, "-m", "diffuse_engine", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=600,
        )

    diffuse(
        "train",
        "--nproc",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--out",
        "t",
        "-q",
        "--set",
        "hidden=16",
        "--set",
        "depth=1",
        "--set",
        "plot_n=16",
        "--set",
        "plot_steps=2",
    )
    assert (
        json.loads((tmp_path / "t" / "config.json").read_text())["config"]["train"]["shards"] == 2
    )
    n = 10_500  # two shards of the default 10 000, so both ranks work
    diffuse("sample", "--nproc", "2", "-c", "t", "--n", str(n), "--steps", "3", "-o", "s2", "-q")
    diffuse("sample", "-c", "t", "--n", str(n), "--steps", "3", "-o", "s1", "-q")
    one, two = (torch.load(tmp_path / d / "samples.pt") for d in ("s1", "s2"))
    assert one.shape == (n, 2) and torch.equal(one, two)
    assert not (tmp_path / "s2.partial").exists()


def test_a_fit_that_fails_on_rank_0_is_reported_on_every_rank():
    from types import SimpleNamespace

    from diffuse_engine import DiffuseError
    from diffuse_engine.sampling.loop import _fit_on_main

    class Failing:
        def prepare(self, score, sde, like):
            raise DiffuseError("schedule 'gits': the pilot run gave NaN/Inf")

    sent = []

    def main_broadcast(obj):  # rank 0 sends what the others will get
        sent.append(obj)
        return obj

    main = SimpleNamespace(is_main=True, broadcast_object=main_broadcast)
    with pytest.raises(DiffuseError, match="the pilot run gave NaN"):
        _fit_on_main(Failing(), None, None, None, main)
    other = SimpleNamespace(is_main=False, broadcast_object=lambda obj: sent[0])
    with pytest.raises(DiffuseError, match="failed on rank 0: DiffuseError: .*pilot run gave NaN"):
        _fit_on_main(Failing(), None, None, None, other)  # it waits for nothing, fails too

"""Benchmark: inverse-problem guidance against the exact posterior of the mixture test bed.

Every method of :data:`diffuse_engine.testbed.inverse.METHODS` on every problem at every
budget, the particle trend of ``smc``, and the floor of exact posterior samples of the
same size (:func:`diffuse_engine.testbed.inverse.sweep`); writes JSON lines to
``--results`` and markdown tables to ``--report``. ``diffuse bench --inverse`` runs the same.

    flock /tmp/heavy.lock python benchmarks/inverse.py [--n 1000] [--budgets 20,50,100,1000]
    flock /tmp/heavy.lock python benchmarks/inverse.py --check   # docs/inverse-check.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffuse_engine import Engine
from diffuse_engine.testbed import inverse as I

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="samples per cell (ring: 2n)")
    p.add_argument("--budgets", default="20,50,100,1000")
    p.add_argument("--methods", default=",".join(I.METHODS))
    p.add_argument("--problems", default="ring-x0,gmm64-half,gmm64-proj,image-box")
    p.add_argument("--particles", default="1,4,16,32", help="smc trend at NFE 100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=ROOT / "docs/inverse.jsonl")
    p.add_argument("--report", type=Path, default=ROOT / "docs/inverse-tables.md")
    p.add_argument("--digits", type=Path, help="a digits U-Net training folder: inpaint instead")
    p.add_argument("--steps", type=int, default=100, help="--digits: ddim steps")
    p.add_argument("--smc-particles", type=int, default=4, help="--digits: smc particles")
    p.add_argument("--scale", type=float, default=1.0, help="--digits: dps / pigdm scale")
    p.add_argument("--check", action="store_true", help="the particle target, over seeds")
    p.add_argument("--check-seeds", default="ring-x0=16,gmm64-half=3,gmm64-proj=3,image-box=3")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # fastest on a shared machine for these batch sizes
    if a.check:
        seeds = {k: int(v) for k, v in (kv.split("=") for kv in a.check_seeds.split(","))}
        rows = I.particle_check(
            Engine(), names=a.problems.split(","), seeds=seeds, n=a.n,
            log=lambda msg: print(msg, flush=True),
        )  # fmt: skip
        (ROOT / "docs/inverse-check.md").write_text(I.check_table(rows))
        return None
    if a.digits is not None:
        return digits(
            a.digits, a.n, a.methods.split(","), a.steps, a.seed, a.smc_particles, a.scale
        )
    a.results.unlink(missing_ok=True)
    cells, floors = I.sweep(
        Engine(),
        names=a.problems.split(","),
        methods=tuple(a.methods.split(",")),
        budgets=tuple(int(b) for b in a.budgets.split(",")),
        particles=tuple(int(k) for k in a.particles.split(",")),
        n=a.n,
        seed=a.seed,
        results=a.results,
        log=lambda msg: print(msg, flush=True),
    )
    a.report.write_text(I.report(cells, floors, a.n))


def digits(
    folder: Path, n: int, methods: list[str], steps: int, seed: int, particles: int, scale: float
) -> None:
    """The bottom half of ``n`` held-out digits hidden; each method completes them and a
    logistic regression trained on the training digits labels the completions. Writes
    docs/inverse-digits.md (the table) and docs/img/inverse-digits.png."""
    from diffuse_engine import NumericalError
    from diffuse_engine.testbed import inpaint as P
    from diffuse_engine.training import load_trained, sample_overrides

    torch.set_num_threads(2)
    engine = Engine()
    model, ckpt = load_trained(engine, folder, ema=True)
    test, train = engine.build("data", "digits", split="test"), engine.build("data", "digits")
    x, labels = test.load()[:n].float(), test.labels[:n]
    cond = P.condition(x, mask=P.parse_mask("bottom", tuple(x.shape[1:]), len(x)))
    agree = lambda imgs: P.classifier_agreement(train.load(), train.labels, imgs, labels)  # noqa: E731
    rows = [
        ("original digits", "", agree(x), 0.0),
        ("observed half only", "", agree(cond["y"]), 0.0),
    ]
    panels = [("observed", P.observed_view(cond, tuple(x.shape)))]
    for method in methods:
        kw = {"steps": steps, "eta": 1.0}
        if method == "repaint":
            kw.update(steps=steps // 3, resamplings=3, jump_length=5)
        if method == "smc":
            kw["particles"] = particles
        if method in ("dps", "pigdm"):
            kw["scale"] = scale
        try:
            res = engine.sampling(
                score=model, sde=ckpt.config["sde"]["type"], solver="ddim", shape=tuple(x.shape),
                seed=seed, cond=cond, guidance=method, **sample_overrides(ckpt.config), **kw,
            )  # fmt: skip
        except NumericalError as exc:  # dps diverges on coarse grids: a result, not a crash
            rows.append((method, kw["steps"] + 1, float("nan"), float("nan")))
            print(method, exc, flush=True)
            continue
        rows.append((method, res.nfe, agree(res.samples), P.observation_error(res.samples, cond)))
        print(rows[-1], f"{res.seconds:.0f} s", flush=True)
        panels.append((method, res.samples))
    panels.append(("original", x))
    P.save_grids(ROOT / "docs/img/inverse-digits.png", panels, cols=6)
    head = f"{len(x)} held-out digits, {steps} steps, smc K={particles}, scale {scale}"
    lines = [f"<!-- written by benchmarks/inverse.py --digits: {head} -->",
             "| completions | NFE | classifier agrees with the original label | observation RMS |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]:.1%} | {r[3]:.2g} |"
        if r[2] == r[2]
        else f"| {r[0]} | {r[1]} | diverged (NaN/Inf) | - |"
        for r in rows
    ]
    (ROOT / "docs/inverse-digits.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

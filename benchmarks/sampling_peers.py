"""The engine's registry defaults against diffusers' and k-diffusion's samplers on the same beds.

    python benchmarks/sampling_peers.py --budgets 5,10,20,50 --beds ring,mix64,ring12-1to20

Needs diffusers (the ``bench`` extra) and, for k-diffusion,
``pip install --no-deps k-diffusion==0.1.1.post1``: its wheel's requirements pull another
torch (``pip install --dry-run k-diffusion`` wants torch 2.14 and CUDA wheels), which
this project's machines must not install, and its package ``__init__`` imports training
utilities (torchvision, clip, kornia, ...) that sampling does not need. So only its
``k_diffusion/sampling.py`` is loaded, unchanged, under a bare package; when
torchvision is missing an empty module stands in for it (``k_diffusion.utils`` imports
it for image transforms, which sampling never calls). Without k-diffusion its peers are
skipped with a note.

Bed: the DDPM chain of diffusers' default scheduler (linear betas 1e-4 .. 0.02, 1000
steps) is the registry's ``ddpm`` SDE, so every sampler sees the same exact mixture:

* diffusers gets the noise prediction ``eps = -s(t) * score(x, t)`` at engine time
  ``(k + 1) / 1000`` of its timestep ``k``, one call per inference step
  (``num_inference_steps = N``, its final step to sigma 0 included: ``N`` evaluations).
  Variants: DPMSolverMultistep (dpmsolver++, order 2) with its default spacing, Karras
  sigmas and Lu lambdas.
* k-diffusion gets its denoiser ``D(x~, sigma)`` in the variance-exploding form it
  works in (``x~ = x / a``, ``sigma = s / a``): ``t`` with ``s(t) / a(t) = sigma`` by
  bisection on the chain's log-SNR, ``D = (x + s^2 score(x, t)) / a`` (Tweedie), from
  ``sigma_max = sigma(T)`` (prior ``N(0, (1 + sigma_max^2) I)``, the chain's own) to
  ``sigma_min = sigma(sampling_eps)``. Variants: ``sample_dpmpp_2m`` on Karras and on
  exponential (log-SNR) sigmas (``N`` evaluations, the last step to 0 a denoising
  step), ``sample_lms`` (order 4) on Karras sigmas, ``sample_heun`` on Karras sigmas
  (``(N + 1) // 2`` steps: ``N`` or ``N - 1`` evaluations) and ``sample_dpm_fast``
  (DPM-Solver-fast, ``N`` evaluations). Every peer's calls are counted and checked
  against its budget. ``sample_dpm_fast`` and ``sample_dpm_adaptive`` stop at
  ``sigma_min`` without a denoising step, so their samples keep noise of std 0.01
  (about 0.5 % on the narrowest mode std of these beds, 0.1).

The best variant per bed and budget is the peer. The engine: the registry's
``best-vp-B`` entry (the VP table; the chain is a VP SDE) for the bed's data size, as
``diffuse run --nfe N`` takes it (``best-vp-B-dim16`` from 16 numbers per sample), with
``nfe = N``. Prints and writes ``docs/suite/peers.jsonl`` (the cells run, bed and
budget, replace theirs; the others stay): per bed and budget the figure of each (each
floor-normalised error's mean over seeds 1..K, the worst of the three;
``suite.bed_error``), the engine / best-peer ratio, its 90 % bootstrap interval over
the seeds (``suite.ratio_interval``) and the verdict it gives (win, tie or loss).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from diffuse_engine.components.solver import best_at_budget
from diffuse_engine.testbed.bench import beds as B
from diffuse_engine.testbed.bench.suite import bed_error, ratio_interval, run_one

VARIANTS = {
    "dpmpp2m": {},
    "dpmpp2m-karras": {"use_karras_sigmas": True},
    "dpmpp2m-lu": {"use_lu_lambdas": True},
}


def diffusers_sample(score, sde, shape, nfe: int, seed: int, **kw) -> torch.Tensor:
    """DPMSolverMultistepScheduler on the exact score; ``nfe`` model calls."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **kw,
    )  # fmt: skip
    sched.set_timesteps(nfe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * sched.init_noise_sigma
    for k in sched.timesteps:
        t = torch.full((shape[0],), (float(k) + 1.0) / 1000, dtype=torch.float64)
        _, s = sde.marginal(t)
        eps = -s.view(-1, *[1] * (x.dim() - 1)) * score(x, t)
        x = sched.step(eps, k, x).prev_sample
    return x


def load_kdiffusion_sampling():
    """k-diffusion's ``sampling`` module, or ``None`` when k-diffusion is not installed
    (see the module docstring for why only that file is loaded)."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        stubs = {
            "torchvision": tv,
            "torchvision.transforms": tv.transforms,
            "torchvision.transforms.functional": tv.transforms.functional,
        }
    sys.modules.update(stubs)
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as exc:  # one of its own requirements (scipy, torchdiffeq, ...)
        print(f"k-diffusion's sampling module does not import ({exc}): its peers are skipped")
        sys.modules.pop("k_diffusion", None)
        return None
    finally:  # gone again, so that diffusers' own probe for torchvision is not misled
        for name in stubs:
            sys.modules.pop(name, None)


class Counted:
    """A score function that counts its calls (one call is one score evaluation)."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score(x, t)


def kdiffusion_start(score, sde, shape, seed: int):
    """``(D, counter, x~_T, sigma_min, sigma_max)`` for a k-diffusion sampler on the
    chain: the exact score as its denoiser through :func:`diffuse_engine.interop.
    to_denoiser`, a counter of its score calls and the prior ``N(0, (1 + sigma_max^2)
    I)`` in the ``x~ = x / a`` form it works in."""
    from diffuse_engine.interop import to_denoiser

    counted = Counted(score)
    model = to_denoiser(counted, sde)  # the engine's k-diffusion bridge
    smax, smin = model.sigma_max, model.sigma_min
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(1.0 + smax**2)
    return model, counted, x, smin, smax


def kdiffusion_sample(K, score, sde, shape, nfe: int, seed: int, variant: str) -> torch.Tensor:
    """One k-diffusion sampler on the exact score with ``nfe`` evaluations at most."""
    model, counted, x, smin, smax = kdiffusion_start(score, sde, shape, seed)
    if variant == "kd-dpm-fast":
        out = K.sample_dpm_fast(model, x, smin, smax, nfe, disable=True)
        budget = nfe
    else:
        steps = (nfe + 1) // 2 if variant == "kd-heun-karras" else nfe
        budget = 2 * steps - 1 if variant == "kd-heun-karras" else nfe
        if variant == "kd-dpmpp2m-exp":
            sigmas = K.get_sigmas_exponential(steps, smin, smax)
        else:
            sigmas = K.get_sigmas_karras(steps, smin, smax)
        sigmas = sigmas.to(torch.float64)
        fn = {
            "kd-dpmpp2m-karras": K.sample_dpmpp_2m,
            "kd-dpmpp2m-exp": K.sample_dpmpp_2m,
            "kd-lms-karras": K.sample_lms,
            "kd-heun-karras": K.sample_heun,
        }[variant]
        out = fn(model, x, sigmas, disable=True)
    assert counted.calls == budget <= nfe, (variant, counted.calls, nfe)
    # back from k-diffusion's x~ = x / a at sigma 0 (a = 1) or sigma_min (dpm_fast)
    a_end = 1.0 if variant != "kd-dpm-fast" else 1.0 / math.sqrt(1.0 + smin**2)
    return out * a_end


KD_VARIANTS = (
    "kd-dpmpp2m-karras",
    "kd-dpmpp2m-exp",
    "kd-lms-karras",
    "kd-heun-karras",
    "kd-dpm-fast",
)


def adaptive_comparison(e, floors, beds: list[str], seeds: range, K) -> None:
    """The engine's ``dpm_adaptive`` and ``dpm_adaptive_ms`` (their defaults) against k-diffusion's
    ``sample_dpm_adaptive`` (its defaults: DPM-Solver-23, rtol 0.05, atol 0.0078) on the
    chain: each one's figure and its most evaluations over the seeds, into
    ``docs/suite/peers-adaptive.jsonl``."""
    from diffuse_engine.components.mixture import mode_statistics
    from diffuse_engine.testbed.bench.beds import normalised

    out = Path("docs/suite/peers-adaptive.jsonl")
    part = out.with_suffix(".partial")
    part.unlink(missing_ok=True)
    for name in beds:
        bed = B.bed(name)
        sde = e.build("sde", "ddpm")
        score = e.build("score", bed.entry, sde=sde)
        floor = floors.of(score.mixture, bed.name, bed.n)
        ours = {
            entry: [run_one(e, bed, "ddpm", entry, {}, None, s, floors) for s in seeds]
            for entry in ("dpm_adaptive", "dpm_adaptive_ms")
        }
        kd, kd_nfe = [], 0
        for seed in seeds:
            model, counted, x, smin, smax = kdiffusion_start(
                score, sde, (bed.n, *score.data_shape), seed
            )
            x, info = K.sample_dpm_adaptive(model, x, smin, smax, disable=True, return_info=True)
            x = x / math.sqrt(1.0 + smin**2)  # x~ at sigma_min back to x
            r = normalised(mode_statistics(x, score.mixture), floor)
            kd.append({**{f"{m}_ratio": r[m] for m in B.METRICS}, "worst": r["worst"]})
            kd_nfe = max(kd_nfe, counted.calls)
        rec = {"bed": name, "seeds": len(seeds)}
        for entry, recs in ours.items():
            rec[f"{entry}_worst"] = bed_error(recs)
            rec[f"{entry}_nfe"] = max(r["nfe"] for r in recs)
        rec.update({"kdiffusion_worst": bed_error(kd), "kdiffusion_nfe": kd_nfe})
        print(
            f"{name:14s} "
            + "  ".join(f"{k} {rec[k + '_worst']:6.2f} ({rec[k + '_nfe']})" for k in ours)
            + f"  k-diffusion {rec['kdiffusion_worst']:6.2f} ({kd_nfe})",
            flush=True,
        )
        with part.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
    rerun = set(beds)
    if out.exists():  # the other beds' cells stay as they were measured
        kept = [ln for ln in out.read_text().splitlines() if json.loads(ln)["bed"] not in rerun]
        new = part.read_text()
        part.write_text("".join(f"{ln}\n" for ln in kept) + new)
    part.replace(out)


def main() -> None:
    from diffuse_engine.components.mixture import mode_statistics
    from diffuse_engine.testbed.bench.beds import normalised

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="5,10,20,50")
    ap.add_argument("--beds", default="ring,ring-wide,mix16,mix64,ring12-1to20,mix32-1to50")
    ap.add_argument("--seeds", type=int, default=8, help="seeds 1..K per cell")
    ap.add_argument(
        "--adaptive",
        action="store_true",
        help="compare the adaptive solvers (dpm_adaptive, k-diffusion's) instead",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from sampling_suite import engine

    e, floors = engine(), B.Floors()
    K = load_kdiffusion_sampling()
    if K is None:
        print("k-diffusion is not installed: its peers are skipped (see the docstring)")
    if args.adaptive:
        if K is None:
            raise SystemExit("--adaptive compares with k-diffusion, which is not installed")
        adaptive_comparison(e, floors, args.beds.split(","), range(1, 1 + args.seeds), K)
        return
    out = Path("docs/suite/peers.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".partial")  # the old results stay until the new are complete
    part.unlink(missing_ok=True)
    for name in args.beds.split(","):
        bed = B.bed(name)
        sde = e.build("sde", "ddpm")
        score = e.build("score", bed.entry, sde=sde)
        floor = floors.of(score.mixture, bed.name, bed.n)
        for nfe in (int(b) for b in args.budgets.split(",")):
            entry = best_at_budget(e.registry.names("solver"), "vp", nfe, bed.dims)
            seeds = range(1, 1 + args.seeds)
            mine = [run_one(e, bed, "ddpm", entry, {}, nfe, s, floors, label=entry) for s in seeds]
            peers, per_seed = {}, {}
            shape = (bed.n, *score.data_shape)
            labels = [*VARIANTS, *(KD_VARIANTS if K is not None else ())]
            for label in labels:
                recs = []
                for seed in seeds:
                    if label in VARIANTS:
                        x = diffusers_sample(score, sde, shape, nfe, seed, **VARIANTS[label])
                    else:
                        x = kdiffusion_sample(K, score, sde, shape, nfe, seed, label)
                    r = normalised(mode_statistics(x, score.mixture), floor)
                    recs.append({**{f"{m}_ratio": r[m] for m in B.METRICS}, "worst": r["worst"]})
                peers[label], per_seed[label] = bed_error(recs), recs
            best = min(peers, key=peers.get)
            lo, hi = ratio_interval(mine, per_seed[best])
            rec = {
                "bed": name,
                "nfe": nfe,
                "engine": entry,
                "seeds": args.seeds,
                "engine_worst": bed_error(mine),
                "peers": peers,
                "best_peer": best,
                "ratio": bed_error(mine) / peers[best],
                "ratio_90": [lo, hi],
                "verdict": "win" if hi < 1 else "loss" if lo > 1 else "tie",
            }
            print(
                f"{name:14s} nfe {nfe:3d}  engine {rec['engine_worst']:7.2f}  {best} "
                f"{peers[best]:7.2f}  ratio {rec['ratio']:.2f} [{lo:.2f}, {hi:.2f}] "
                f"{rec['verdict']}",
                flush=True,
            )
            with part.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
    rerun = {(b, int(n)) for b in args.beds.split(",") for n in args.budgets.split(",")}
    if out.exists():  # the other cells stay as they were measured
        kept = [
            ln
            for ln in out.read_text().splitlines()
            if (json.loads(ln)["bed"], json.loads(ln)["nfe"]) not in rerun
        ]
        new = part.read_text()
        part.write_text("".join(f"{ln}\n" for ln in kept) + new)
    part.replace(out)


if __name__ == "__main__":
    main()

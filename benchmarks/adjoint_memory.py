"""Peak memory of adjoint vs direct backpropagation through the samplers.

For 100 and 1000 steps, the gradient of a loss on generated samples with respect to a
small MLP score network's parameters, through

* the reverse-time SDE (torchsde, Euler-Maruyama; and reversible Heun, whose adjoint
  is exact), direct ``sdeint`` + backprop vs ``sdeint_adjoint``;
* the probability-flow ODE (torchdiffeq, fixed-grid RK4), ``odeint`` + backprop vs
  ``odeint_adjoint``.

Each configuration runs in a fresh process. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the forward+backward pass; on CPU the growth
of the process's peak resident set (``ru_maxrss``) over the forward+backward pass,
measured after a warm-up solve, so it counts only what the solve itself holds. Also
reported: seconds and the gradient's relative difference to direct backprop (adjoint
rows). Writes the table into docs/likelihood.md between markers.

    python benchmarks/adjoint_memory.py [--device cuda] [--batch 1024]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

from doc_section import replace_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "likelihood.md"
BEGIN, END = "<!-- adjoint-memory:begin -->", "<!-- adjoint-memory:end -->"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(args: dict, queue) -> None:
    import torch
    from torch import nn

    from diffuse_engine import Engine
    from diffuse_engine.components.differentiable import probability_flow_solve, reverse_sde_solve

    torch.set_num_threads(1)
    device = torch.device(args["device"])
    engine = Engine(autoload=False)
    sde = engine.build("sde", "vp")

    class MLPScore(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2)
            )

        def forward(self, x, t):
            return self.net(torch.cat([x, t[:, None]], 1))

    torch.manual_seed(0)
    net = MLPScore().to(device)
    g = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn(args["batch"], 2, generator=g, device=device)
    w = torch.randn(args["batch"], 2, generator=g, device=device)

    def solve(steps):
        if args["kind"] == "sde":
            return reverse_sde_solve(
                net,
                sde,
                x_T,
                method=args["method"],
                steps=steps,
                entropy=3,
                adjoint=args["adjoint"],
            )
        return probability_flow_solve(
            net, sde, x_T, method="rk4", steps=steps, adjoint=args["adjoint"]
        )

    def grad(steps):
        net.zero_grad()
        (solve(steps) * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    grad(4)  # warm-up: allocator, kernels, library caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss_mib()
    start = time.perf_counter()
    gr = grad(args["steps"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = _peak_rss_mib() - base
    seconds = time.perf_counter() - start
    queue.put({"peak_mib": peak, "seconds": seconds, "grad": gr.cpu().tolist()})


def measure(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_one, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--no-doc", action="store_true", help="print only")
    a = ap.parse_args()
    rows = []
    configs = [("sde", "euler"), ("sde", "reversible_heun"), ("ode", "rk4")]
    for kind, method in configs:
        for steps in a.steps:
            res = {}
            for adjoint in (False, True):
                res[adjoint] = measure(
                    dict(
                        kind=kind,
                        method=method,
                        steps=steps,
                        adjoint=adjoint,
                        batch=a.batch,
                        device=a.device,
                    )
                )
            import torch

            gd, ga = torch.tensor(res[False]["grad"]), torch.tensor(res[True]["grad"])
            diff = float((ga - gd).norm() / gd.norm())
            rows.append(
                (
                    kind,
                    method,
                    steps,
                    res[False]["peak_mib"],
                    res[True]["peak_mib"],
                    res[False]["seconds"],
                    res[True]["seconds"],
                    diff,
                )
            )
            print(rows[-1], flush=True)
    lines = [
        f"Device `{a.device}`, batch {a.batch}, 2-D data, MLP score (3-128-128-2), "
        "float32, VP SDE; gradient of a linear loss on the samples w.r.t. the "
        "network's parameters. Peak memory is the growth over the forward + backward "
        "pass (CPU: peak RSS; CUDA: max allocated).",
        "",
        "| solve | method | steps | direct peak MiB | adjoint peak MiB | direct s | "
        "adjoint s | grad rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, method, steps, pd, pa, sd, sa, diff in rows:
        lines.append(
            f"| {kind} | {method} | {steps} | {pd:.1f} | {pa:.1f} | {sd:.2f} | "
            f"{sa:.2f} | {diff:.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    if not a.no_doc:
        replace_section(DOC, BEGIN, END, table)


if __name__ == "__main__":
    main()

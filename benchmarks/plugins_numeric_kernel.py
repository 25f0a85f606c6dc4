"""Cost and accuracy of the numeric kernel of linear SDEs (diffuse_engine.components.linear).

For VP, sub-VP and VE declared by f and g alone (``kernel = "numeric"`` on the built-in
entries) and the cosine schedule: the one-off table build time, the time of one
``marginal(t)`` call for a batch of 8192 times (numeric vs the closed form, measured in
the same run), and the largest relative error of mean coefficient and std against the
closed form over 4000 log- and uniformly-spaced times in ``[1e-5, 1]``, float64 and
float32. Writes the table into docs/plugins.md between markers.

    python benchmarks/plugins_numeric_kernel.py [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
BEGIN, END = "<!-- numeric-kernel:begin -->", "<!-- numeric-kernel:end -->"


def cosine_closed_form(sde):
    c = sde.config
    phi0 = c.s / (1 + c.s) * math.pi / 2

    def marginal(t):
        a = torch.cos((c.end * t + c.s) / (1 + c.s) * math.pi / 2) / math.cos(phi0)
        return a, (1 - a**2).sqrt()

    return marginal


def timed(fn, device, repeat=200) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    from diffuse_engine import Engine

    engine = Engine(autoload=False)
    t64 = torch.cat(
        [
            torch.logspace(-5, 0, 2000, dtype=torch.float64),
            torch.linspace(1e-5, 1, 2000, dtype=torch.float64),
        ]
    ).to(device)
    tb = torch.rand(8192, generator=torch.Generator().manual_seed(0)).to(device) * 0.999 + 1e-3
    rows = []
    for name in ("vp", "subvp", "ve", "cosine"):
        start = time.perf_counter()
        numeric = engine.build("sde", name, kernel="numeric")
        numeric.marginal(t64[:1])
        build = time.perf_counter() - start
        if name == "cosine":
            closed = cosine_closed_form(numeric)
        else:
            closed = engine.build("sde", name).marginal
        errs = []
        for dtype in (torch.float64, torch.float32):
            a, s = numeric.marginal(t64.to(dtype))
            ra, rs = closed(t64)
            errs.append(
                max(
                    float(((a.double() - ra) / ra).abs().max()),
                    float(((s.double() - rs) / rs).abs().max()),
                )
            )
        t_num = timed(lambda k=numeric: k.marginal(tb), device)
        t_closed = timed(lambda f=closed: f(tb), device)
        rows.append(
            (
                name,
                f"{build * 1e3:.0f}",
                f"{t_num * 1e6:.0f}",
                f"{t_closed * 1e6:.0f}",
                f"{t_num / t_closed:.1f}",
                f"{errs[0]:.1e}",
                f"{errs[1]:.1e}",
            )
        )
    head = (
        "SDE",
        "table build (ms)",
        "marginal, numeric (us)",
        "marginal, closed form (us)",
        "ratio",
        "max rel. error f64",
        "max rel. error f32",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    note = (
        f"\n\nMeasured by `benchmarks/plugins_numeric_kernel.py` on {device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}); batch of 8192 "
        "times per call; errors over 4000 times in [1e-5, 1]."
    )
    print(table + note)
    text = DOC.read_text()
    if BEGIN in text and END in text:
        i, j = text.index(BEGIN), text.index(END)
        DOC.write_text(text[: i + len(BEGIN)] + "\n" + table + note + "\n" + text[j:])
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()

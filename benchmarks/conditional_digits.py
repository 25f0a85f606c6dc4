"""Benchmark: class-conditional U-Net on scikit-learn's 8x8 digits, classifier-free guidance.

Trains ``[train.digits]`` (U-Net, VP SDE, continuous DSM) with ``num_classes = 10`` and
``label_dropout`` (the null label trains the unconditional score in the same network,
Ho & Salimans 2022) for a wall-clock budget, then samples every class at classifier-free
guidance scales ``w`` (``s_c + w (s_c - s_u)``; 0 is plain conditional sampling) with
the EMA weights. An independent scikit-learn classifier (``MLPClassifier``, trained on
the real training digits, judged on the held-out split) labels the samples; the figure
of merit is the fraction classified as the requested class, overall and per class.

Writes the table into docs/conditional.md (between the ``digits`` markers), a 10x10
grid (rows are classes) to docs/img/conditional-digits.png, the accuracy-versus-scale
plot to docs/img/conditional-digits-scale.png and everything to OUT/results.json.

    python benchmarks/conditional_digits.py [--minutes 13] [--per-class 50] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffuse_engine import Engine

ROOT = Path(__file__).resolve().parents[1]
SCALES = (0.0, 1.0, 2.0, 4.0)


def judge(tr_x, tr_y, te_x, te_y):
    """The independent classifier and its held-out accuracy."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=1000, random_state=0)
    clf.fit(tr_x, tr_y)
    return clf, float((clf.predict(te_x) == te_y).mean())


def update_doc(path: Path, marker: str, text: str) -> None:
    """Replace the block between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def plot_scale(scales, overall, per_class, path: Path) -> None:
    """Accuracy against guidance scale: overall and the worst class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(scales, overall, "o-", label="all classes")
    ax.plot(scales, [min(p) for p in per_class], "s--", label="worst class")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.axhline(0.8, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("classifier-free guidance scale w  (diffusers: 1 + w)")
    ax.set_ylabel("classified as the requested class")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=13.0, help="training wall-clock limit")
    ap.add_argument("--per-class", type=int, default=50, help="samples per class and scale")
    ap.add_argument("--label-dropout", type=float, default=0.15)
    # the committed results (docs/conditional.md) were sampled with these 2M settings
    ap.add_argument("--solver", default="dpm_solver_pp_ring")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-conditional-digits")
    ap.add_argument("--resume", action="store_true", help="only sample/evaluate OUT")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    engine = Engine()
    torch.set_num_threads(args.threads)
    if args.resume:
        from diffuse_engine.training import load_trained

        model, ckpt = load_trained(engine, args.out)
        steps = ckpt.step
        seconds = json.loads((args.out / "status.json").read_text()).get("seconds", float("nan"))
    else:
        res = engine.training(
            preset="digits",
            out=args.out,
            overwrite=True,
            progress=True,
            max_seconds=args.minutes * 60,
            threads=args.threads,
            num_classes=10,
            label_dropout=args.label_dropout,
            plot_n=0,
        )
        model, steps, seconds = res.model, res.step, res.seconds
    print(f"trained {steps} steps in {seconds:.0f} s", flush=True)

    train = engine.build("data", "digits")
    test = engine.build("data", "digits", split="test")
    tr_x, tr_y = train.data.reshape(len(train), 64).numpy(), train.labels.numpy()
    te_x, te_y = test.data.reshape(len(test), 64).numpy(), test.labels.numpy()
    clf, test_acc = judge(tr_x, tr_y, te_x, te_y)

    k = args.per_class
    labels = torch.arange(10).repeat_interleave(k)  # rows of each class together
    overall, per_class, nfe, sample_seconds, grids = [], [], [], [], {}
    for w in SCALES:
        t0 = time.perf_counter()
        result = engine.sampling(
            score=model,
            sde="vp",
            solver=args.solver,
            shape=(10 * k, 1, 8, 8),
            seed=0,
            steps=args.sample_steps,
            cond={"label": labels},
            guidance="cfg",
            scale=w,
        )
        sample_seconds.append(time.perf_counter() - t0)
        x = result.samples.clamp(-1, 1)
        pred = clf.predict(x.reshape(len(x), 64).numpy())
        hit = pred == labels.numpy()
        per_class.append([float(hit[labels.numpy() == c].mean()) for c in range(10)])
        overall.append(float(hit.mean()))
        nfe.append(result.nfe)
        grids[w] = x.reshape(10, k, 1, 8, 8)[:, :10].reshape(-1, 1, 8, 8)
        print(f"scale {w}: {overall[-1]:.1%} (worst class {min(per_class[-1]):.1%})", flush=True)

    best = int(np.argmax(overall))
    w_best = SCALES[best]
    from diffuse_engine.output.image_grid import plot_image_grid

    grid_path = args.out / "conditional-grid.png"
    plot_image_grid(
        grids[w_best],
        grid_path,
        nrow=min(k, 10),
        title=f"rows: classes 0-9; cfg scale {w_best:g}, {steps} training steps",
    )
    scale_path = args.out / "conditional-scale.png"
    plot_scale(SCALES, overall, per_class, scale_path)
    results = {
        "train_steps": steps,
        "train_seconds": round(seconds, 1),
        "label_dropout": args.label_dropout,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "solver": args.solver,
        "sample_steps": args.sample_steps,
        "per_class": k,
        "scales": list(SCALES),
        "nfe": nfe,
        "sample_seconds": [round(s, 1) for s in sample_seconds],
        "accuracy": overall,
        "accuracy_per_class": per_class,
        "best_scale": w_best,
        "classifier_test_accuracy": test_acc,
        "torch_threads": args.threads,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    ok = overall[best] >= 0.9 and min(per_class[best]) >= 0.8
    rows = [
        "| cfg scale w | score evaluations | classified as requested | worst class | "
        "per class 0..9 |",
        "|---|---|---|---|---|",
    ]
    for i, w in enumerate(SCALES):
        pcs = ", ".join(f"{p:.0%}" for p in per_class[i])
        rows.append(f"| {w:g} | {nfe[i]} | {overall[i]:.1%} | {min(per_class[i]):.0%} | {pcs} |")
    table = "\n".join(
        [
            f"Training: {steps} steps in {seconds / 60:.1f} min ({args.threads} torch thread), "
            f"U-Net of {results['model_parameters']:,} parameters, label dropout "
            f"{args.label_dropout}. Sampling: {args.solver}, {args.sample_steps} steps, "
            f"{k} samples per class and scale, seed 0. Judge: MLPClassifier, held-out "
            f"accuracy {test_acc:.3f} (target >= 0.97).",
            "",
            *rows,
            "",
            f"Best scale {w_best:g}: {overall[best]:.1%} overall (target >= 90%), worst class "
            f"{min(per_class[best]):.0%} (target >= 80%): targets {'met' if ok else 'NOT met'}. "
            f"Load average at the end: {results['load_average_at_end']} (2 shared cores).",
        ]
    )
    print(table)
    if not args.no_docs:
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "img" / "conditional-digits.png").write_bytes(grid_path.read_bytes())
        (ROOT / "docs" / "img" / "conditional-digits-scale.png").write_bytes(
            scale_path.read_bytes()
        )
        update_doc(ROOT / "docs" / "conditional.md", "digits", table)


if __name__ == "__main__":
    main()

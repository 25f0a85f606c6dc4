"""Benchmark: a U-Net trained on scikit-learn's 8x8 digits for at most 15 minutes.

Trains ``[train.digits]`` (U-Net, VP SDE, continuous DSM) with a wall-clock limit,
samples with the EMA weights, and judges the samples with a fixed classifier trained
here on the real training digits (scikit-learn ``MLPClassifier``):

* confidence: the fraction of samples whose top class probability is >= 0.9, and
  which of the ten classes occur among them;
* a Frechet distance (Heusel et al. 2017, the FID formula) between Gaussians fitted
  to the classifier's hidden-layer features of the samples and of the held-out real
  digits, next to the same figure for real training digits (real vs real) and for
  uniform noise, all with the same number of images.

Writes the table into docs/training.md (between the ``digits`` markers), the sample
grid to docs/img/train-digits.png and everything to OUT/results.json.

    python benchmarks/train_digits.py [--minutes 15] [--n 500] [--out runs/bench-digits]
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


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b``."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def classifier(train_x: np.ndarray, train_y: np.ndarray):
    """A fixed digit classifier and its hidden-layer feature map."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=1000, random_state=0)
    clf.fit(train_x, train_y)

    def features(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)

    return clf, features


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-clock limit")
    ap.add_argument("--n", type=int, default=500, help="samples to judge")
    ap.add_argument("--solver", default="ancestral")
    ap.add_argument("--sample-steps", type=int, default=500)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: best on a shared 2-core machine)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-digits")
    ap.add_argument("--resume", action="store_true", help="only sample/evaluate OUT")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()

    engine = Engine()
    torch.set_num_threads(args.threads)
    if args.resume:
        from diffuse_engine.training import load_trained

        model, ckpt = load_trained(engine, args.out)
        train_info = json.loads((args.out / "status.json").read_text())
        steps, seconds = ckpt.step, train_info.get("seconds", float("nan"))
    else:
        res = engine.training(
            preset="digits",
            out=args.out,
            overwrite=True,
            progress=True,
            max_seconds=args.minutes * 60,
            threads=args.threads,
        )
        model, steps, seconds = res.model, res.step, res.seconds
    print(f"trained {steps} steps in {seconds:.0f} s", flush=True)

    t0 = time.perf_counter()
    result = engine.sampling(
        score=model,
        sde="vp",
        solver=args.solver,
        shape=(args.n, 1, 8, 8),
        seed=0,
        steps=args.sample_steps,
        progress=True,
    )
    sample_seconds = time.perf_counter() - t0
    x = result.samples.clamp(-1, 1).reshape(args.n, 64).numpy()

    train = engine.build("data", "digits")
    test = engine.build("data", "digits", split="test")
    tr_x, tr_y = train.data.reshape(len(train), 64).numpy(), train.labels.numpy()
    te_x, te_y = test.data.reshape(len(test), 64).numpy(), test.labels.numpy()
    clf, feats = classifier(tr_x, tr_y)
    test_acc = float((clf.predict(te_x) == te_y).mean())
    proba = clf.predict_proba(x)
    conf = proba.max(1)
    confident = conf >= 0.9
    classes = sorted(set(proba.argmax(1)[confident].tolist()))
    counts = np.bincount(proba.argmax(1), minlength=10).tolist()
    real_conf = float((clf.predict_proba(te_x).max(1) >= 0.9).mean())
    noise = np.random.default_rng(1).uniform(-1, 1, size=(args.n, 64))
    noise_conf = float((clf.predict_proba(noise).max(1) >= 0.9).mean())

    m = len(te_x)  # compare equal-sized sets against the held-out digits
    rng = np.random.default_rng(0)
    f_test = feats(te_x)
    fd_samples = frechet(feats(x[:m]), f_test)
    fd_real = frechet(feats(tr_x[rng.choice(len(tr_x), m, replace=False)]), f_test)
    fd_noise = frechet(feats(rng.uniform(-1, 1, size=(m, 64))), f_test)

    from diffuse_engine.output.image_grid import plot_image_grid

    grid_path = args.out / "samples-grid.png"
    plot_image_grid(
        result.samples[:100],
        grid_path,
        title=f"U-Net on 8x8 digits: {steps} steps, {seconds / 60:.1f} min",
    )
    results = {
        "train_steps": steps,
        "train_seconds": round(seconds, 1),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "samples": args.n,
        "solver": args.solver,
        "sample_steps": args.sample_steps,
        "sample_seconds": round(sample_seconds, 1),
        "confident_fraction": float(confident.mean()),
        "confident_classes": classes,
        "predicted_class_counts": counts,
        "classifier_test_accuracy": test_acc,
        "real_test_confident_fraction": real_conf,
        "noise_confident_fraction": noise_conf,
        "frechet_samples_vs_heldout": fd_samples,
        "frechet_real_vs_heldout": fd_real,
        "frechet_noise_vs_heldout": fd_noise,
        "frechet_n": m,
        "torch_threads": args.threads,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    ok_conf = results["confident_fraction"] >= 0.7 and len(classes) == 10
    table = "\n".join(
        [
            "| quantity | value | target |",
            "|---|---|---|",
            f"| training | {steps} steps, {seconds / 60:.1f} min wall, "
            f"{args.threads} torch thread(s) | <= 15 min |",
            f"| U-Net parameters | {results['model_parameters']:,} | |",
            f"| sampling | {args.n} samples, {args.solver} {args.sample_steps} steps, "
            f"{sample_seconds:.0f} s | |",
            f"| samples with classifier confidence >= 0.9 | "
            f"{results['confident_fraction']:.1%} | >= 70% |",
            f"| classes among confident samples | {len(classes)} of 10 | 10 |",
            f"| predicted class counts 0..9 | {counts} | |",
            f"| Frechet distance, samples vs held-out (n={m}) | {fd_samples:.2f} | |",
            f"| Frechet distance, real train vs held-out (n={m}) | {fd_real:.2f} | floor |",
            f"| Frechet distance, uniform noise vs held-out (n={m}) | {fd_noise:.2f} | ceiling |",
            f"| classifier: held-out accuracy / confident fraction on real | "
            f"{test_acc:.3f} / {real_conf:.1%} | |",
            f"| confident fraction on uniform noise | {noise_conf:.1%} | baseline |",
            "",
            f"Verdict: confidence target {'met' if ok_conf else 'NOT met'}. Machine load average "
            f"at the end: {results['load_average_at_end']} (2 cores shared with other jobs).",
        ]
    )
    print(table)
    if not args.no_docs:
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "img" / "train-digits.png").write_bytes(grid_path.read_bytes())
        update_doc(ROOT / "docs" / "training.md", "digits", table)


if __name__ == "__main__":
    main()

"""Pruning during training vs pruning then fine-tuning, at high sparsity, on two Fashion-MNIST CNNs.

Models: the bundled CNN (`examples/models/fashion_cnn.onnx`, BatchNorm kept) and the held-out
residual+Concat CNN (`fashion_resconcat.onnx`, BatchNorm folded by the exporter's defaults, never used in
tests). Settings (`--settings`): 90% and 95% unstructured and 80% in 16x1 blocks of the Conv/Gemm weights
(uniform per layer). Each `FineTune` schedule gets the same training budget (`--epochs` over the first
`--train-images` training images, Adam, cosine LR, labels + distillation from the dense model):

- `oneshot`: zero the smallest weights at once (BatchNorm re-estimated), then fine-tune with the mask fixed;
- `gmp`: Zhu & Gupta's cubic ramp from 0 to the target over the first `--ramp` of the steps, masks
  recomputed `--updates` times over the ramp, BatchNorm re-estimated after each, then training at it;
- `imp` (with `--methods ... imp`): `--rounds` rounds of train, prune, rewind (each round a full budget,
  so it trains rounds+1 times as long; listed for reference, not an equal-budget comparison).

Test top-1 is measured on the first `--test-images` test images, with dense and the one-shot model before any training
(BatchNorm not re-estimated) as references.

    python examples/fashion_mnist.py --out /tmp/fm      # needs the Debian package dataset-fashion-mnist
    python examples/bench_gmp.py --data /tmp/fm [--epochs 2] [--train-images 10000] [--out out/bench_gmp]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tables import markdown_table, write_report  # noqa: E402

from pcc.backends.onnx.runtime import top1_accuracy  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.options import SPARSIFY_ALLOCATORS  # noqa: E402
from pcc.passes.transforms import FineTune, FineTuneReport  # noqa: E402
from pcc.passes.transforms.schedules import SCHEDULES  # noqa: E402
from pcc.passes.transforms.sparsify_weights import SparsifyWeights  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
FAMILIES = {"cnn": MODELS / "fashion_cnn.onnx", "resconcat": MODELS / "fashion_resconcat.onnx"}


def accuracy(model: ir.Model, test: CalibrationData) -> float:
    return top1_accuracy(ir.serde.serialize_model(model).SerializeToString(), test)


def setting(text: str) -> tuple[float, str]:
    """`0.9` (unstructured) or `0.8:block:16x1`."""
    sparsity, _, pattern = text.partition(":")
    return float(sparsity), pattern or "unstructured"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fm"), help="folder of fashion_mnist.py's .npz files")
    parser.add_argument("--out", type=Path, default=Path("out/bench_gmp"))
    parser.add_argument("--models", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--settings", type=setting, nargs="+", default=[setting(s) for s in ("0.9", "0.95", "0.8:block:16x1")],
                        metavar="S[:PATTERN]", help="sparsity and pattern, e.g. 0.9 or 0.8:block:16x1")
    parser.add_argument("--allocator", choices=SPARSIFY_ALLOCATORS, default="uniform")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=10000, help="train on the first N training images")
    parser.add_argument("--test-images", type=int, default=10000, help="score on the first N test images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ramp", type=float, default=0.5, help="gmp: fraction of the steps the sparsity rises over")
    parser.add_argument("--updates", type=int, default=20, help="gmp: mask updates over the ramp")
    parser.add_argument("--rounds", type=int, default=2, help="imp rounds")
    parser.add_argument("--methods", nargs="+", choices=SCHEDULES, default=["oneshot", "gmp"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    images, tests = np.load(args.data / "fmnist_train.npz"), np.load(args.data / "fmnist_test.npz")
    results, rows = [], []
    for family in args.models:
        path = FAMILIES[family]
        teacher = ir.load(str(path))
        train = CalibrationData.from_arrays(teacher, {"image": images["image"][: args.train_images]},
                                            labels=images["labels"][: args.train_images], batch_size=64)
        test = CalibrationData.from_arrays(teacher, {"image": tests["image"][: args.test_images]},
                                           labels=tests["labels"][: args.test_images], batch_size=500)
        dense = accuracy(teacher, test)
        ramp_steps = math.ceil(args.ramp * args.epochs * train.num_batches)
        for sparsity, pattern in args.settings:
            floor = ir.load(str(path))
            SparsifyWeights(pattern, sparsity, args.allocator)(floor)
            scores = {"no training": accuracy(floor, test)}
            for method in args.methods:
                model = ir.load(str(path))
                tune = FineTune(train, teacher, epochs=args.epochs, lr=args.lr, schedule=method, sparsify=pattern,
                                sparsity=sparsity, allocator=args.allocator, ramp=args.ramp,
                                prune_every=max(1, ramp_steps // args.updates), rounds=args.rounds,
                                rewind_step=max(1, train.num_batches // 20), progress=sys.stderr.isatty())
                tune(model)
                report: FineTuneReport = model.meta[FineTuneReport.META_KEY]
                scores[method] = accuracy(model, test)
                results.append({"model": family, "sparsity": sparsity, "pattern": pattern, "method": method, "top1": scores[method],
                                "dense": dense, "zero": report.sparsity, "epochs": report.epochs, "seconds": report.seconds,
                                "losses": report.losses, "sparsities": report.sparsities})
                print(f"{family} {100 * sparsity:.0f}% {pattern} {method}: {100 * scores[method]:.2f}% "
                      f"({100 * report.sparsity:.2f}% zero, {report.seconds:.0f} s)", flush=True)
            rows.append([family, f"{100 * sparsity:.0f}% {pattern}", f"{100 * dense:.2f}", f"{100 * scores['no training']:.2f}",
                         *(f"{100 * scores[m]:.2f}" for m in args.methods)])
    table = markdown_table(
        ["model", "weights zero", "dense", "one-shot, no training", *(f"{m} + training" if m == "oneshot" else m for m in args.methods)],
        rows,
        title=(f"Fashion-MNIST CNNs, {args.allocator} per layer, {args.epochs} epoch(s) on {train.num_samples:,} training images "
               f"per run (gmp ramp {args.ramp:g} of the steps, {args.updates} mask updates), test top-1 % on {test.num_samples:,} images"),
    )
    write_report(args.out, table, results)


if __name__ == "__main__":
    main()

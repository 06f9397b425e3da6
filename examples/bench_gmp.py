"""Pruning during training vs pruning then fine-tuning, at high unstructured sparsity.

The bundled Fashion-MNIST CNN (`examples/models/fashion_cnn.onnx`, dense) has `--sparsity` (default 90%)
of its Conv/Gemm weights zeroed, unstructured, by each `FineTune` schedule with the same training budget
(`--epochs` over the first `--train-images` training images, Adam, cosine LR, labels + distillation from
the dense model):

- `oneshot`: zero the smallest weights at once, then fine-tune with the mask fixed;
- `gmp`: Zhu & Gupta's cubic ramp from 0 to the target over the first 75% of the steps, then train at it;
- `imp` (with `--methods ... imp`): `--rounds` rounds of train, prune, rewind (each round a full budget,
  so it trains rounds+1 times as long; listed for reference, not an equal-budget comparison).

Test top-1 is measured on the 10,000 test images, with the one-shot model before any training as the
floor.

    python examples/fashion_mnist.py --out /tmp/fm      # needs the Debian package dataset-fashion-mnist
    python examples/bench_gmp.py --data /tmp/fm [--epochs 1] [--train-images 60000] [--out out/bench_gmp]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.backends.onnx.runtime import top1_accuracy
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.options import SPARSIFY_ALLOCATORS
from pcc.compiler.pipeline import Pipeline
from pcc.passes.transforms import FineTune, FineTuneReport
from pcc.passes.transforms.schedules import SCHEDULES
from pcc.passes.transforms.sparsify_weights import SparsifyWeights

MODEL = Path(__file__).resolve().parent / "models" / "fashion_cnn.onnx"


def accuracy(model: ir.Model, test: CalibrationData) -> float:
    return top1_accuracy(ir.serde.serialize_model(model).SerializeToString(), test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fm"), help="folder of fashion_mnist.py's .npz files")
    parser.add_argument("--out", type=Path, default=Path("out/bench_gmp"))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--sparsify", default="unstructured", help="unstructured | nm:N:M | block:RxC")
    parser.add_argument("--allocator", choices=SPARSIFY_ALLOCATORS, default="uniform")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=60000, help="train on the first N training images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2, help="imp rounds")
    parser.add_argument("--methods", nargs="+", choices=SCHEDULES, default=["oneshot", "gmp"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    teacher = ir.load(str(MODEL))
    images = np.load(args.data / "fmnist_train.npz")
    train = CalibrationData.from_arrays(teacher, {"image": images["image"][: args.train_images]},
                                        labels=images["labels"][: args.train_images], batch_size=64)
    test = CalibrationData.from_npz(teacher, args.data / "fmnist_test.npz", batch_size=256)
    floor = ir.load(str(MODEL))
    SparsifyWeights(args.sparsify, args.sparsity, args.allocator)(floor)
    rows = [{"method": "dense", "top1": accuracy(teacher, test)},
            {"method": "one-shot, no training", "top1": accuracy(floor, test)}]
    for method in args.methods:
        model = ir.load(str(MODEL))
        tune = FineTune(train, teacher, epochs=args.epochs, lr=args.lr, schedule=method, sparsify=args.sparsify,
                        sparsity=args.sparsity, allocator=args.allocator, rounds=args.rounds,
                        rewind_step=max(1, train.num_batches // 20), progress=sys.stderr.isatty())
        report = Pipeline([tune]).run(model).get(FineTuneReport)
        rows.append({"method": method, "top1": accuracy(model, test), "sparsity": report.sparsity, "epochs": report.epochs,
                     "seconds": report.seconds, "losses": report.losses, "sparsities": report.sparsities})
        print(f"{method}: {100 * rows[-1]['top1']:.2f}% at {100 * report.sparsity:.2f}% zero", flush=True)

    lines = [(f"Fashion-MNIST CNN, {100 * args.sparsity:.0f}% {args.sparsify} ({args.allocator}), {args.epochs} epoch(s) "
             f"on {train.num_samples:,} images per training run, test top-1 on {test.num_samples:,} images"), "",
             "| method | test top-1 % | weights zero % | epochs | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "seconds" in row:
            lines.append(f"| {row['method']} | {100 * row['top1']:.2f} | {100 * row['sparsity']:.2f} | {row['epochs']} | "
                         f"{row['seconds']:.0f} |")
        else:
            lines.append(f"| {row['method']} | {100 * row['top1']:.2f} | | | |")
    table = "\n".join(lines)
    print(table)
    (args.out / "report.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

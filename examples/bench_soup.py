"""A sparse model soup: ingredients fine-tuned from one pruned model, averaged, vs each ingredient.

The bundled Fashion-MNIST CNN (`examples/models/fashion_cnn.onnx`) has `--sparsity` of its Conv/Gemm
weights zeroed (unstructured, uniform per layer, BatchNorm re-estimated), then `--ingredients` copies
are fine-tuned with the mask fixed (`FineTune`, zeros kept), each with its own data order and learning
rate (`--lrs`, cycled), on the first `--train-images` training images for `--epochs` (labels +
distillation from the dense model). `AverageWeights` averages them (what `pcc soup` does); the soup
keeps the shared mask. Test top-1 on the first `--test-images` test images.

    python examples/fashion_mnist.py --out /tmp/fm      # needs the Debian package dataset-fashion-mnist
    python examples/bench_soup.py --data /tmp/fm [--ingredients 3] [--out out/bench_soup]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tables import markdown_table, write_report  # noqa: E402

from pcc.backends.onnx.runtime import top1_accuracy  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.passes.transforms import FineTune, RecalibrateBatchNorm  # noqa: E402
from pcc.passes.transforms.model_arithmetic import AverageWeights, SoupReport  # noqa: E402
from pcc.passes.transforms.sparsify_weights import SparsifyWeights  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "fashion_cnn.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fm"), help="folder of fashion_mnist.py's .npz files")
    parser.add_argument("--out", type=Path, default=Path("out/bench_soup"))
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--ingredients", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 5e-4, 2e-3])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=2560)
    parser.add_argument("--test-images", type=int, default=5000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    teacher = ir.load(str(MODEL))
    images, tests = np.load(args.data / "fmnist_train.npz"), np.load(args.data / "fmnist_test.npz")
    train = CalibrationData.from_arrays(teacher, {"image": images["image"][: args.train_images]},
                                        labels=images["labels"][: args.train_images], batch_size=64)
    test = CalibrationData.from_arrays(teacher, {"image": tests["image"][: args.test_images]},
                                       labels=tests["labels"][: args.test_images], batch_size=500)

    def accuracy(model: ir.Model) -> float:
        return top1_accuracy(ir.serde.serialize_model(model).SerializeToString(), test)

    pruned = ir.load(str(MODEL))
    SparsifyWeights("unstructured", args.sparsity)(pruned)
    RecalibrateBatchNorm(train)(pruned)
    start = ir.serde.serialize_model(pruned).SerializeToString()
    rows = [["dense", f"{100 * accuracy(teacher):.2f}"], ["pruned, no fine-tune", f"{100 * accuracy(pruned):.2f}"]]
    ingredients, scores = [], []
    for index in range(args.ingredients):
        model = ir.serde.deserialize_model(onnx.load_from_string(start))
        lr = args.lrs[index % len(args.lrs)]
        FineTune(train, teacher, epochs=args.epochs, lr=lr, seed=index)(model)
        ingredients.append(model)
        scores.append(accuracy(model))
        rows.append([f"ingredient {index + 1} (seed {index}, lr {lr:g})", f"{100 * scores[-1]:.2f}"])
        print(rows[-1], flush=True)
    soup = ingredients[0]
    AverageWeights(ingredients[1:])(soup)
    report: SoupReport = soup.meta[SoupReport.META_KEY]
    rows.append([f"soup of {report.ingredients} ({100 * report.weight_zeros:.1f}% of weights zero)", f"{100 * accuracy(soup):.2f}"])
    table = markdown_table(
        ["model", "test top-1 %"], rows,
        title=(f"Sparse soup: Fashion-MNIST CNN at {100 * args.sparsity:.0f}% unstructured, {args.ingredients} ingredients fine-tuned "
               f"{args.epochs} epoch(s) on {train.num_samples:,} images, test top-1 on {test.num_samples:,} images"),
    )
    write_report(args.out, table, {"rows": rows, "ingredients": scores})


if __name__ == "__main__":
    main()

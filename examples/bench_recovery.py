"""Which recovery pays: full fine-tuning vs biases and norms only (PERP) vs LoRA adapters.

The bundled Fashion-MNIST CNN (`examples/models/fashion_cnn.onnx`) is pruned to 50% of its parameters
with `pcc compile` (uniform allocator, BatchNorm re-estimated on the calibration images), then each
`pcc finetune --params` mode trains it for the same epochs on the 60,000 training images (Adam, cosine
LR, labels + distillation from the dense model) and is scored on the 10,000 test images. The table gives
test top-1, the parameters the optimizer updated and the seconds training took.

    python examples/fashion_mnist.py --out /tmp/fm      # needs the Debian package dataset-fashion-mnist
    python examples/bench_recovery.py --data /tmp/fm [--out out/bench_recovery] [--epochs 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tables import markdown_table, write_report  # noqa: E402

from pcc.backends.onnx.runtime import top1_accuracy  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.pipeline import Pipeline  # noqa: E402
from pcc.passes.transforms import FineTune, FineTuneReport  # noqa: E402
from pcc.passes.transforms.finetune import PARAM_MODES  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "fashion_cnn.onnx"


def prune(out: Path, calib: Path, sparsity: float) -> Path:
    """The pruned model, made by the command line a user would run."""
    pruned = out / f"cnn_{round(100 * sparsity)}.onnx"
    subprocess.run(
        ["pcc", "compile", str(MODEL), "--sparsity", str(sparsity), "--allocator", "uniform", "--calib", str(calib),
         "--round-to", "1", "--repeats", "3", "-o", str(pruned)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fm"), help="folder of fashion_mnist.py's .npz files")
    parser.add_argument("--out", type=Path, default=Path("out/bench_recovery"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=60000, help="train on the first N training images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=PARAM_MODES, default=list(PARAM_MODES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pruned_path = prune(args.out, args.data / "fmnist_calib.npz", args.sparsity)
    teacher = ir.load(str(MODEL))
    images = np.load(args.data / "fmnist_train.npz")
    train = CalibrationData.from_arrays(teacher, {"image": images["image"][: args.train_images]},
                                        labels=images["labels"][: args.train_images], batch_size=64)
    test = CalibrationData.from_npz(teacher, args.data / "fmnist_test.npz", batch_size=256)
    rows = [{"mode": "dense", "top1": top1_accuracy(str(MODEL), test)},
            {"mode": "pruned, no fine-tune", "top1": top1_accuracy(str(pruned_path), test)}]
    for mode in args.modes:
        model = ir.load(str(pruned_path))
        tune = FineTune(train, teacher, epochs=args.epochs, lr=args.lr, params=mode, lora_rank=args.lora_rank,
                        progress=sys.stderr.isatty())
        result = Pipeline([tune]).run(model)
        report = result.get(FineTuneReport)
        tuned = args.out / f"cnn_{mode}.onnx"
        ir.save(result.model, str(tuned))
        rows.append({"mode": report.params, "top1": top1_accuracy(str(tuned), test), "trained_params": report.trained_params,
                     "seconds": report.seconds, "first_loss": report.first_loss, "last_loss": report.last_loss})
        print(f"{report.params}: {100 * rows[-1]['top1']:.2f}%", flush=True)

    table = markdown_table(
        ["recovery", "test top-1 %", "trained params", "seconds", "loss first -> last"],
        [[row["mode"], f"{100 * row['top1']:.2f}",
          *((f"{row['trained_params']:,}", f"{row['seconds']:.1f}", f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}")
            if "seconds" in row else ("", "", ""))] for row in rows],
        title=(f"Fashion-MNIST CNN pruned to {100 * args.sparsity:.0f}% of its parameters (uniform), "
               f"{args.epochs} epoch(s) of fine-tuning on {train.num_samples:,} images, test top-1 on 10,000 images"),
    )
    write_report(args.out, table, rows)

if __name__ == "__main__":
    main()

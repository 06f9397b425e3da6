"""Lottery tickets at small scale: the rewound IMP ticket vs the same mask re-initialised vs random pruning.

The network is LeNet-300-100 (`zoo.MLP` with sizes 784-300-100-10, the lottery-ticket paper's MLP) on
Fashion-MNIST images flattened to 784 values, trained from a seeded random initialisation on the first
`--train-images` training images with labels only (Adam, cosine LR, `--epochs` per training run). For
each seed and each sparsity (default 80% and 90% of the weights, uniform per layer):

- dense: trained once for `--epochs`;
- ticket: `FineTune(schedule="imp")`: train, then `--rounds` rounds of prune (magnitude), rewind the
  survivors to their values after `--rewind-step` steps, train (Frankle et al. 2020's stabilised IMP);
- reinit: the same IMP, but the last round starts the ticket's mask from the rewound values shuffled
  within each tensor (`reinit=True`): the same mask, randomly re-initialised;
- random: the same IMP with masks ranked by random scores (`score="random"`): random pruning with the
  same per-layer amounts, rewound and trained the same way.

Every method's final training run has the same length; test top-1 on the 10,000 test images, mean ± std
over `--seeds` seeds.

    python examples/fashion_mnist.py --out /tmp/fm      # needs the Debian package dataset-fashion-mnist
    python examples/bench_lottery.py --data /tmp/fm [--seeds 3] [--out out/bench_lottery]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tables import markdown_table, write_report  # noqa: E402

# method -> FineTune options on top of the IMP schedule
CONTROLS = {"ticket": {}, "reinit": {"reinit": True}, "random": {"score": "random"}}


def main() -> None:
    import onnx
    import onnx_ir as ir
    import torch

    import zoo
    from pcc.backends.onnx.runtime import top1_accuracy
    from pcc.compiler import from_torch
    from pcc.compiler.calibration import CalibrationData
    from pcc.passes.transforms import FineTune

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fm"), help="folder of fashion_mnist.py's .npz files")
    parser.add_argument("--out", type=Path, default=Path("out/bench_lottery"))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every training run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rewind-step", type=int, default=20)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=1.2e-3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    train_npz, test_npz = np.load(args.data / "fmnist_train.npz"), np.load(args.data / "fmnist_test.npz")
    flat = lambda images: images.reshape(len(images), -1)  # noqa: E731

    def initial(seed: int) -> bytes:
        torch.manual_seed(seed)
        net = zoo.MLP((784, 300, 100, 10)).eval()
        model = from_torch(net, (torch.zeros(2, 784),), input_names=["image"], dynamic_batch=True)
        return ir.serde.serialize_model(model).SerializeToString()

    results: dict[str, dict[float, list[float]]] = {}
    for seed in range(args.seeds):
        start = initial(seed)
        fresh = lambda start=start: ir.serde.deserialize_model(onnx.load_from_string(start))  # noqa: E731
        probe = fresh()
        train = CalibrationData.from_arrays(probe, {"image": flat(train_npz["image"][: args.train_images])},
                                            labels=train_npz["labels"][: args.train_images], batch_size=64)
        test = CalibrationData.from_arrays(probe, {"image": flat(test_npz["image"])}, labels=test_npz["labels"], batch_size=1000)
        runs = [("dense", 0.0, {"schedule": "oneshot"})]
        runs += [(name, s, {"schedule": "imp", "sparsity": s, **extra}) for s in args.sparsities for name, extra in CONTROLS.items()]
        for name, sparsity, options in runs:
            model = fresh()
            FineTune(train, epochs=args.epochs, lr=args.lr, seed=seed, rounds=args.rounds, rewind_step=args.rewind_step,
                     **options)(model)
            top1 = top1_accuracy(ir.serde.serialize_model(model).SerializeToString(), test)
            results.setdefault(name, {}).setdefault(sparsity, []).append(top1)
            print(f"seed {seed} {name} {100 * sparsity:.0f}%: {100 * top1:.2f}%", flush=True)

    def cell(scores: list[float]) -> str:
        return f"{100 * np.mean(scores):.2f} ± {100 * np.std(scores):.2f}"

    dense = results["dense"][0.0]
    rows = [[f"{100 * s:.0f}%", cell(dense), *(cell(results[name][s]) for name in CONTROLS)] for s in args.sparsities]
    table = markdown_table(
        ["weights zero", "dense", "ticket (IMP, rewound)", "same mask, re-initialised", "random pruning"], rows,
        title=(f"LeNet-300-100 on Fashion-MNIST ({args.train_images:,} training images, {args.epochs} epochs per run, "
               f"IMP {args.rounds} rounds, rewind to step {args.rewind_step}): test top-1 %, mean ± std over {args.seeds} seeds"),
    )
    write_report(args.out, table, {name: {str(s): v for s, v in by.items()} for name, by in results.items()})


if __name__ == "__main__":
    main()

"""Meta-train the metanetwork on Fashion-MNIST data models and ship its weights.

The data models are examples/metanet_data_models.py's `plain`, `residual` and `separable` CNNs 0-29
except `HELD_OUT` (those, and the whole `branchy` family, are kept for the benchmark and never seen here).
Each step takes one data model and a batch of 64 training images; the loss is the transformed network's
task loss (cross-entropy, or with --distill the KL divergence from the data model's own outputs) plus
`alpha` x its weighted group lasso (metanet/train.py). The weights are written to
metanet/weights/metanet_fashion.pt (the package ships them) with what they were trained on.

    python examples/metanet_fashion.py [--steps 1500] [--alpha 0.5] [--out metanet/weights/metanet_fashion.pt]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402
import metanet_data_models as zoo  # noqa: E402

from pcc.metanet.model import Metanetwork, MetanetworkConfig  # noqa: E402
from pcc.metanet.train import group_norm_sparsity, meta_train, prepare  # noqa: E402
from pcc.metanet.transform import SHIPPED_WEIGHTS, save_metanetwork  # noqa: E402

TRAIN_FAMILIES = ("plain", "residual", "separable")
DATA_MODELS = 30  # per family
HELD_OUT = (8, 9)  # indices the benchmark evaluates on
BATCH = 64


def training_models() -> list:
    return [prepare(zoo.data_model(family, index), f"{family}_{index}")
            for family in TRAIN_FAMILIES for index in range(DATA_MODELS) if index not in HELD_OUT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--distill", action="store_true", help="keep each data model's outputs instead of its labels")
    parser.add_argument("--prune-aware", type=float, default=0.0, metavar="BETA",
                        help="weight of the task loss of a pruned copy (metanet/train.py)")
    parser.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")

    data_models = training_models()
    images, labels = fashion_mnist.load("train")

    def batches(_, rng: np.random.Generator):
        pick = rng.choice(len(images), BATCH, replace=False)
        return {fashion_mnist.INPUT_NAME: images[pick]}, labels[pick]

    metanet = Metanetwork(MetanetworkConfig(hidden=args.hidden, layers=args.layers))
    before = {m.name: group_norm_sparsity(m.graph, m.groups, m.graph.data.weight_values) for m in data_models}
    log = meta_train(metanet, data_models, batches, steps=args.steps, alpha=args.alpha, distill=args.distill,
                     prune_aware=args.prune_aware, progress=True)
    print(log.summary())
    for m in data_models:
        print(f"  {m.name}: group-norm sparsity (Hoyer) {before[m.name]:.3f} -> "
              f"{group_norm_sparsity(m.graph, m.groups, metanet(m.graph.data)):.3f}")
    save_metanetwork(metanet, args.out, data_models=[m.name for m in data_models], steps=args.steps, alpha=args.alpha,
                     distill=args.distill, prune_aware=args.prune_aware,
                     seconds=round(log.seconds), task_loss=[log.window(log.task_loss, False), log.window(log.task_loss, True)],
                     sparsity_loss=[log.window(log.sparsity_loss, False), log.window(log.sparsity_loss, True)])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB, {metanet.num_parameters} parameters)")


if __name__ == "__main__":
    main()

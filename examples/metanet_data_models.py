"""The data models of meta-training: many small CNNs of three families, trained briefly on Fashion-MNIST.

- `plain`: Conv-BN-ReLU stacks (3 or 4 layers, widths 16-48), max pooling, global average pooling, linear.
- `residual`: a stem and residual blocks (two Conv-BN per block, identity or 1x1 projection shortcuts).
- `separable`: depthwise-separable blocks (depthwise 3x3 + pointwise 1x1).
- `branchy`: Inception-like blocks, a 1x1 and a 3x3 branch concatenated: the family the metanetwork is never
  meta-trained on, to show it works on architectures it has not seen.

Each model trains for one pass over `TRAIN_IMAGES` training images (Adam, one-cycle, batch 64), 7-10 s on 2
cores (86-89% test accuracy), and is cached as ONNX in ~/.cache/pcc/metanet_data/ by family, index and seed, so the step runs once.

    python examples/metanet_data_models.py --family plain --count 8   # builds (or finds) and prints accuracy
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402
from sdists import CACHE  # noqa: E402

from pcc.compiler import from_torch  # noqa: E402
from pcc.compiler.pipeline import Pipeline, preparation_passes  # noqa: E402

FAMILIES = ("plain", "residual", "separable", "branchy")
TRAIN_IMAGES = 30_000
FOLDER = CACHE / "metanet_data"
WIDTHS = (16, 24, 32, 48)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Plain(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers, cin = [], 1
        for i, width in enumerate(widths):
            layers += [*conv_bn(cin, width), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(*conv_bn(cin, cout, stride=stride), nn.ReLU(), *conv_bn(cout, cout))
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride > 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


class Residual(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(ResidualBlock(cin, width, 1 if i == 0 else 2))
            cin = width
        self.features = nn.Sequential(*conv_bn(1, widths[0]), nn.ReLU(), nn.MaxPool2d(2), *blocks,
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


class Separable(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers, cin = [*conv_bn(1, widths[0]), nn.ReLU(), nn.MaxPool2d(2)], widths[0]
        for i, width in enumerate(widths[1:]):
            layers += [*conv_bn(cin, cin, stride=2 if i == 0 else 1, groups=cin), nn.ReLU(),
                       *conv_bn(cin, width, 1), nn.ReLU()]
            cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


class BranchBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.narrow = nn.Sequential(*conv_bn(cin, cout // 2, 1), nn.ReLU())
        self.wide = nn.Sequential(*conv_bn(cin, cout - cout // 2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.narrow(x), self.wide(x)], dim=1)


class Branchy(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers, cin = [*conv_bn(1, widths[0]), nn.ReLU(), nn.MaxPool2d(2)], widths[0]
        for i, width in enumerate(widths[1:]):
            layers += [BranchBlock(cin, width)] + ([nn.MaxPool2d(2)] if i == 0 else [])
            cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def architecture(family: str, index: int) -> nn.Module:
    """The `index`-th architecture of `family`: widths drawn from WIDTHS by a generator seeded with index."""
    rng = np.random.default_rng([FAMILIES.index(family), index])
    depth = int(rng.integers(3, 5))
    widths = sorted(int(w) for w in rng.choice(WIDTHS, depth))
    if family == "plain":
        return Plain(widths)
    if family == "residual":
        return Residual(widths[:3])
    if family == "branchy":
        return Branchy(widths)
    return Separable(widths)


def train(module: nn.Module, seed: int, batch: int = 64, lr: float = 4e-3) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = fashion_mnist.load("train")
    pick = np.random.default_rng(seed).choice(len(images), TRAIN_IMAGES, replace=False)
    images, labels = torch.from_numpy(images[pick]), torch.from_numpy(labels[pick])
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    steps = len(images) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    module.train()
    for step in range(steps):
        chosen = slice(step * batch, (step + 1) * batch)
        loss = nn.functional.cross_entropy(module(images[chosen]), labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return module.eval()


def data_model(family: str, index: int, seed: int = 0) -> ir.Model:
    """The trained, exported and prepared model (cached)."""
    path = FOLDER / f"{family}_{index}_{seed}.onnx"
    if path.exists():
        return ir.load(path)
    module = train(architecture(family, index), seed=seed + 1000 * index)
    model = from_torch(module, (torch.zeros(2, 1, 28, 28),), input_names=[fashion_mnist.INPUT_NAME],
                       output_names=["logits"], optimize=False, dynamic_batch=True)
    Pipeline(preparation_passes()).run(model)
    FOLDER.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    ir.save(model, staged)
    staged.replace(path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="plain")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--first", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    from pcc.backends.onnx.runtime import session

    images, labels = fashion_mnist.load("test", limit=2000)
    for index in range(args.first, args.first + args.count):
        start = time.perf_counter()
        model = data_model(args.family, index)
        proto = ir.serde.serialize_model(model).SerializeToString()
        logits = session(proto).run(None, {fashion_mnist.INPUT_NAME: images})[0]
        params = sum(v.const_value.size for v in model.graph.initializers.values())
        print(f"{args.family}_{index}: {params} params, test accuracy {100 * (logits.argmax(1) == labels).mean():.2f}% "
              f"(first 2000), {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()

"""Train the example CNNs on Fashion-MNIST and export them: the real models pcc's allocators are judged on.

    python examples/train_fashion_mnist.py [--family plain|resconcat] [--epochs 2] [--out PATH]

Four 3x3 Conv-BN-ReLU layers in two stages (32 and 64 channels), a fifth of 128 channels, global
average pooling and a linear classifier: 140k parameters, ~22M MACs per image. Two epochs of Adam with
a cosine schedule take about 5 minutes on 2 cores. The ONNX file keeps its BatchNormalization nodes
(for the `bn` criterion and BatchNorm re-estimation), is constant-folded, takes any batch size, and is committed (< 1 MB) so tests and benchmarks start
from a trained network without retraining; its test accuracy in onnxruntime is printed.

`--family resconcat` is the held-out design that one-shot pruning is judged on (benchmarks only, never
tuned on in tests): residual blocks and a two-branch block joined by Concat, ~330k parameters, exported
as most deployed files are, with the exporter's defaults, so its BatchNorm is folded into the convolutions
and no BatchNorm statistics are left to re-estimate after pruning.
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

from pcc.backends.onnx.runtime import top1_accuracy  # noqa: E402
from pcc.compiler import from_torch  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.pipeline import Pipeline, preparation_passes  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
MODEL_PATH = MODELS / "fashion_cnn.onnx"
RESCONCAT_PATH = MODELS / "fashion_resconcat.onnx"


def conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class FashionCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 32), *conv_bn(32, 32), nn.MaxPool2d(2),
            *conv_bn(32, 64), *conv_bn(64, 64), nn.MaxPool2d(2),
            *conv_bn(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(128, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(channels, channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class TwoBranchBlock(nn.Module):
    """A 3x3 branch and a 1x1 -> 3x3 branch, joined by Concat (an Inception-style split of the channels)."""

    def __init__(self, cin: int, branch: int) -> None:
        super().__init__()
        self.wide = nn.Sequential(*conv_bn(cin, branch))
        self.deep = nn.Sequential(nn.Conv2d(cin, cin, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(), *conv_bn(cin, branch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wide(x), self.deep(x)], dim=1)


class ResConcatCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 32), ResidualBlock(32), nn.MaxPool2d(2),
            TwoBranchBlock(32, 48), ResidualBlock(96), nn.MaxPool2d(2),
            *conv_bn(96, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(128, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


FAMILIES = {"plain": (FashionCNN, MODEL_PATH), "resconcat": (ResConcatCNN, RESCONCAT_PATH)}


def train(family: str, epochs: int, batch: int = 128, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = fashion_mnist.load("train")
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    model = FAMILIES[family][0]()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(images) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        start, order = time.perf_counter(), torch.randperm(len(images), generator=generator)
        total = 0.0
        for step in range(len(images) // batch):
            pick = order[step * batch : (step + 1) * batch]
            loss = nn.functional.cross_entropy(model(images[pick]), labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / (step + 1):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def export(model: nn.Module, path: Path, keep_batchnorm: bool) -> ir.Model:
    """Export with a dynamic batch, then constant folding.

    `keep_batchnorm`: unoptimised export (keeps BatchNorm); the exporter then builds each bias-free
    conv's zero bias at run time from Shape/Expand nodes, which doubled the dense model's latency at batch
    32 and would credit pruning with a speed-up that folding alone gives. Otherwise the exporter's
    defaults, which fold BatchNorm into the convolutions.
    """
    example = torch.zeros(2, 1, 28, 28)
    exported = from_torch(
        model, (example,), input_names=[fashion_mnist.INPUT_NAME], output_names=["logits"], optimize=not keep_batchnorm,
        dynamic_batch=True,
    )
    Pipeline(preparation_passes()).run(exported)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(exported, path)
    return exported


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="plain",
                        help="plain: the Conv-BN CNN (BatchNorm kept); resconcat: the held-out design (BatchNorm folded)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default: examples/models/fashion_cnn.onnx or fashion_resconcat.onnx")
    args = parser.parse_args()
    args.out = args.out or FAMILIES[args.family][1]
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())
    model = train(args.family, args.epochs)
    exported = export(model, args.out, keep_batchnorm=args.family == "plain")
    images, labels = fashion_mnist.load("test")
    with torch.no_grad():
        torch_accuracy = float((model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())
    test = CalibrationData.from_arrays(exported, {fashion_mnist.INPUT_NAME: images}, labels, batch_size=1000)
    accuracy = top1_accuracy(str(args.out), test)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e3:.1f}k parameters, {args.out.stat().st_size / 1e3:.0f} kB")
    print(f"test accuracy: {100 * accuracy:.2f}% in onnxruntime ({100 * torch_accuracy:.2f}% in torch)")
    return 0 if np.isclose(accuracy, torch_accuracy, atol=1e-3) else 1


if __name__ == "__main__":
    sys.exit(main())

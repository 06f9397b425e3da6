"""Allocator benchmark on a trained model: where to prune decides accuracy (issue 4).

The committed Fashion-MNIST CNN (examples/models/fashion_cnn.onnx, 91.2% test top-1) is pruned by each
allocator (uniform, global, LAMP, the DP rate-distortion allocator) at several sparsities, and top-1
accuracy on the 10k held-out test images is measured:

1. params budget (round_to 1): accuracy without fine-tuning, with BatchNorm statistics re-estimated on the
   calibration images (pcc's default when --calib is given), and also without that re-estimation (raw);
   then after a 1-epoch fine-tune (labels + distillation from the dense model, 60k training images).
2. latency budget (round_to 8, onnxruntime's preferred width): accuracy, the latency ratio the latency table
   predicted, and the ratio measured dense vs pruned in this process (interleaved, median of --repeats).
3. the sensitivity sweep's time for 8 keep ratios on --workers processes, and for every DP point the
   additivity check (summed single-group distortion vs the distortion measured with all groups pruned).

Prints tables as it goes, then writes OUT/report.md, OUT/results.json and PNGs. Needs the Debian package
dataset-fashion-mnist (see examples/fashion_mnist.py). About 20 minutes on 2 cores with fine-tuning.

    python examples/bench_allocators.py [--out out/bench_allocators] [--finetune-epochs 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_ir as ir
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402

from pcc.backends.onnx.runtime import paired_latency, session, top1_accuracy  # noqa: E402
from pcc.compiler import channel_pruning_pipeline, load_onnx  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.pipeline import Pipeline, preparation_passes  # noqa: E402
from pcc.compiler.report import plot_lines  # noqa: E402
from pcc.passes.allocation import Allocation  # noqa: E402
from pcc.passes.analysis import BuildDependencyGroups, ScoreImportance  # noqa: E402
from pcc.passes.analysis.sensitivity import MeasureSensitivity, Sensitivity  # noqa: E402
from pcc.passes.transforms import FineTune  # noqa: E402

MODEL = Path(__file__).resolve().parent / "models" / "fashion_cnn.onnx"
ALLOCATORS = ("uniform", "global", "lamp", "dp")
SPARSITIES = (0.3, 0.5, 0.7, 0.9)


@dataclass
class Point:
    """One pruned model: how it was made and what it measures."""

    budget: str
    allocator: str
    sparsity: float
    recalibrated: bool
    accuracy: float
    achieved: float  # fraction of the budget's cost removed, as its cost model counts
    seconds: float  # the compile pipeline's time
    finetuned_accuracy: float | None = None
    predicted_speedup: float | None = None  # latency table, latency budget only
    measured_speedup: float | None = None
    distortion_summed: float | None = None  # DP only: the additivity check
    distortion_joint: float | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dense_bytes = MODEL.read_bytes()
        model = load_onnx(MODEL)
        images, labels = fashion_mnist.calibration_split(args.calib_samples)
        self.calib = CalibrationData.from_arrays(model, {"image": images}, labels, "calibration (train subset)", 128)
        test_images, test_labels = fashion_mnist.load("test")
        self.test = CalibrationData.from_arrays(model, {"image": test_images}, test_labels, "test", 1000)
        self.dense_accuracy = top1_accuracy(self.dense_bytes, self.test)
        if args.finetune_epochs:
            train_images, train_labels = fashion_mnist.load("train")
            self.train = CalibrationData.from_arrays(model, {"image": train_images}, train_labels, "train", 128)
        latency_images = test_images[: args.latency_batch]
        self.latency_feeds = {"image": latency_images}
        self.cache = Path(args.out) / "sensitivity"
        self.cache.mkdir(parents=True, exist_ok=True)

    def compile(self, budget: str, allocator: str, sparsity: float, recalibrate: bool) -> tuple[ir.Model, Point]:
        round_to = 1 if budget == "params" else 8
        pipeline = channel_pruning_pipeline(
            sparsity, allocator=allocator, budget=budget, round_to=round_to, calibration=self.calib,
            workers=self.args.workers, recalibrate_bn=recalibrate, latency_batch=self.args.latency_batch,
            sensitivity_cache=self.cache / f"{budget}-{'recal' if recalibrate else 'raw'}.npz",
        )
        start = time.perf_counter()
        result = pipeline.run(load_onnx(MODEL))
        seconds = time.perf_counter() - start
        allocation = result.get(Allocation)
        pruned = ir.serde.serialize_model(result.model).SerializeToString()
        point = Point(
            budget, allocator, sparsity, recalibrate, top1_accuracy(pruned, self.test), allocation.achieved, seconds,
            distortion_summed=allocation.predicted_distortion, distortion_joint=allocation.measured_distortion,
        )
        if budget == "latency":
            point.predicted_speedup = allocation.cost_before / allocation.cost_after
            latency = paired_latency(session(self.dense_bytes), session(pruned), self.latency_feeds, self.args.repeats)
            point.measured_speedup = latency.speedup
        return result.model, point

    def finetune(self, model: ir.Model) -> float:
        teacher = load_onnx(MODEL)
        Pipeline([FineTune(self.train, teacher, epochs=self.args.finetune_epochs, lr=self.args.lr)]).run(model)
        return top1_accuracy(ir.serde.serialize_model(model).SerializeToString(), self.test)

    def sensitivity_seconds(self, recalibrate: bool) -> float:
        """A fresh 8-ratio sweep (no cache) on `--workers` processes, as `pcc compile --allocator dp` runs it."""
        sweep = MeasureSensitivity(calibration=self.calib, workers=self.args.workers, recalibrate_bn=recalibrate)
        result = Pipeline([*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), sweep]).run(load_onnx(MODEL))
        return result.get(Sensitivity).seconds


def _table(points: list[Point], value, header: str) -> list[str]:
    lines = [f"| allocator | {' | '.join(f'{s:.1f}' for s in SPARSITIES)} |", "|---" * (len(SPARSITIES) + 1) + "|"]
    for allocator in ALLOCATORS:
        row = [value(p) for s in SPARSITIES for p in points if p.allocator == allocator and p.sparsity == s]
        lines.append(f"| {allocator} | " + " | ".join(row) + " |")
    return [header, "", *lines, ""]


def _targets(params: list[Point], dense: float) -> list[str]:
    """Issue 4's targets, each judged on the measured numbers."""
    acc = {(p.allocator, p.sparsity): p.accuracy for p in params}
    lines = []
    for s in SPARSITIES:
        ordered = acc["dp", s] >= acc["lamp", s] >= acc["uniform", s]
        lines.append(
            f"- {s:.1f}: DP {100 * acc['dp', s]:.2f} >= LAMP {100 * acc['lamp', s]:.2f} >= uniform "
            f"{100 * acc['uniform', s]:.2f}: {'met' if ordered else 'NOT met'}"
        )
    gap = acc["dp", 0.7] - acc["uniform", 0.7]
    lines.append(f"- DP beats uniform by >= 5 points at 0.7: {100 * gap:+.2f} points, {'met' if gap >= 0.05 else 'NOT met'}")
    tuned = [p for p in params if p.sparsity == 0.5 and p.finetuned_accuracy is not None]
    for p in tuned:
        within = dense - p.finetuned_accuracy <= 0.01
        lines.append(
            f"- {p.allocator} at 0.5 after fine-tune within 1 point of dense ({100 * dense:.2f}): "
            f"{100 * p.finetuned_accuracy:.2f}, {'met' if within else 'NOT met'}"
        )
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def write_report(out: Path, bench: Bench, points: list[Point], sweep_seconds: dict[str, float]) -> Path:
    params = [p for p in points if p.budget == "params" and p.recalibrated]
    raw = [p for p in points if p.budget == "params" and not p.recalibrated]
    latency = [p for p in points if p.budget == "latency"]
    curves = {a: ([p.sparsity for p in params if p.allocator == a], [100 * p.accuracy for p in params if p.allocator == a])
              for a in ALLOCATORS}
    curves |= {f"{a} + fine-tune": ([p.sparsity for p in params if p.allocator == a and p.finetuned_accuracy is not None],
                                    [100 * p.finetuned_accuracy for p in params if p.allocator == a and p.finetuned_accuracy is not None])
               for a in ALLOCATORS}
    plot_lines({k: v for k, v in curves.items() if v[0]}, out / "accuracy_vs_sparsity.png",
               xlabel="fraction of prunable parameters removed", ylabel="test top-1 (%)",
               title="Fashion-MNIST CNN: allocators (BatchNorm re-estimated)", reference=100 * bench.dense_accuracy)
    speed = {a: ([p.measured_speedup for p in latency if p.allocator == a], [100 * p.accuracy for p in latency if p.allocator == a])
             for a in ALLOCATORS}
    plot_lines(speed, out / "accuracy_vs_speedup.png", xlabel="measured speed-up (onnxruntime CPU)", ylabel="test top-1 (%)",
               title=f"latency budget, batch {bench.args.latency_batch}", reference=100 * bench.dense_accuracy)
    dp = [p for p in points if p.allocator == "dp"]
    md = [
        "# Allocators on the Fashion-MNIST CNN", "",
        f"Dense test top-1: {100 * bench.dense_accuracy:.2f}% (10k test images). Calibration: "
        f"{bench.calib.num_samples} training images. Importance l2.", "",
        *_table(params, lambda p: _pct(p.accuracy), "## Params budget, no fine-tune (BatchNorm re-estimated), test top-1 %"),
        *_table(raw, lambda p: _pct(p.accuracy), "## Params budget, no fine-tune, stale BatchNorm statistics (raw), test top-1 %"),
    ]
    if any(p.finetuned_accuracy is not None for p in params):
        md += _table(params, lambda p: _pct(p.finetuned_accuracy),
                     f"## Params budget after a {bench.args.finetune_epochs}-epoch fine-tune (labels + distillation), test top-1 %")
    md += ["![](accuracy_vs_sparsity.png)", "", "## Targets", "", *_targets(params, bench.dense_accuracy), ""]
    md += _table(latency, lambda p: f"{_pct(p.accuracy)} ({p.predicted_speedup:.2f}x pred, {p.measured_speedup:.2f}x meas)",
                 f"## Latency budget (round_to 8, batch {bench.args.latency_batch}): test top-1 %, predicted and measured speed-up")
    md += ["![](accuracy_vs_speedup.png)", "", "## DP additivity check (KL on calibration data)", "",
           "| budget | BN re-estimated | sparsity | summed single-group | measured jointly | ratio |", "|---|---|---|---|---|---|"]
    md += [f"| {p.budget} | {p.recalibrated} | {p.sparsity:.1f} | {p.distortion_summed:.4g} | {p.distortion_joint:.4g} | "
           f"{p.distortion_joint / max(p.distortion_summed, 1e-12):.2f} |" for p in dp]
    md += ["", "## Sensitivity sweep time (8 keep ratios, all groups)", ""]
    md += [f"- {name}: {seconds:.1f} s on {bench.args.workers} worker(s)" for name, seconds in sweep_seconds.items()]
    (out / "results.json").write_text(json.dumps(
        {"dense_accuracy": bench.dense_accuracy, "sensitivity_seconds": sweep_seconds, "points": [asdict(p) for p in points]},
        indent=2))
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_allocators"))
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--finetune-epochs", type=int, default=1, help="0 skips fine-tuning")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not fashion_mnist.available():
        print("needs Fashion-MNIST: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    print(f"dense test top-1 {100 * bench.dense_accuracy:.2f}%")

    sweep_seconds = {
        "BatchNorm re-estimated per variant": bench.sensitivity_seconds(recalibrate=True),
        "stale statistics": bench.sensitivity_seconds(recalibrate=False),
    }
    for name, seconds in sweep_seconds.items():
        print(f"sensitivity sweep, 8 ratios, {args.workers} workers, {name}: {seconds:.1f} s")

    jobs = [("params", a, s, True) for a in ALLOCATORS for s in SPARSITIES]
    jobs += [("params", a, s, False) for a in ALLOCATORS for s in SPARSITIES]
    jobs += [("latency", a, s, True) for a in ALLOCATORS for s in SPARSITIES]
    points = []
    for budget, allocator, sparsity, recalibrate in tqdm(jobs, desc="compile", leave=False):
        model, point = bench.compile(budget, allocator, sparsity, recalibrate)
        if budget == "params" and recalibrate and args.finetune_epochs:
            point.finetuned_accuracy = bench.finetune(model)
        points.append(point)
        extra = f" -> {_pct(point.finetuned_accuracy)} fine-tuned" if point.finetuned_accuracy is not None else ""
        if point.measured_speedup is not None:
            extra += f"; speed-up predicted {point.predicted_speedup:.2f}x, measured {point.measured_speedup:.2f}x"
        if point.distortion_summed is not None:
            extra += f"; additivity: summed {point.distortion_summed:.4g}, joint {point.distortion_joint:.4g}"
        tqdm.write(f"{budget:7s} {'recal' if recalibrate else 'raw  '} {allocator:7s} {sparsity:.1f}: "
                   f"{_pct(point.accuracy)}%{extra} ({point.seconds:.1f} s)")
    path = write_report(args.out, bench, points, sweep_seconds)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

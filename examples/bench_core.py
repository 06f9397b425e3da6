"""Benchmark of the core pipeline on full-size CNNs: how fast pcc is, and how much faster its output is.

For a ResNet-50-size and a MobileNetV2-size model (random weights, 224x224, batch 1 by default) at a given
sparsity, prints: analysis time (preparation, groups, importance, allocation), pruning time, params and
MACs ratios, and the onnxruntime latency of dense vs pruned measured in this process, interleaved,
median of --repeats runs each. Targets (issue 3): analysis + pruning <= 5 s for ResNet-50; measured
speed-up >= 0.8 x the MACs ratio.

    python examples/bench_core.py [--sparsity 0.5] [--repeats 30] [--round-to 8] [--batch 1] [--models resnet50 ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

from pcc.backends.onnx import OnnxTarget  # noqa: E402
from pcc.compiler import channel_pruning_pipeline, from_torch, load_onnx  # noqa: E402
from pcc.passes.analysis import BuildDependencyGroups, MeasureCost, ScoreImportance  # noqa: E402
from pcc.passes.allocation import AllocatorPass  # noqa: E402
from pcc.passes.transforms import PruneChannels  # noqa: E402

MODELS = {"resnet50": "ResNet-50", "mobilenet_v2_full": "MobileNetV2"}


def bench(name: str, sparsity: float, repeats: int, round_to: int, allocator: str, batch: int, workdir: Path) -> dict:
    module, example = zoo.build(name)
    example = example.repeat(batch, 1, 1, 1)
    source = workdir / f"{name}.onnx"
    start = time.perf_counter()
    ir.save(from_torch(module, (example,)), source)
    export_s = time.perf_counter() - start

    start = time.perf_counter()
    model = load_onnx(source)
    load_s = time.perf_counter() - start
    pipeline = channel_pruning_pipeline(sparsity, round_to=round_to, allocator=allocator)
    result = pipeline.run(model)
    prune_s = result.seconds(PruneChannels)
    analysis_s = sum(t.seconds for t in result.timings) - prune_s - result.seconds(MeasureCost)
    target = OnnxTarget(repeats=repeats)
    report = target.emit(
        result, source, workdir / f"{name}.pruned.onnx", model_name=name, allocator=allocator, importance="l2"
    )
    return {
        "model": MODELS[name],
        "export_s": export_s,
        "load_s": load_s,
        "analysis_s": analysis_s,
        "groups_s": result.seconds(BuildDependencyGroups),
        "importance_s": result.seconds(ScoreImportance),
        "allocation_s": result.seconds(*AllocatorPass.__subclasses__()),
        "prune_s": prune_s,
        "report": report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--allocator", default="uniform")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[bench] {MODELS[name]}: exporting, pruning, timing ({args.repeats} interleaved runs each)...", flush=True)
            rows.append(bench(name, args.sparsity, args.repeats, args.round_to, args.allocator, args.batch, Path(tmp)))

    print(f"\npcc core benchmark: sparsity {args.sparsity} ({args.allocator}, l2, round_to {args.round_to}), "
          f"batch {args.batch}, 224x224, onnxruntime CPU")
    header = f"{'model':12s} {'load s':>7s} {'analysis s':>10s} {'prune s':>8s} {'params':>17s} {'MACs ratio':>10s} " \
             f"{'dense ms':>9s} {'pruned ms':>9s} {'speed-up':>8s} {'speed-up/MACs':>13s}"
    print(header)
    for row in rows:
        r = row["report"]
        print(
            f"{row['model']:12s} {row['load_s']:7.2f} {row['analysis_s']:10.2f} {row['prune_s']:8.2f} "
            f"{r.params_before / 1e6:7.2f}M->{r.params_after / 1e6:6.2f}M {r.macs_ratio:10.2f} "
            f"{r.latency_ms_before:9.2f} {r.latency_ms_after:9.2f} {r.speedup:8.2f} {r.speedup / r.macs_ratio:13.2f}"
        )
    for row in rows:
        print(f"  {row['model']}: groups {row['groups_s']:.2f} s, importance {row['importance_s']:.2f} s, "
              f"allocation {row['allocation_s']:.2f} s; removed {100 * row['report'].prunable_removed:.1f}% of prunable params")
    resnet = next((row for row in rows if row["model"] == "ResNet-50"), None)
    if resnet:
        total = resnet["analysis_s"] + resnet["prune_s"]
        print(f"target: ResNet-50 analysis + pruning <= 5 s: {total:.2f} s -> {'met' if total <= 5 else 'MISSED'}")
    for row in rows:
        ratio = row["report"].speedup / row["report"].macs_ratio
        print(f"target: {row['model']} speed-up >= 0.8 x MACs ratio: {ratio:.2f} -> {'met' if ratio >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    main()

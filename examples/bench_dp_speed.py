"""DP allocator speed and accuracy, before and after the fast sensitivity sweep (issue 19).

Cases (each run in its own process, so a slow "before" can be stopped at --limit-s):

- fashion:  the bundled Fashion-MNIST CNN, `pcc compile --allocator dp --sparsity 0.5 --calib
            fmnist_calib.npz --report` as the CLI builds it (BatchNorm re-estimated on the 512 calibration
            images); times the sweep, the DP and the report's allocator comparison (target < 30 s).
- resconcat: the held-out ResConcat CNN (326k parameters, BatchNorm folded), as `pcc compile --allocator dp
            --sparsity 0.5 --calib ... --report` builds it: reconstruction (`ls`, the default with --calib)
            in every sweep variant and the final model, 512 Fashion-MNIST training images (target < 30 s);
            a revision without `reconstruct` runs without it.
- cnn20m:   a ResNet-34-shaped CNN (21.8M parameters, random weights, 3x128x128 inputs), DP at 0.7
            params on 64 random calibration inputs (target < 3 min).
- resnet50: ResNet-50 (random weights, 224x224), DP with `--budget latency` at 0.5 (target < 10 min).
- accuracy: Fashion-MNIST test top-1 (10k images) of DP, uniform, global and LAMP at 0.3 / 0.5 / 0.7 params.
- refine:   the DP with 0, 1 and 3 refinement rounds on the bundled CNN (BatchNorm re-estimated) and on
            ResConcat (`ls`) at 0.3 / 0.5 / 0.7: test top-1, which allocation the guard kept, and time.

`--before REV` also runs each timing case on the package as it was at git revision REV (extracted with
`git archive` and put first on PYTHONPATH). Per-variant costs and CPU seconds (the case and its worker
processes) are printed so runs on a busy machine can be compared. Needs `apt-get install dataset-fashion-mnist` and `python examples/fashion_mnist.py --out
/tmp/fm` for the Fashion-MNIST cases.

    python examples/bench_dp_speed.py [--before bb2947c] [--cases fashion,resconcat,cnn20m,resnet50,accuracy,refine]
                                      [--limit-s 600]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = HERE / "models" / "fashion_cnn.onnx"
PACKAGES = ("compiler", "passes", "backends", "metanet")


def _timings(result) -> dict[str, float]:
    from pcc.passes.allocation import AllocateDP
    from pcc.passes.allocation.compare import CompareAllocators
    from pcc.passes.analysis.latency import MeasureLatency
    from pcc.passes.analysis.sensitivity import MeasureSensitivity, Sensitivity

    sensitivity = result.get(Sensitivity)
    variants = int((sensitivity.keep_units != sensitivity.keep_units[:, -1:]).sum()) if sensitivity is not None else 0
    sweep = result.seconds(MeasureSensitivity)
    out = {
        "latency_table_s": result.seconds(MeasureLatency), "sweep_s": sweep, "dp_s": result.seconds(AllocateDP),
        "compare_s": result.seconds(CompareAllocators),
        "total_s": sum(t.seconds for t in result.timings), "variants": variants,
        "per_variant_ms": 1000 * sweep / variants if variants else 0.0,
    }
    samples = getattr(sensitivity, "samples", None)
    if samples is not None:
        out["mean_samples_per_variant"] = float(samples[samples > 0].mean()) if (samples > 0).any() else 0.0
    return out


def _allocation_line(result) -> str:
    from pcc.passes.allocation import Allocation

    return result.get(Allocation).summary().replace("\n", "; ")


def case_fashion() -> dict:
    from pcc.compiler import channel_pruning_pipeline, load_onnx
    from pcc.compiler.calibration import load_calibration

    model = load_onnx(MODEL)
    calibration = load_calibration(model, "/tmp/fm/fmnist_calib.npz")
    pipeline = channel_pruning_pipeline(
        0.5, allocator="dp", calibration=calibration, recalibrate_bn=True, compare_allocators=True
    )
    result = pipeline.run(model)
    return {**_timings(result), "allocation": _allocation_line(result)}


def case_resconcat() -> dict:
    import dataclasses

    import fashion_mnist

    from pcc.compiler import channel_pruning_pipeline, load_onnx
    from pcc.compiler.calibration import CalibrationData
    from pcc.compiler.options import CompileOptions

    model = load_onnx(HERE / "models" / "fashion_resconcat.onnx")
    images, _ = fashion_mnist.calibration_split(512)
    calibration = CalibrationData.from_arrays(model, {fashion_mnist.INPUT_NAME: images}, source="fashion-mnist train")
    repair = {"reconstruct": "ls"} if "reconstruct" in {f.name for f in dataclasses.fields(CompileOptions)} else {}
    pipeline = channel_pruning_pipeline(0.5, allocator="dp", calibration=calibration, compare_allocators=True, **repair)
    result = pipeline.run(model)
    return {**_timings(result), "allocation": _allocation_line(result), **repair}


def _torch_case(make, shape, sparsity: float, budget: str, samples: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from zoo import randomize_norms

    from pcc.compiler import channel_pruning_pipeline
    from pcc.compiler.calibration import CalibrationData
    from pcc.compiler.frontend import from_torch

    torch.manual_seed(0)
    net = randomize_norms(make()).eval()
    params = sum(p.numel() for p in net.parameters())
    model = from_torch(net, (torch.randn(*shape),))
    calibration = CalibrationData.random(model, samples=samples, batch_size=16)
    start = time.perf_counter()
    result = channel_pruning_pipeline(sparsity, allocator="dp", budget=budget, calibration=calibration).run(model)
    return {**_timings(result), "wall_s": time.perf_counter() - start, "params": params, "allocation": _allocation_line(result)}


def case_cnn20m() -> dict:
    sys.path.insert(0, str(HERE))
    from zoo import BasicBlock, ResNet

    return _torch_case(lambda: ResNet(BasicBlock, (3, 4, 6, 3), num_classes=1000), (1, 3, 128, 128), 0.7, "params", 64)


def case_resnet50() -> dict:
    sys.path.insert(0, str(HERE))
    from zoo import Bottleneck, ResNet

    return _torch_case(lambda: ResNet(Bottleneck, (3, 4, 6, 3)), (1, 3, 224, 224), 0.5, "latency", 64)


def case_accuracy() -> dict:
    import fashion_mnist

    from pcc.backends.onnx.runtime import top1_accuracy
    from pcc.compiler import channel_pruning_pipeline, load_onnx
    from pcc.compiler.calibration import CalibrationData, load_calibration
    import onnx_ir as ir

    sys.path.insert(0, str(HERE))
    test_images, test_labels = fashion_mnist.load("test")
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "sweep.npz"  # one sweep serves the DP at every sparsity
        for sparsity in (0.3, 0.5, 0.7):
            for allocator in ("uniform", "global", "lamp", "dp"):
                model = load_onnx(MODEL)
                calibration = load_calibration(model, "/tmp/fm/fmnist_calib.npz")
                test = CalibrationData.from_arrays(model, {"image": test_images}, test_labels, "test", 1000)
                result = channel_pruning_pipeline(
                    sparsity, allocator=allocator, calibration=calibration, recalibrate_bn=True, sensitivity_cache=cache
                ).run(model)
                table.setdefault(str(sparsity), {})[allocator] = top1_accuracy(ir.serde.serialize_model(result.model).SerializeToString(), test)
                if allocator == "dp":
                    table[str(sparsity)]["dp_note"] = _allocation_line(result)  # type: ignore[assignment]
    return table


def case_refine() -> dict:
    import fashion_mnist

    from pcc.backends.onnx.runtime import top1_accuracy
    from pcc.compiler import channel_pruning_pipeline, load_onnx
    from pcc.compiler.calibration import CalibrationData, load_calibration
    from pcc.passes.allocation import Allocation, AllocateDP
    import onnx_ir as ir

    test_images, test_labels = fashion_mnist.load("test")
    rows = {}
    for name in ("fashion", "resconcat"):
        for sparsity in (0.3, 0.5, 0.7):
            for rounds in (0, 1, 3):
                if name == "fashion":
                    model = load_onnx(MODEL)
                    calibration, repair = load_calibration(model, "/tmp/fm/fmnist_calib.npz"), {"recalibrate_bn": True}
                else:
                    model = load_onnx(HERE / "models" / "fashion_resconcat.onnx")
                    images, _ = fashion_mnist.calibration_split(512)
                    calibration = CalibrationData.from_arrays(model, {fashion_mnist.INPUT_NAME: images}, source="train")
                    repair = {"reconstruct": "ls"}
                pipeline = channel_pruning_pipeline(sparsity, allocator="dp", calibration=calibration, **repair)
                pipeline[pipeline.index(AllocateDP)].refine_rounds = rounds
                start = time.perf_counter()
                result = pipeline.run(model)
                seconds = time.perf_counter() - start
                test = CalibrationData.from_arrays(model, {fashion_mnist.INPUT_NAME: test_images}, test_labels, "test", 1000)
                allocation = result.get(Allocation)
                rows[f"{name} {sparsity} rounds={rounds}"] = {
                    "top1": top1_accuracy(ir.serde.serialize_model(result.model).SerializeToString(), test),
                    "kept_from": allocation.kept_from or "dp", "candidates": allocation.candidates, "seconds": seconds,
                }
                print(json.dumps({f"{name} {sparsity} rounds={rounds}": rows[f"{name} {sparsity} rounds={rounds}"]}), file=sys.stderr)
    return rows


CASES = {"fashion": case_fashion, "resconcat": case_resconcat, "cnn20m": case_cnn20m, "resnet50": case_resnet50, "accuracy": case_accuracy, "refine": case_refine}


def _run_case(name: str, pythonpath: str | None, limit: float) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    start, cpu = time.perf_counter(), _children_cpu()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--case", name], env=env, capture_output=True, text=True, timeout=limit, cwd=HERE
        )
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "wall_s": time.perf_counter() - start}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["no output"], "wall_s": time.perf_counter() - start}
    # CPU seconds of the case and its workers: comparable across runs on a machine shared with other jobs
    return {**json.loads(lines[-1]), "process_s": time.perf_counter() - start, "cpu_s": _children_cpu() - cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _archive(revision: str, folder: Path) -> Path:
    """The package as it was at `revision`, laid out as `pcc.X` under folder/pcc (namespace package)."""
    target = folder / "pcc"
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision, *PACKAGES], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return folder


def _show(label: str, name: str, numbers: dict) -> None:
    if numbers.get("timed_out"):
        print(f"{label:6} {name:9} did not finish within {numbers['wall_s']:.0f} s", flush=True)
    elif "error" in numbers:
        print(f"{label:6} {name:9} failed: {numbers['error']}", flush=True)
    else:
        print(f"{label:6} {name:9} {json.dumps(numbers)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also time the package as it was at this git revision")
    parser.add_argument("--cases", default="fashion,resconcat,cnn20m,resnet50,accuracy")
    parser.add_argument("--limit-s", type=float, default=900.0, help="stop a case after this long")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case here
    args = parser.parse_args()
    if args.case:
        sys.path.insert(0, str(HERE))
        print(json.dumps(CASES[args.case]()))
        return
    with tempfile.TemporaryDirectory() as folder:
        before = str(_archive(args.before, Path(folder))) if args.before else None
        for name in args.cases.split(","):
            if before and name not in ("accuracy", "refine"):
                _show("before", name, _run_case(name, before, args.limit_s))
            _show("after", name, _run_case(name, None, args.limit_s))


if __name__ == "__main__":
    main()

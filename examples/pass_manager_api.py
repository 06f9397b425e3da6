"""The Python API: build a pipeline, change it, run it, look at what each analysis found, emit ONNX.

    python examples/pass_manager_api.py [--model MODEL.onnx]

Without --model it exports a small ResNet from examples/zoo.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

from pcc.backends.onnx import OnnxTarget  # noqa: E402
from pcc.compiler import channel_pruning_pipeline, from_torch, load_onnx  # noqa: E402
from pcc.passes.allocation import AllocateGlobal, AllocateUniform, Allocation  # noqa: E402
from pcc.passes.analysis import DependencyGroups, Importance  # noqa: E402
from pcc.passes.transforms import PruneChannels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    # 1. Bring a model into the IR (an onnx_ir.Model): from a file, or from PyTorch.
    if args.model:
        model = load_onnx(args.model)
    else:
        module, example = zoo.build("resnet_bottleneck")
        model = from_torch(module, (example,))

    # 2. A pipeline is a list of onnx_ir passes: print it, then edit it like a list.
    pipeline = channel_pruning_pipeline(sparsity=0.4, importance="l1", round_to=4)
    pipeline[pipeline.index(AllocateUniform)] = AllocateGlobal(sparsity=0.4)  # swap the allocator
    pipeline.insert(pipeline.index(PruneChannels) + 1, common.CheckerPass(full_check=True))  # any onnx_ir pass fits
    print(pipeline)

    # 3. Run it (in place): every pass is timed, every analysis result is kept as a typed object.
    dense = ir.serde.serialize_model(model).SerializeToString()  # the reference for the backend's checks
    result = pipeline.run(model)
    print(result.timing_table())
    groups = result.get(DependencyGroups)
    importance = result.get(Importance)
    allocation = result.get(Allocation)
    print(groups.summary())
    for group in groups.groups[:5]:
        kept = allocation.keep_units[group.index]
        scores = importance.of_group(groups, group.index)
        print(f"  {group}: keeps {kept}/{group.num_units}, scores {scores.min():.3g}..{scores.max():.3g}")
    print(allocation.summary())

    # 4. Lower it: the onnx backend writes a checked file and measures it against the dense model.
    with tempfile.TemporaryDirectory() as tmp:
        target = OnnxTarget(repeats=5)
        report = target.emit(result, dense, Path(tmp) / "pruned.onnx", model_name="example", allocator="global", importance="l1")
        print(report.format())


if __name__ == "__main__":
    main()

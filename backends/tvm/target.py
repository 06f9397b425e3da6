"""The `tvm` target: a compiled library (MODEL.so + MODEL.json) built with Apache TVM's Relax.

The pruned/sparsified model is lowered (`lowering.lower`: BSR kernels where measured faster), exported
with `export_library`, loaded back from disk the way a deployment host would, and checked against
onnxruntime running the same pruned ONNX on the same inputs (1e-4 relative) before it is moved into
place. Latency is the compiled library against the *dense* input model in onnxruntime, interleaved in
one process: the comparison a user deciding between the two deployments needs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from pcc.backends.onnx.runtime import compare_outputs, paired_latency, random_inputs, session
from pcc.backends.onnx.target import build_report, describe_transforms
from pcc.backends.tvm.lowering import import_relax, layers_json, lower
from pcc.backends.tvm.runner import CompiledModel, spec_path
from pcc.compiler.errors import InvalidRequestError, PccError
from pcc.compiler.pipeline import PipelineResult
from pcc.compiler.report import CompileReport
from pcc.passes.transforms.sparsify_weights import SparsifyReport, SparsityPattern

__all__ = ["TvmTarget", "resolve_tvm_target"]

_AGREEMENT = 1e-4  # relative, TVM vs onnxruntime on the same pruned model


def resolve_tvm_target(text: str):
    """`llvm` is this CPU (detected), a JSON dict or any other kind name is passed to TVM as given."""
    import tvm

    from pcc.backends.tvm.host import host_target

    if text == "llvm":
        return host_target()
    try:
        spec = json.loads(text) if text.lstrip().startswith("{") else {"kind": text}
        return tvm.target.Target(spec)
    except Exception as exc:
        raise InvalidRequestError(f"--tvm-target {text!r} is not a TVM target ({str(exc).splitlines()[0]})") from None


def _kernel_block(pattern: str) -> tuple[int, int]:
    """The BSR block matching a --sparsify pattern: its own block, else single elements."""
    parsed = SparsityPattern.parse(pattern)
    return (parsed.rows, parsed.cols) if parsed.kind == "block" else (1, 1)


# TVM's thread pool keeps spinning ~150 ms after a call (measured by examples/bench_tvm_kernels.py); each timed
# run waits this long first, so neither engine is timed while the other's threads still hold the cores
_POOL_SPIN_SECONDS = 0.2


class _LibraryAsSession:
    """The compiled library behind onnxruntime's `run(None, feeds)`, so the shared timing code times it."""

    def __init__(self, compiled: CompiledModel):
        self.compiled = compiled

    def run(self, _names, feeds):
        return list(self.compiled.run(feeds).values())


@dataclass
class TvmTarget:
    name = "tvm"
    preferred_round_to = 16  # the BSR kernels' 16-row blocks; channel widths that are multiples keep them whole
    repeats: int = 20
    progress: bool = False
    seed: int = 0
    batch: int = 1
    length: int = 128
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # --input-shape: whole shapes by input
    tvm_target: str = "llvm"

    def default_output(self, model_path: Path) -> Path:
        return Path.cwd() / f"{model_path.stem}.pruned.so"

    def check(self, model: ir.Model) -> None:
        """Before any pruning work: can TVM's ONNX frontend import this model at all (names the op if not)."""
        shapes = {
            value.name: list(self.input_shapes.get(value.name) or [
                d if isinstance(d, int) else (self.batch if axis == 0 else self.length) for axis, d in enumerate(value.shape)
            ])
            for value in model.graph.inputs
        }
        import_relax(model, shapes)

    def emit(self, result: PipelineResult, dense_model, output: Path, *, model_name: str, allocator: str,
             importance: str) -> CompileReport:
        if output.suffix != ".so":
            raise InvalidRequestError(f"--target tvm writes a shared library: -o must end in .so, got {output}")
        target = resolve_tvm_target(self.tvm_target)
        dense = session(dense_model if isinstance(dense_model, bytes) else str(dense_model))
        feeds = random_inputs(dense, self.seed, symbolic=self.batch, length=self.length, shapes=self.input_shapes)
        pruned_onnx = session(ir.serde.serialize_model(result.model).SerializeToString())
        shapes = {spec.name: list(feeds[spec.name].shape) for spec in pruned_onnx.get_inputs()}
        sparsify = result.get(SparsifyReport)
        block = _kernel_block(sparsify.pattern) if sparsify is not None else (16, 1)
        lowered = lower(result.model, shapes, target, block=block, sparse=sparsify is not None)
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as staging:
            staged = Path(staging) / output.name
            lowered.executable.export_library(str(staged))
            expected = pruned_onnx.run(None, feeds)
            spec = {
                "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()
                           if n in shapes],
                "outputs": [{"name": o.name, "shape": list(a.shape), "dtype": str(a.dtype)}
                            for o, a in zip(pruned_onnx.get_outputs(), expected)],
                "tvm_target": str(target),
                "source": model_name,
                "matmuls": layers_json(lowered),
            }
            spec_path(staged).write_text(json.dumps(spec, indent=2))
            compiled = CompiledModel.load(staged)
            outputs = list(compiled.run({n: feeds[n] for n in shapes}).values())
            agreement = compare_outputs(expected, outputs)
            if agreement.max_relative > _AGREEMENT:
                raise PccError(
                    f"internal: the TVM build differs from onnxruntime on the same pruned model by {agreement.max_relative:.2g} "
                    "(relative); nothing was written"
                )
            os.replace(spec_path(staged), spec_path(output))
            os.replace(staged, output)
        compiled = CompiledModel.load(output)
        latency = paired_latency(dense, _LibraryAsSession(compiled), {n: feeds[n] for n in shapes},
                                 repeats=self.repeats, progress=self.progress, gap=_POOL_SPIN_SECONDS)
        difference = compare_outputs(dense.run(None, feeds), outputs)
        report = build_report(result, output, model_name, allocator, importance, latency, difference, self.name)
        report.latency_engine = "TVM library vs dense in onnxruntime CPU"
        report.latency_batch = self.batch
        report.checks = [
            "exported library reloaded from disk",
            f"matches onnxruntime on the pruned ONNX (max relative diff {agreement.max_relative:.1e})",
            "atomic write (.so + .json)",
        ]
        describe_transforms(report, result)
        report.sparsify = "; ".join(filter(None, [report.sparsify, lowered.summary()]))
        return report


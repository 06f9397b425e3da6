"""Lowering a (pruned, sparsified) IR model to a TVM Relax executable.

1. Import: `tvm.relax.frontend.onnx.from_onnx` with every input's shape fixed (the kernels below are
   specialised per shape; symbolic axes get the sizes the caller gives), then `FoldConstant`, which turns
   the frontend's transposed Gemm weights into plain constants.
2. Substitute: every `matmul(x, W)` whose W is a constant becomes a `call_tir` to one of our kernels on
   x viewed as [M, K]: the block-sparse (BSR) kernel with W's blocks baked in as constants, or the
   scheduled dense kernel. Which one is decided per layer by *measuring* both on this machine (a small
   cost table cached on disk), not by a density threshold: where the crossover lies depends on the
   shape, the block and the CPU. Why dense gets our kernel too: TVM 0.27's default CPU lowering leaves
   matmuls unscheduled (see shared/TVM.md: ~100x slower than onnxruntime), so it is no baseline.
3. Build: `tvm.compile` with TVM's default Relax pipeline for everything else (element-wise ops, norms,
   softmax: legalised TOPI compute, fused, no tuning).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import UnsupportedModelError

__all__ = ["LayerKernel", "Lowered", "lower", "import_relax", "COST_CACHE"]

COST_CACHE = Path.home() / ".cache" / "pcc" / "tvm_kernel_costs.json"


@dataclass
class LayerKernel:
    """What one constant-weight matmul became, and the measurements that chose it."""

    m: int
    k: int
    n: int
    density: float  # of W's blocks that hold a nonzero
    block: tuple[int, int]
    kernel: str  # bsr | dense
    bsr_ms: float | None
    dense_ms: float


@dataclass
class Lowered:
    executable: object  # tvm.runtime.Executable
    layers: list[LayerKernel] = field(default_factory=list)

    def summary(self) -> str:
        sparse = sum(layer.kernel == "bsr" for layer in self.layers)
        return f"{sparse}/{len(self.layers)} matmuls on BSR kernels, the rest on the scheduled dense kernel (chosen by measurement)"


def import_relax(model: ir.Model, input_shapes: dict[str, list[int]]):
    """The Relax module of `model`, or a one-line error naming the ops TVM's ONNX frontend lacks."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.serde.serialize_model(model)
    try:
        module = from_onnx(proto, shape_dict=input_shapes, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as exc:
        ops = re.findall(r"[A-Za-z][A-Za-z0-9_.]*", str(exc).split(":")[-1])
        nodes = [f"{n.op_type} node '{n.name}'" for n in model.graph if n.op_type in ops]
        raise UnsupportedModelError(
            f"--target tvm: TVM's ONNX frontend cannot import op {', '.join(ops)} ({', '.join(nodes[:3]) or 'in the model'})"
        ) from None
    except Exception as exc:  # the frontend raises assorted types for ops it half-supports
        raise UnsupportedModelError(f"--target tvm: TVM's ONNX frontend failed: {str(exc).splitlines()[0]}") from None
    return relax.transform.FoldConstant()(module)


class _CostTable:
    """Measured kernel times (ms) keyed by shape, block pattern and target, kept in a JSON file so a second
    compile of the same shapes measures nothing."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, float] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except ValueError:
                self.entries = {}

    def get(self, key: str, measure) -> float:
        if key not in self.entries:
            self.entries[key] = measure()
        return self.entries[key]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(staged, self.path)


def _time_kernel(prim_func, arguments: list[np.ndarray], output_shape: tuple[int, ...], target, repeats: int = 10) -> float:
    """Median milliseconds of one standalone kernel call."""
    import tvm

    built = tvm.compile(tvm.IRModule({"main": prim_func}), target=target)
    device = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, device) for a in arguments] + [tvm.runtime.tensor(np.zeros(output_shape, np.float32), device)]
    built["main"](*tensors)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        built["main"](*tensors)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def lower(model: ir.Model, input_shapes: dict[str, list[int]], target, *, block: tuple[int, int] = (16, 1),
          cost_cache: Path | None = COST_CACHE, sparse: bool = True) -> Lowered:
    """Import, substitute matmul kernels (BSR where measured faster, when `sparse`), build."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from pcc.backends.tvm.kernels import DENSE_STRIP, bsr_matmul_primfunc, dense_matmul_primfunc, to_bsr

    module = import_relax(model, input_shapes)
    costs = _CostTable(cost_cache)
    layers: list[LayerKernel] = []
    target_key = str(target.export() if hasattr(target, "export") else target)
    rng = np.random.default_rng(0)

    def choose(m: int, weight: np.ndarray):
        """(prim_func, constant arguments, output width) of the faster kernel for x[m, k] @ weight[k, n]."""
        k, n = weight.shape
        x = rng.standard_normal((m, k)).astype(np.float32)
        dense, dense_width = dense_matmul_primfunc(m, k, n), -(-n // DENSE_STRIP) * DENSE_STRIP
        dense_ms = costs.get(f"dense {m}x{k}x{n} {target_key}", lambda: _time_kernel(dense, [x, weight], (m, dense_width), target))
        matrix = to_bsr(weight, block) if sparse else None
        choice = LayerKernel(m, k, n, matrix.density if matrix else 1.0, block, "dense", None, dense_ms)
        if matrix is not None and matrix.density < 1:
            kernel, width = bsr_matmul_primfunc(m, k, n, matrix), matrix.block_grid[0] * block[0]
            key = f"bsr {m}x{k}x{n} block {block[0]}x{block[1]} blocks {matrix.nnz_blocks} {target_key}"
            choice.bsr_ms = costs.get(key, lambda: _time_kernel(kernel, [x, *matrix.arrays()], (m, width), target))
            if choice.bsr_ms < dense_ms:
                choice.kernel = "bsr"
                layers.append(choice)
                return kernel, list(matrix.arrays()), width
        layers.append(choice)
        return dense, [weight], dense_width

    @mutator
    class _SubstituteMatmuls(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.count = 0

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
                return call
            x, weight = call.args
            if not isinstance(weight, tvm.ir.expr.Constant) or len(weight.ty.shape) != 2:
                return call
            shape = [int(d) for d in x.ty.shape]
            array = weight.value.numpy().astype(np.float32)
            m = int(np.prod(shape[:-1]))
            kernel, constants, padded = choose(m, array)
            self.count += 1
            name = f"pcc_matmul_{self.count}"
            function = self.builder_.add_func(kernel.with_attr("global_symbol", name), name)
            flat = self.builder_.emit(relax.op.reshape(x, (m, shape[-1]))) if len(shape) != 2 else x
            n = array.shape[1]
            out = self.builder_.emit(
                relax.call_tir(function, [flat, *(relax.const(c) for c in constants)], relax.TensorType((m, padded), "float32"))
            )
            if padded != n:
                out = self.builder_.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n]))
            return relax.op.reshape(out, (*shape[:-1], n)) if len(shape) != 2 else out

        def run(self):
            for global_var, function in self.mod_.functions_items():
                if isinstance(function, relax.Function):
                    self.builder_.update_func(global_var, self.visit_expr(function))
            return self.builder_.get()

    module = _SubstituteMatmuls(module).run()
    costs.save()
    executable = tvm.compile(module, target=target)
    return Lowered(executable, layers)


def layers_json(lowered: Lowered) -> list[dict]:
    return [asdict(layer) for layer in lowered.layers]

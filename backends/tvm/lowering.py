"""Lowering a (pruned, sparsified) IR model to a TVM Relax executable.

1. Import: every input's shape fixed (the kernels below are specialised per shape; symbolic axes get the
   sizes the caller gives) and the shape arithmetic that hangs off them folded (`specialise_shapes`, shared
   with the analysis of symbolic axes, then onnxscript's optimizer),
   then `tvm.relax.frontend.onnx.from_onnx`, then `FoldConstant`, which turns the frontend's transposed
   Gemm weights into plain constants.
2. Substitute: every matmul of two activations with static, equal batch axes (attention's Q x K^T and
   P x V) becomes a `call_tir` to `batch_matmul.py`'s kernel. Every `matmul(x, W)` whose W is a constant
   becomes a `call_tir` to one of our kernels on
   x viewed as [M, K]: the block-sparse (BSR) kernel with W's blocks baked in as constants, or the
   packed, register-tiled dense kernel (`bsr.py`, `dense.py`). Which one, and which variant of each, is
   decided per layer by *measuring* them on this machine (`tuning.CostTable`, cached on disk), not by a
   density threshold: where the crossover lies depends on the
   shape, the block and the CPU. Why dense gets our kernel too: TVM 0.27's default CPU lowering leaves
   matmuls unscheduled (see shared/TVM.md: ~100x slower than onnxruntime), so it is no baseline.
   Every NCHW conv2d (groups 1) with a constant weight becomes im2col (`im2col.py`) and the same choice
   of kernels: TVM's own conv2d is as unscheduled (Fashion-MNIST CNN, batch 16: 432 ms with it, 11 ms
   with im2col; onnxruntime 4.3 ms). Grouped/depthwise convolutions stay on TVM's conv2d.
3. Build: `tvm.compile` with TVM's default Relax pipeline for everything else (element-wise ops, norms,
   softmax: legalised TOPI compute, fused, no tuning), plus CPU schedules for those fused functions
   (`schedule.py`: dlight's CPU rules, then parallel spatial loops).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.backends.tvm.host import use_all_cores
from pcc.compiler.errors import UnsupportedModelError
from pcc.passes.analysis.shapes import specialise_shapes

__all__ = ["LayerKernel", "Lowered", "lower", "import_relax", "COST_CACHE"]

COST_CACHE = Path.home() / ".cache" / "pcc" / "tvm_kernel_costs.json"


@dataclass
class LayerKernel:
    """What one constant-weight matmul (or convolution, as im2col x weight) became, and the measurements that chose it."""

    op: str  # matmul | conv
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
    activation_matmuls: list[tuple[int, int, int, int]] = field(default_factory=list)  # (batch, m, k, n)

    def summary(self) -> str:
        sparse = sum(layer.kernel == "bsr" for layer in self.layers)
        text = f"{sparse}/{len(self.layers)} matmuls on BSR kernels, the rest on the scheduled dense kernel (chosen by measurement)"
        if self.activation_matmuls:
            text += f"; {len(self.activation_matmuls)} activation x activation matmuls on the batched kernel"
        return text


def import_relax(model: ir.Model, input_shapes: dict[str, list[int]]):
    """The Relax module of `model` at `input_shapes`, or a one-line error naming the ops TVM's ONNX frontend lacks."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    import onnxscript.optimizer

    # TVM's frontend loses shapes through run-time shape arithmetic (Shape -> Gather -> Concat -> Reshape(x,
    # [b, s, -1])) and then refuses the -1: with the sizes fixed, the chain is a constant
    specialised = specialise_shapes(model, input_shapes)
    onnxscript.optimizer.optimize(specialised)
    proto = ir.serde.serialize_model(specialised)
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


def lower(model: ir.Model, input_shapes: dict[str, list[int]], target, *, block: tuple[int, int] = (16, 1),
          cost_cache: Path | None = COST_CACHE, sparse: bool = True) -> Lowered:
    """Import, substitute matmul kernels (BSR where measured faster, when `sparse`), build."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from pcc.backends.tvm.batch_matmul import batch_matmul_primfunc
    from pcc.backends.tvm.bsr import best_bsr_variant, bsr_kernel_arrays, bsr_matmul_primfunc, to_bsr
    from pcc.backends.tvm.dense import best_dense_variant, dense_matmul_primfunc, pack_dense_weight
    from pcc.backends.tvm.im2col import im2col
    from pcc.backends.tvm.schedule import SCHEDULED, cpu_pipeline, mutate_relax_functions

    module = import_relax(model, input_shapes)
    layers: list[LayerKernel] = []
    activation_matmuls: list[tuple[int, int, int, int]] = []

    def choose(m: int, weight: np.ndarray, op: str):
        """(prim_func, constant arguments) of the faster kernel for x[m, k] @ weight[k, n], each kernel's
        best variant timed on this machine (cached in `cost_cache`)."""
        k, n = weight.shape
        dense_variant, dense_ms = best_dense_variant(m, k, n, target, cache=cost_cache)
        matrix = to_bsr(weight, block) if sparse and block[1] <= k else None
        choice = LayerKernel(op, m, k, n, matrix.density if matrix else 1.0, block, "dense", None, dense_ms)
        layers.append(choice)
        if matrix is not None and matrix.density < 1:
            variant, choice.bsr_ms = best_bsr_variant(m, matrix, target, cache=cost_cache)
            if choice.bsr_ms < dense_ms:
                choice.kernel = "bsr"
                return bsr_matmul_primfunc(m, k, n, matrix, variant=variant), list(bsr_kernel_arrays(matrix))
        return dense_matmul_primfunc(m, k, n, variant=dense_variant), [pack_dense_weight(weight, dense_variant)]

    @mutator
    class _SubstituteMatmuls(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.count = 0

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.nn.conv2d":
                return self.conv_as_matmul(call)
            if call.op.name != "relax.matmul":
                return call
            x, weight = call.args
            if not isinstance(weight, tvm.ir.expr.Constant):
                return self.activation_matmul(call, x, weight)
            if len(weight.ty.shape) != 2:
                return call
            shape = [int(d) for d in x.ty.shape]
            m = int(np.prod(shape[:-1]))
            flat = self.builder_.emit(relax.op.reshape(x, (m, shape[-1]))) if len(shape) != 2 else x
            out = self.constant_matmul(flat, weight.value.numpy().astype(np.float32), "matmul")
            return relax.op.reshape(out, (*shape[:-1], out.ty.shape[1])) if len(shape) != 2 else out

        def constant_matmul(self, x, weight: np.ndarray, op: str):
            """x[m, k] @ weight[k, n] as a call to the kernel `choose` picks for it."""
            m = int(x.ty.shape[0])
            kernel, constants = choose(m, weight, op)
            self.count += 1
            name = f"pcc_matmul_{self.count}"
            function = self.builder_.add_func(kernel.with_attr("global_symbol", name).with_attr(SCHEDULED, True), name)
            return self.builder_.emit(relax.call_tir(function, [x, *(relax.const(c) for c in constants)],
                                                     relax.TensorType((m, weight.shape[1]), "float32")))

        def conv_as_matmul(self, call):
            """A float32 NCHW conv2d (groups 1) with a constant weight, as im2col then `constant_matmul`: the
            patches [N*OH*OW, KH*KW*C] (a TE compute under the CPU schedules; for a 1x1 conv, a transpose)
            times the weight as [KH*KW*C, O], back to NCHW. TVM's own conv2d on CPU is TOPI's compute without
            a schedule; this puts convolutions on the same measured BSR/dense kernels as the matmuls.
            SparsifyWeights orders a conv's reduction (c, kh, kw): blocks one column wide (16x1) stay whole
            in the (kh, kw, c) order here, wider ones spread over several BSR blocks (correct, less sparse)."""
            x, weight = call.args
            attrs = call.attrs
            if (not isinstance(weight, tvm.ir.expr.Constant) or attrs.groups != 1 or str(x.ty.dtype) != "float32"
                    or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW")
                    or not all(isinstance(d, tvm.tirx.IntImm) for d in x.ty.shape)):
                return call
            array = weight.value.numpy().astype(np.float32)
            out_channels, channels, kh, kw = array.shape
            batch, _, out_h, out_w = (int(d) for d in call.ty.shape)
            patches = self.builder_.emit(self.builder_.call_te(
                im2col, x, kernel=(kh, kw), strides=tuple(int(v) for v in attrs.strides),
                padding=tuple(int(v) for v in attrs.padding), dilation=tuple(int(v) for v in attrs.dilation),
                out_size=(out_h, out_w),
            ))
            columns = array.transpose(2, 3, 1, 0).reshape(kh * kw * channels, out_channels)  # (kh, kw, c) x O
            out = self.constant_matmul(patches, np.ascontiguousarray(columns), "conv")
            image = self.builder_.emit(relax.op.reshape(out, (batch, out_h, out_w, out_channels)))
            return relax.op.permute_dims(image, (0, 3, 1, 2))

        def activation_matmul(self, call, a, b):
            """a[..., m, k] @ b[..., k, n] with the same static batch axes, float32: `batch_matmul_primfunc`."""
            shapes = [[int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in v.ty.shape] for v in (a, b)]
            dtypes = {str(v.ty.dtype) for v in (a, b)}
            if (dtypes != {"float32"} or None in shapes[0] + shapes[1] or len(shapes[0]) != len(shapes[1])
                    or len(shapes[0]) < 3 or shapes[0][:-2] != shapes[1][:-2]):
                return call
            (*outer, m, k), n = shapes[0], shapes[1][-1]
            batch = int(np.prod(outer))
            self.count += 1
            name = f"pcc_batch_matmul_{self.count}"
            kernel = batch_matmul_primfunc(batch, m, k, n).with_attr("global_symbol", name).with_attr(SCHEDULED, True)
            function = self.builder_.add_func(kernel, name)
            flat = [self.builder_.emit(relax.op.reshape(v, (batch, *shape[-2:]))) for v, shape in zip((a, b), shapes)]
            out = self.builder_.emit(relax.call_tir(function, flat, relax.TensorType((batch, m, n), "float32")))
            activation_matmuls.append((batch, m, k, n))
            return relax.op.reshape(out, (*outer, m, n))

    use_all_cores()
    module = mutate_relax_functions(module, _SubstituteMatmuls(module))
    executable = tvm.compile(module, target=target, relax_pipeline=cpu_pipeline(tvm.target.Target(target)))
    return Lowered(executable, layers, activation_matmuls)


def layers_json(lowered: Lowered) -> list[dict]:
    return [asdict(layer) for layer in lowered.layers]

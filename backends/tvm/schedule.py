"""CPU schedules for what our kernels do not cover: norms, softmax, activations, element-wise glue.

TVM 0.27's default CPU pipeline legalises these ops to TOPI compute and fuses them, but schedules nothing:
every fused function runs on one core as a scalar loop nest. In a BERT-shaped encoder whose matmuls are
on our kernels that glue became most of the time. The build therefore runs `s_tir.dlight`'s CPU rules
(`Reduction` for softmax/norm-like reductions, `GEMV`) and, for every function they leave alone,
`ParallelSpatialLoops`: inline what can be inlined, then run each remaining block's spatial loops fused
and in parallel across the cores, vectorising the innermost spatial loop of blocks without a reduction.
Before legalisation, the non-linear functions take TOPI's fast approximations (`FastMathTransform`:
softmax, exp, erf, tanh; `fast_gelu` for GELU, which that pass does not cover), which vectorise; the
build still checks the library against onnxruntime to 1e-4 relative. Our hand-written kernels are marked
scheduled, so no rule touches them.
"""

from __future__ import annotations

__all__ = ["SCHEDULED", "cpu_pipeline", "fast_gelu", "mutate_relax_functions", "parallel_spatial_loops"]

SCHEDULED = "tirx.is_scheduled"  # the attribute dlight reads: a function it must not re-schedule
_VECTOR = 16  # float32 lanes of an AVX-512 register


def parallel_spatial_loops():
    """The fallback schedule rule (a `dlight.ScheduleRule`; built lazily, TVM is imported on use)."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    class ParallelSpatialLoops(dl.ScheduleRule):
        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            blocks = dl.normalize_prim_func(sch)
            if blocks is None:
                return None
            for block in dl.try_inline(sch, blocks):
                kinds = block.dom_kind()
                loops = sch.get_loops(block.block_rv)
                spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
                if not spatial or len(spatial) != len(loops) - kinds.count("R") or "O" in kinds:
                    continue
                sch.reorder(*spatial, *(loop for loop, kind in zip(loops, kinds) if kind == "R"))
                fused = sch.fuse(*spatial)
                if "R" in kinds:
                    sch.parallel(fused)
                    continue
                outer, inner = sch.split(fused, factors=[None, _VECTOR])
                sch.parallel(outer)
                sch.vectorize(inner)
            return sch

    return ParallelSpatialLoops()


def mutate_relax_functions(mod, mutator):
    """`mod` with each of its Relax functions visited and replaced by `mutator` (a `PyExprMutator` built on
    `mod`): the loop every Relax-level rewrite here shares (the PrimFuncs are left as they are)."""
    from tvm import relax

    for global_var, function in mod.functions_items():
        if isinstance(function, relax.Function):
            mutator.builder_.update_func(global_var, mutator.visit_expr(function))
    return mutator.builder_.get()


def fast_gelu():
    """A Relax pass: exact GELU, x/2 (1 + erf(x/sqrt 2)), with TOPI's vectorisable `fast_erf` (a rational
    approximation) instead of the libm call TVM makes per element, which cost 0.6 ms per FFN layer of a
    BERT-base-shaped encoder at 128 tokens, more than its sparse matmuls."""
    import tvm
    from tvm import topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def gelu(x):
        return tvm.te.compute(x.shape, lambda *i: x(*i) * 0.5, name="half") * (1.0 + topi.fast_erf(x * 0.7071067811865476))

    @mutator
    class _FastGelu(PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
                return self.builder_.call_te(gelu, call.args[0])
            return call

    @tvm.transform.module_pass(opt_level=0, name="FastGelu")
    def rewrite(mod, _ctx):
        return mutate_relax_functions(mod, _FastGelu(mod))

    return rewrite


def cpu_pipeline(target):
    """TVM's default CPU Relax pipeline with the schedules above applied after legalisation and fusion."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential([
                *cpu_generic.library_dispatch_passes(target),
                fast_gelu(),
                relax.transform.FastMathTransform(),
                *cpu_generic.legalize_passes(target),
                dl.ApplyDefaultSchedule(dl.cpu.Reduction(), dl.cpu.GEMV(), parallel_spatial_loops()),
                *cpu_generic.dataflow_lower_passes(target),
                *cpu_generic.finalize_passes(target),
            ])(mod)

    return pipeline

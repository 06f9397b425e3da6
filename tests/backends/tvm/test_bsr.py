"""BSR kernels: the format (scipy's, padded edges, Gemm transB), both loop nests against numpy on awkward
shapes, empty block rows, an all-zero weight, a Relax module calling the kernel, the cached variant choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pcc.backends.tvm import bsr
from pcc.backends.tvm.bsr import BSRVariant, best_bsr_variant, bsr_kernel_arrays, bsr_matmul_primfunc, bsr_variants, to_bsr
from pcc.backends.tvm.host import host_target_spec
from pcc.backends.tvm.tuning import build_kernel

tvm = pytest.importorskip("tvm")

TARGET = host_target_spec()


def block_sparse(rng: np.random.Generator, k: int, n: int, block: tuple[int, int], density: float) -> np.ndarray:
    """W[K, N] whose W^T has `density` of its R x C blocks non-zero (edge blocks cut at K and N)."""
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    mask = np.repeat(np.repeat(keep, r, axis=0), c, axis=1)[:n, :k].T
    return (rng.standard_normal((k, n)) * mask).astype(np.float32)


def run_bsr(x: np.ndarray, matrix, variant: BSRVariant) -> np.ndarray:
    (k, n), m = matrix.shape, x.shape[0]
    kernel = build_kernel(bsr_matmul_primfunc(m, k, n, matrix, variant=variant), TARGET)
    out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))  # every output must be written
    kernel(tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in bsr_kernel_arrays(matrix)), out)
    return out.numpy()


def test_to_bsr_is_scipys_layout_of_w_transposed_with_padded_edges():
    rng = np.random.default_rng(0)
    weight = block_sparse(rng, 10, 37, (16, 1), 0.5)  # N = 37: two full block rows and a 5-row tail
    matrix = to_bsr(weight, (16, 1))
    assert matrix.data.shape[1:] == (16, 1) and matrix.indptr.size == 3 + 1 and matrix.shape == (10, 37)
    np.testing.assert_array_equal(matrix.to_dense(), weight)
    gemm = to_bsr(np.ascontiguousarray(weight.T), (16, 1), transposed=True)  # Gemm transB=1 stores W^T
    np.testing.assert_array_equal(gemm.data, matrix.data)
    np.testing.assert_array_equal(gemm.indices, matrix.indices)
    assert 0 < matrix.density <= 1 and matrix.block_grid == (3, 10)


# 1 x 70 x 37: M = 1 and no side a multiple of any block; 33 x 19 x 50: M not a multiple of any tile;
# 5 x 40 x 325: several groups of block rows per job, the last one partial
@pytest.mark.parametrize(("m", "k", "n"), [(1, 70, 37), (8, 64, 48), (33, 19, 50), (5, 40, 325)])
@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 1)])
def test_both_loop_nests_match_numpy(block, m, k, n):
    rng = np.random.default_rng(1)
    weight = block_sparse(rng, k, n, block, 0.3)
    weight[:, : block[0]] = 0  # the first block row of W^T holds no block at all
    weight[:, -1] = rng.standard_normal(k)  # ... and the last, partial one is full
    matrix = to_bsr(weight, block)
    assert matrix.indptr[1] == 0
    x = rng.standard_normal((m, k)).astype(np.float32)
    variants = [BSRVariant("rows", 4, 2)]
    if m > 1:
        variants.append(BSRVariant("cols", 16, 2))
    for variant in variants:
        np.testing.assert_allclose(run_bsr(x, matrix, variant), x @ weight, rtol=1e-4, atol=1e-4 * np.abs(x @ weight).max(),
                                   err_msg=variant.name)


def test_a_fully_zero_weight_gives_zeros():
    matrix = to_bsr(np.zeros((40, 24), np.float32), (16, 1))
    assert matrix.nnz_blocks == 0 and matrix.density == 0
    x = np.random.default_rng(2).standard_normal((4, 40)).astype(np.float32)
    for variant in (BSRVariant("rows", 4), BSRVariant("cols", 16)):
        assert not run_bsr(x, matrix, variant).any()


def test_the_candidates_keep_accumulators_in_registers():
    for m in (1, 16, 128):
        for block in ((16, 1), (4, 4), (1, 1)):
            variants = bsr_variants(m, block)
            assert variants and all(min(v.tile, m) * v.unroll * block[0] * 4 < 1024 for v in variants)
            assert all(BSRVariant.parse(v.name) == v for v in variants)
    assert {v.layout for v in bsr_variants(128, (16, 1))} == {"rows"}  # 16 lanes of outputs already


def test_the_kernel_runs_inside_a_relax_module_with_the_blocks_as_constants():
    from tvm import relax

    m, k, n = 6, 40, 37
    rng = np.random.default_rng(3)
    weight = block_sparse(rng, k, n, (16, 1), 0.3)
    matrix = to_bsr(weight, (16, 1))
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    with builder.function("main", [x]):
        kernel = builder.add_func(bsr_matmul_primfunc(m, k, n, matrix), "bsr_matmul")
        with builder.dataflow():
            constants = [relax.const(a) for a in bsr_kernel_arrays(matrix)]
            y = builder.emit(relax.call_tir(kernel, [x, *constants], relax.TensorType((m, n), "float32")))
            out = builder.emit_output(relax.op.nn.relu(y))
        builder.emit_func_output(out)
    # a Relax build needs a Target object: with the dict form tvm.compile fails on `target.keys`
    vm = relax.VirtualMachine(tvm.compile(builder.get(), target=tvm.target.Target(TARGET)), tvm.cpu())
    inputs = rng.standard_normal((m, k)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(inputs)).numpy(), np.maximum(inputs @ weight, 0),
                               rtol=1e-4, atol=1e-5)


def test_best_variant_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    weight = block_sparse(np.random.default_rng(4), 32, 32, (4, 4), 0.5)
    matrix = to_bsr(weight, (4, 4))
    cache = tmp_path / "costs.json"
    chosen, milliseconds = best_bsr_variant(16, matrix, TARGET, cache=cache, repeats=2)
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["best"] == chosen.name and set(entry["ms"]) == {v.name for v in bsr_variants(16, (4, 4))}
    assert milliseconds == entry["ms"][chosen.name]

    def no_timing(*_args, **_kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(bsr, "time_kernels", no_timing)
    assert best_bsr_variant(16, matrix, TARGET, cache=cache) == (chosen, milliseconds)


def test_float64_kernels_and_a_block_wider_than_the_reduction():
    rng = np.random.default_rng(5)
    weight = block_sparse(rng, 24, 40, (4, 4), 0.5).astype(np.float64)
    matrix = to_bsr(weight, (4, 4))
    x = rng.standard_normal((16, 24))
    for variant in (BSRVariant("rows", 4, 2), BSRVariant("cols", 16, 1)):
        kernel = build_kernel(bsr_matmul_primfunc(16, 24, 40, matrix, "float64", variant), TARGET)
        out = tvm.runtime.tensor(np.zeros((16, 40)))
        kernel(tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in bsr_kernel_arrays(matrix, "float64")), out)
        np.testing.assert_allclose(out.numpy(), x @ weight, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="4 columns wide"):
        bsr_matmul_primfunc(2, 3, 8, to_bsr(np.ones((3, 8), np.float32), (4, 4)))

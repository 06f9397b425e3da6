"""The tvm backend: BSR and dense kernels against numpy, the compile/export/run flow, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from pcc.backends.tvm.host import host_target
from pcc.backends.tvm.kernels import DENSE_STRIP, bsr_matmul_primfunc, dense_matmul_primfunc, to_bsr
from pcc.compiler.cli import main
from pcc.compiler.frontend import from_torch

tvm = pytest.importorskip("tvm")


def _run_kernel(prim_func, arguments, width):
    built = tvm.compile(tvm.IRModule({"main": prim_func}), target=host_target())
    out = tvm.runtime.tensor(np.zeros((arguments[0].shape[0], width), np.float32))
    built["main"](*(tvm.runtime.tensor(a) for a in arguments), out)
    return out.numpy()


def _block_sparse(rng, k, n, block, density):
    r, c = block
    keep = rng.random((-(-n // r), -(-k // c))) < density
    mask = np.repeat(np.repeat(keep, r, axis=0), c, axis=1)[:n, :k].T
    return (rng.standard_normal((k, n)) * mask).astype(np.float32)


@pytest.mark.parametrize("block", [(16, 1), (4, 4), (1, 1)])
@pytest.mark.parametrize(("m", "k", "n"), [(8, 64, 48), (3, 70, 37)])  # the second: no side a multiple of the block
def test_bsr_kernel_matches_numpy(block, m, k, n):
    rng = np.random.default_rng(0)
    weight = _block_sparse(rng, k, n, block, 0.3)
    weight[:, : block[0]] = 0  # the first block row of W^T holds no block at all
    matrix = to_bsr(weight, block)
    assert matrix.indptr[1] == 0
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = _run_kernel(bsr_matmul_primfunc(m, k, n, matrix), [x, *matrix.arrays()], matrix.block_grid[0] * block[0])
    np.testing.assert_allclose(out[:, :n], x @ weight, rtol=1e-4, atol=1e-4)


def test_a_fully_zero_weight_gives_zeros_and_the_dense_kernel_handles_tails():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 40)).astype(np.float32)
    matrix = to_bsr(np.zeros((40, 24), np.float32), (16, 1))
    assert matrix.nnz_blocks == 0
    out = _run_kernel(bsr_matmul_primfunc(4, 40, 24, matrix), [x, *matrix.arrays()], 32)
    assert not out[:, :24].any()
    weight = rng.standard_normal((40, 21)).astype(np.float32)  # 21 = one full strip of 16 and a tail of 5
    dense = _run_kernel(dense_matmul_primfunc(4, 40, 21), [x, weight], 2 * DENSE_STRIP)
    np.testing.assert_allclose(dense[:, :21], x @ weight, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 40))
    folder = tmp_path_factory.mktemp("tvm")
    x = torch.randn(8, 64)
    onnx.save(ir.serde.serialize_model(from_torch(module, (x,))), folder / "mlp.onnx")
    np.savez(folder / "x.npz", input=x.numpy())
    return folder


def test_compile_exports_a_library_that_runs_in_a_fresh_process(mlp, capsys):
    library = mlp / "mlp.so"
    code = main(["compile", str(mlp / "mlp.onnx"), "--sparsity", "0.8", "--sparsify", "block:16x1", "--target", "tvm",
                 "-o", str(library), "--repeats", "3"])
    printed = capsys.readouterr().out
    assert code == 0 and library.is_file()
    assert "matches onnxruntime on the pruned ONNX" in printed and "80.0% of the layers' weights are zero" in printed
    spec = json.loads(library.with_suffix(".json").read_text())
    assert spec["inputs"] == [{"name": "input", "shape": [8, 64], "dtype": "float32"}]
    assert {layer["kernel"] for layer in spec["matmuls"]} <= {"bsr", "dense"} and len(spec["matmuls"]) == 2
    fresh = subprocess.run(
        [sys.executable, "-m", "pcc.compiler", "run", str(library), "--input", str(mlp / "x.npz"), "-o", str(mlp / "y.npz")],
        capture_output=True, text=True, timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr
    from pcc.backends.tvm.runner import CompiledModel

    expected = CompiledModel.load(library).run_npz(mlp / "x.npz")
    with np.load(mlp / "y.npz") as produced:
        np.testing.assert_allclose(produced[spec["outputs"][0]["name"]], next(iter(expected.values())), rtol=1e-6)


def test_run_rejects_inputs_of_the_wrong_shape(mlp, capsys):
    library = mlp / "mlp.so"
    if not library.exists():
        pytest.skip("needs the library compiled above")
    np.savez(mlp / "bad.npz", input=np.zeros((2, 64), np.float32))
    assert main(["run", str(library), "--input", str(mlp / "bad.npz")]) == 2
    assert "the model takes float32[8, 64]" in capsys.readouterr().err


def test_an_op_tvm_cannot_import_is_named(tmp_path, capsys):
    node = helper.make_node("DFT", ["x"], ["y"], name="spectrum")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "dft.onnx")
    code = main(["compile", str(tmp_path / "dft.onnx"), "--sparsity", "0.5", "--sparsify", "unstructured",
                 "--target", "tvm", "-o", str(tmp_path / "dft.so")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("pcc: error:")
    assert "cannot import op DFT (DFT node 'spectrum')" in error
    assert not (tmp_path / "dft.so").exists()

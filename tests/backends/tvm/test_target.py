"""The tvm target: compile, export, run in a fresh process, bad input (the kernels: test_bsr.py, test_dense.py)."""

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

from pcc.compiler.cli import main
from pcc.compiler.frontend import from_torch
from tests.backends.tvm import compile_block_sparse

tvm = pytest.importorskip("tvm")


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


class _MaskedAttention(torch.nn.Module):
    """Attention whose mask is built from the sequence length (Range) and whose heads are merged with a
    reshape to [b, s, -1]: with symbolic axes TVM's frontend cannot import it until the shapes are fixed."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x):
        batch, length, _ = x.shape
        position = torch.arange(length)
        bias = torch.where(position[None, :] <= position[:, None], 0.0, -1e4)
        heads = self.qkv(x).view(batch, length, 4, 8).transpose(1, 2)
        heads = torch.softmax(heads @ heads.transpose(-1, -2) + bias, -1) @ heads
        return self.out(heads.transpose(1, 2).reshape(batch, length, -1))


def test_symbolic_batch_and_sequence_axes_are_fixed_before_import(tmp_path, capsys):
    torch.manual_seed(0)
    model = from_torch(_MaskedAttention().eval(), (torch.randn(2, 10, 32),), dynamic_batch=True, dynamic_sequence=True)
    assert not any(isinstance(d, int) for d in model.graph.inputs[0].shape[:2])
    library = tmp_path / "attention.so"
    compile_block_sparse(model, library, 0.5, capsys)
    # the library is built for the batch and length the target was given (defaults: 1 and 128)
    assert json.loads(library.with_suffix(".json").read_text())["inputs"][0]["shape"] == [1, 128, 32]

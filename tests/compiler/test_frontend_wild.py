"""Files from other frameworks and converters: each compiles to a valid model or is refused in one line.

The models are torch exports made here, edited only where no exporter for that framework is installed
(paddle2onnx's habits: weights as Constant nodes, -1 for a dynamic dimension, value_info written before
its own rewrites). `examples/bench_wild.py` runs the real files from PyPI wheels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.cli import main
from pcc.compiler.frontend import from_proto
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.analysis import BuildDependencyGroups, DependencyGroups
from pcc.passes.analysis.reshape_shapes import InferReshapeShapes
from pcc.passes.analysis.shapes import InferMissingShapes
from tests.conftest import run_onnx


class SmallCNN(torch.nn.Module):
    """Conv-BN-ReLU x2 and a classifier on the flattened map (how Paddle/Keras heads look)."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 8, 3, padding=1, stride=2), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(8 * 4 * 4, 5)
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return self.head(y.view(y.size(0), -1) if self.view else y.flatten(1))


def export_legacy(module: torch.nn.Module, inputs: tuple, opset: int = 11, **kwargs) -> onnx.ModelProto:
    """The TorchScript exporter, as old converters' files look: no constant folding, opset below 13."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics other than 0/1, so BN is not an identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), inputs, buffer, dynamo=False, opset_version=opset, do_constant_folding=False, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def paddle_style(proto: onnx.ModelProto) -> onnx.ModelProto:
    """paddle2onnx's habits: every weight a Constant node, -1 for the batch, stale value_info."""
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in proto.graph.initializer]
    nodes = constants + list(proto.graph.node)
    del proto.graph.initializer[:]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = -1
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    # an annotation from before the converter's rewrites: the wrong channel count
    proto.graph.value_info.append(helper.make_tensor_value_info(first_conv.output[0], onnx.TensorProto.FLOAT, [1, 99, 8, 8]))
    return proto


def compile_cli(tmp_path: Path, proto: onnx.ModelProto, capsys, *extra: str) -> tuple[int, Path, str]:
    source, output = tmp_path / "model.onnx", tmp_path / "pruned.onnx"
    onnx.save(proto, source)
    code = main(["compile", str(source), "--sparsity", "0.4", "-o", str(output), "--repeats", "2", "--round-to", "1", *extra])
    return code, output, capsys.readouterr().err


def _params(path: Path) -> int:
    """Weight elements, in initializers or Constant nodes."""
    graph = onnx.load(str(path)).graph
    constants = [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims)) for t in [*graph.initializer, *constants])


def test_paddle_style_file_compiles_valid_and_smaller(tmp_path, capsys):
    x = torch.randn(1, 3, 8, 8)
    proto = paddle_style(export_legacy(SmallCNN(), (x,)))
    assert any(n.op_type == "Constant" for n in proto.graph.node) and not proto.graph.initializer
    code, output, err = compile_cli(tmp_path, proto, capsys)
    assert code == 0, err
    onnx.checker.check_model(str(output), full_check=True)
    assert _params(output) < 0.8 * sum(p.numel() for p in SmallCNN().parameters())
    (y,) = run_onnx(output, {"input.1": x.numpy()})  # the name torch gave the input
    assert y.shape == (1, 5) and np.isfinite(y).all()


def test_weight_short_of_its_input_is_refused_in_one_line(tmp_path, capsys):
    proto = export_legacy(SmallCNN(), (torch.randn(1, 3, 8, 8),))
    second = [n for n in proto.graph.node if n.op_type == "Conv"][1]
    weight = next(t for t in proto.graph.initializer if t.name == second.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight)[:, :15], weight.name))  # 15 of 16 channels
    code, output, err = compile_cli(tmp_path, proto, capsys)
    assert code == 2 and not output.exists()
    assert err.count("\n") == 1 and f"Conv node '{second.name}'" in err
    assert "16 channels" in err and "expects 15" in err and "re-export" in err


def _groups_with_reshape_shapes(proto: onnx.ModelProto, resolve: bool = True):
    """Preparation with InferReshapeShapes on its own: without ResolveSymbolicShapes's specialised copies."""
    passes = [p for p in preparation_passes() if type(p).__name__ not in ("ResolveSymbolicShapes", "InferReshapeShapes")]
    if resolve:
        passes.insert(next(i for i, p in enumerate(passes) if isinstance(p, InferMissingShapes)) + 1, InferReshapeShapes())
    return Pipeline([*passes, BuildDependencyGroups()]).run(from_proto(proto))


def _reshape_output_and_prunable_groups(result) -> tuple[list, list[int]]:
    reshape = next(n for n in result.model.graph if n.op_type == "Reshape")
    dims = [d if isinstance(d, int) else "N" for d in reshape.outputs[0].shape]
    return dims, [g.num_units for g in result.get(DependencyGroups).groups if g.prunable]


def test_computed_flatten_target_gets_its_shape_and_the_last_conv_stays_prunable():
    """`y.view(y.size(0), -1)` with a dynamic batch: Shape -> Gather -> Concat -> Reshape, unknown to onnx."""
    proto = export_legacy(SmallCNN(view=True), (torch.randn(2, 3, 8, 8),), input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    # the head's input channels included: the last conv's 8 channels are 8 blocks of 16 flattened elements
    assert _reshape_output_and_prunable_groups(_groups_with_reshape_shapes(proto)) == (["N", 128], [16, 8])


def test_paddle_flatten_through_slice_of_shape_gets_its_shape():
    """paddle2onnx writes Flatten as Reshape(x, Concat(Slice(Shape(x), 0, 1), [-1]))."""
    proto = export_legacy(SmallCNN(), (torch.randn(2, 3, 8, 8),), input_names=["x"], dynamic_axes={"x": {0: "N"}})
    flatten = next(n for n in proto.graph.node if n.op_type == "Flatten")
    x, y = flatten.input[0], flatten.output[0]
    ints = lambda name, values: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))  # noqa: E731
    paddle = [
        helper.make_node("Shape", [x], ["p2o.shape"]), ints("p2o.zero", [0]), ints("p2o.one", [1]), ints("p2o.minus", [-1]),
        helper.make_node("Slice", ["p2o.shape", "p2o.zero", "p2o.one", "p2o.zero"], ["p2o.slice"]),
        helper.make_node("Concat", ["p2o.slice", "p2o.minus"], ["p2o.target"], axis=0),
        helper.make_node("Reshape", [x, "p2o.target"], [y]),
    ]
    nodes = list(proto.graph.node)
    at = nodes.index(flatten)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:at] + paddle + nodes[at + 1:])
    # the shape is known, and StaticReshapeTargets reads the target with the same parser: [0, -1], so the last
    # conv's channels stay prunable
    assert _reshape_output_and_prunable_groups(_groups_with_reshape_shapes(proto)) == (["N", 128], [16, 8])
    alone = _groups_with_reshape_shapes(proto, resolve=False)  # what onnx's inference alone leaves
    assert next(n for n in alone.model.graph if n.op_type == "Reshape").outputs[0].shape is None
    assert "Gemm" in [b.op for b in alone.get(DependencyGroups).barriers]


class GatedByRate(torch.nn.Module):
    """A scalar integer input compared with a constant, as silero's `sr == 16000`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 16, 5, padding=2)
        self.out = torch.nn.Conv1d(16, 2, 1)

    def forward(self, x: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.out(torch.where(sr == 16000, y, -y))


def test_scalar_integer_input_gets_its_compared_value_in_random_calibration(tmp_path, capsys):
    proto = export_legacy(GatedByRate(), (torch.randn(1, 1, 32), torch.tensor(16000)), input_names=["x", "sr"])
    assert list(proto.graph.input[1].type.tensor_type.shape.dim) == []  # rank 0
    model = from_proto(proto)
    data = CalibrationData.random(model, samples=4, batch_size=2)
    batches = [batch for batch, _ in data.batches()]
    assert len(batches) == 4 and all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in batches)
    given = CalibrationData.from_arrays(model, {"x": np.zeros((3, 1, 32), np.float32), "sr": np.int64(8000)})
    assert given.inputs["sr"].tolist() == [8000, 8000, 8000]  # one value for every sample
    code, output, err = compile_cli(tmp_path, proto, capsys, "--importance", "activation")
    assert code == 0, err
    onnx.checker.check_model(str(output), full_check=True)


def test_fp16_model_compiles_to_fp16(tmp_path, capsys):
    x = torch.randn(1, 3, 8, 8)
    proto = export_legacy(SmallCNN().half(), (x.half(),), opset=13)
    code, output, err = compile_cli(tmp_path, proto, capsys)
    assert code == 0, err
    pruned = onnx.load(str(output))
    assert {t.data_type for t in pruned.graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
    (y,) = run_onnx(output, {pruned.graph.input[0].name: x.half().numpy()})
    assert y.dtype == np.float16 and y.shape == (1, 5) and np.isfinite(y).all()


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c, self.head = torch.nn.Conv2d(16, 8, 1), torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b(torch.relu(self.a(x))))
        y = torch.cond(y.mean() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (y,))
        return self.head(self.c(y).mean((2, 3)))


def test_if_node_is_a_barrier_and_its_branches_are_untouched(tmp_path, capsys):
    program = torch.onnx.export(Branchy().eval(), (torch.randn(1, 3, 8, 8),), dynamo=True, verbose=False)
    proto = program.model_proto
    branches = [a.g.SerializeToString() for n in proto.graph.node if n.op_type == "If" for a in n.attribute]
    code, output, err = compile_cli(tmp_path, proto, capsys)
    assert code == 0, err
    pruned = onnx.load(str(output))
    assert [a.g.SerializeToString() for n in pruned.graph.node if n.op_type == "If" for a in n.attribute] == branches
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["a.weight"][0] < 16  # a's channels never reach the If: pruned
    assert shapes["b.weight"][0] == 16  # b's flow into the If's branches: frozen
    onnx.checker.check_model(pruned, full_check=True)
    (y,) = run_onnx(output, {pruned.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 8, 8), np.float32)})
    assert y.shape == (1, 4)


@pytest.mark.skipif(importlib.util.find_spec("rapidocr_onnxruntime") is None, reason="pip install rapidocr-onnxruntime")
def test_paddle_ocr_direction_classifier_from_its_wheel(tmp_path, capsys):
    """The reported crash: PP-OCR's cls model (paddle2onnx, opset 11, Constant weights, -1 batch)."""
    package = Path(importlib.util.find_spec("rapidocr_onnxruntime").origin).parent
    source = package / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    output = tmp_path / "cls.pruned.onnx"
    code = main(["compile", str(source), "--sparsity", "0.3", "-o", str(output), "--repeats", "2"])
    assert code == 0, capsys.readouterr().err
    onnx.checker.check_model(str(output), full_check=True)
    assert _params(output) < 0.8 * _params(source)


def test_integer_op_quantized_model_is_refused_naming_a_quantization_op(tmp_path, capsys):
    """onnxruntime's static quantizer in operator format writes integer ops (QLinearConv, QLinearMatMul), which
    pcc does not lift to float as it does QDQ files: the refusal names one and says to prune before quantizing."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    x = torch.randn(1, 3, 8, 8)
    float_path, quantized_path = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(export_legacy(SmallCNN(), (x,), opset=13), float_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input.1": np.random.default_rng(i).standard_normal((1, 3, 8, 8), dtype=np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    with contextlib.chdir(tmp_path):  # the quantizer leaves temporary files in the working directory
        quantize_static(str(float_path), str(quantized_path), Reader(), quant_format=QuantFormat.QOperator)
    proto = onnx.load(str(quantized_path))
    assert any(n.op_type == "QLinearConv" for n in proto.graph.node)
    code, output, err = compile_cli(tmp_path, proto, capsys)
    assert code == 2 and not output.exists() and err.count("\n") == 1
    assert "the model is quantized" in err and "QLinearConv '" in err and "prune the float model" in err

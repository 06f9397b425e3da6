"""QDQ files, made here by onnxruntime's own static quantizer (the format smart-turn-v3 ships in), are
pruned as the float model they stand for and come back quantized: nothing removed gives the input's
outputs exactly, and a pruned model equals the quantized input with the removed channels' integer weights
zeroed."""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.cli import main
from pcc.compiler.frontend import from_proto, from_torch
from pcc.compiler.pipeline import analysis_pipeline, channel_pruning_pipeline
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.analysis.quantization import FoldedQuantization
from pcc.passes.transforms.fold_quantization import _quantize
from tests.compiler.test_frontend_wild import SmallCNN, export_legacy
from tests.conftest import max_relative_difference, run_onnx
from tests.passes.test_attention_exports import HEADS, HIDDEN, _Encoder, _inputs


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _quantized(tmp_path, proto: onnx.ModelProto, batches: list[dict[str, np.ndarray]], per_channel: bool) -> onnx.ModelProto:
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(proto, source)
    with contextlib.chdir(tmp_path):  # the quantizer leaves temporary files in the working directory
        quantize_static(str(source), str(target), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8)
    return onnx.load(str(target))


def _op_counts(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node if "Quantize" in n.op_type)


def _masked(proto: onnx.ModelProto, kept: dict[tuple[str, int], np.ndarray]) -> onnx.ModelProto:
    """The quantized input with the integer weight behind each pruned float weight set to its zero point
    along every pruned axis (a removed channel then contributes nothing downstream)."""
    masked = onnx.ModelProto()
    masked.CopyFrom(proto)
    initializers = {i.name: i for i in masked.graph.initializer}
    behind = {n.output[0]: n for n in masked.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    for (name, axis), indices in kept.items():
        if name not in behind:
            continue
        node = behind[name]
        tensor = initializers[node.input[0]]
        values = numpy_helper.to_array(tensor).copy()
        zero = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.zeros(1, values.dtype)
        removed = np.setdiff1d(np.arange(values.shape[axis]), indices)
        index = [slice(None)] * values.ndim
        index[axis] = removed
        values[tuple(index)] = zero.reshape(-1)[0] if zero.size == 1 else 0
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return masked


def _prune(proto: onnx.ModelProto, sparsity: float, **options) -> tuple[onnx.ModelProto, FoldedQuantization]:
    result = channel_pruning_pipeline(sparsity, round_to=1, **options).run(from_proto(proto))
    return ir.serde.serialize_model(result.model), result.get(FoldedQuantization)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_quantized_cnn_is_pruned_and_stays_quantized(tmp_path, per_channel):
    x = torch.randn(1, 3, 8, 8)
    rng = np.random.default_rng(0)
    batches = [{"input.1": rng.standard_normal((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)]
    quantized = _quantized(tmp_path, export_legacy(SmallCNN(), (x,), opset=13), batches, per_channel)
    feeds = {"input.1": rng.standard_normal((1, 3, 8, 8), dtype=np.float32)}
    reference = run_onnx(quantized, feeds)

    same, _ = _prune(quantized, 0.0)
    assert _op_counts(same) == _op_counts(quantized)
    assert max_relative_difference(run_onnx(same, feeds), reference) == 0.0  # the same integers and scales

    pruned, folded = _prune(quantized, 0.5)
    onnx.checker.check_model(pruned, full_check=True)
    assert folded.weights and folded.activations and folded.restored == (len(folded.weights), len(folded.activations))
    assert _op_counts(pruned) == _op_counts(quantized)  # every pair and weight quantized again
    weights = [i for i in pruned.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(i.dims)) for i in weights) < 0.7 * sum(
        int(np.prod(i.dims)) for i in quantized.graph.initializer if i.data_type == onnx.TensorProto.INT8
    )
    assert max_relative_difference(run_onnx(pruned, feeds), run_onnx(_masked(quantized, folded.kept), feeds)) <= 1e-5


def test_reconstructed_weights_are_quantized_again(tmp_path):
    """Least-squares reconstruction re-fits the consumers in float; each is rounded back onto its scales."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 3, 8, 8), dtype=np.float32)
    batches = [{"input.1": images[i : i + 1]} for i in range(4)]
    quantized = _quantized(tmp_path, export_legacy(SmallCNN(), (torch.randn(1, 3, 8, 8),), opset=13), batches, True)
    model = from_proto(quantized)
    calibration = CalibrationData.from_arrays(model, {"input.1": images}, source="random images")
    result = channel_pruning_pipeline(0.5, round_to=1, calibration=calibration, reconstruct="ls").run(model)
    folded = result.get(FoldedQuantization)
    assert folded.restored == (len(folded.weights), len(folded.activations))
    pruned = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(pruned, full_check=True)
    assert _op_counts(pruned) == _op_counts(quantized)
    assert np.isfinite(run_onnx(pruned, batches[0])[0]).all()


def test_a_channel_that_outgrew_its_integer_range_gets_a_wider_scale():
    values = np.array([[1.0, -2.0], [0.5, 40.0]], dtype=np.float32)  # channel 1 (axis 0) needs 40 / 0.25 = 160 > 127
    scale = np.array([0.1, 0.25], dtype=np.float32)
    integers, used = _quantize(values, scale, np.zeros(2, np.int8), axis=0)
    assert used[0] == scale[0] and used[1] == pytest.approx(40.0 / 127)
    assert integers.tolist() == [[10, -20], [2, 127]]
    assert np.abs(integers * used[:, None] - values).max() <= used.max() / 2 + 1e-6


def test_quantized_transformer_has_its_attention_blocks_and_loses_heads(tmp_path, capsys):
    """The SDPA encoder of the attention-export tests (one layer with grouped key/value heads), quantized:
    every block is found through the Quantize/Dequantize pairs, and removing heads gives a quantized model
    equal to the input with those heads' integer weights zeroed."""
    torch.manual_seed(0)
    module = _Encoder([(False, HEADS), (True, 2)]).eval()
    float_model = from_torch(module, _inputs(), input_names=["x", "keep"], dynamic_batch=True, dynamic_sequence=True)
    x, keep = _inputs()
    feeds = {"x": x.numpy(), "keep": keep.numpy()}
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal(x.shape, dtype=np.float32), "keep": feeds["keep"]} for _ in range(4)]
    quantized = _quantized(tmp_path, ir.serde.serialize_model(float_model), batches, per_channel=True)

    blocks = analysis_pipeline().run(from_proto(quantized)).get(AttentionBlocks).blocks
    assert [(b.heads, b.kv_heads) for b in blocks] == [(HEADS, HEADS), (HEADS, 2)]

    pruned, folded = _prune(quantized, 0.5, prune=("heads",))
    onnx.checker.check_model(pruned, full_check=True)
    weights, pairs = folded.restored
    assert weights == len(folded.weights)
    # the key's transpose chain is rewritten to a head-major layout (CanonicalAttentionLayout): the pairs on
    # its old tensors have nowhere to go back to, and those few activations stay float
    assert pairs >= 0.9 * len(folded.activations)
    assert _op_counts(pruned)["DequantizeLinear"] >= 0.9 * _op_counts(quantized)["DequantizeLinear"]
    assert any(axis_kept.size < HIDDEN for axis_kept in folded.kept.values())
    assert max_relative_difference(run_onnx(pruned, feeds), run_onnx(_masked(quantized, folded.kept), feeds)) <= 1e-5
    longer = {"x": rng.standard_normal((3, 11, x.shape[-1]), dtype=np.float32), "keep": np.ones((3, 11), np.float32)}
    assert np.isfinite(run_onnx(pruned, longer)[0]).all()  # still runs at another batch size and length

    source, output = tmp_path / "int8.onnx", tmp_path / "pruned.onnx"
    onnx.save(quantized, source)
    assert main(["compile", str(source), "--sparsity", "0.5", "--prune", "heads", "--round-to", "1", "-o", str(output),
                 "--repeats", "2"]) == 0, capsys.readouterr().err


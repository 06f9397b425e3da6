"""SparsifyWeights: the patterns' shapes, the allocators' split, layers a pattern does not fit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import from_torch
from pcc.passes.transforms.sparsify_weights import SparsityPattern, SparsifyWeights, sparse_weight_layers


def _mlp(sizes=(48, 64, 40, 10)) -> ir.Model:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return from_torch(torch.nn.Sequential(*layers[:-1]), (torch.randn(4, sizes[0]),))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _matrices(model: ir.Model) -> list[np.ndarray]:
    return [layer.matrix() for layer in sparse_weight_layers(model)]


def test_patterns_parse_and_bad_ones_are_refused():
    assert SparsityPattern.parse("block:16x1") == SparsityPattern("block", rows=16, cols=1)
    assert SparsityPattern.parse("nm:2:4") == SparsityPattern("nm", n=2, m=4)
    for bad in ("block:0x4", "nm:4:4", "nm:2", "diagonal"):
        with pytest.raises(InvalidRequestError):
            SparsityPattern.parse(bad)


def test_uniform_unstructured_zeroes_each_layer_by_magnitude_and_the_model_runs():
    model = _mlp()
    before = _matrices(model)
    SparsifyWeights("unstructured", 0.7, "uniform")(model)
    x = np.random.default_rng(0).standard_normal((4, 48)).astype(np.float32)
    assert np.isfinite(_run(model, x)).all()
    for dense, sparse in zip(before, _matrices(model)):
        assert (sparse == 0).mean() == pytest.approx(0.7, abs=0.01)
        kept = np.abs(dense[sparse != 0])
        assert kept.min() >= np.abs(dense[sparse == 0]).max()  # the smallest magnitudes went


def test_blocks_go_whole_including_partial_edge_blocks():
    model = _mlp((48, 64, 40, 10))  # 10 and 40 outputs are not multiples of 16
    SparsifyWeights("block:16x1", 0.8, "uniform")(model)
    for matrix in _matrices(model):
        rows = -(-matrix.shape[0] // 16) * 16
        padded = np.zeros((rows, matrix.shape[1]))
        padded[: matrix.shape[0]] = matrix
        blocks = padded.reshape(rows // 16, 16, -1)
        zero_blocks = (blocks == 0).all(axis=1)
        nonzero_blocks = (blocks != 0).any(axis=1)
        assert (zero_blocks | nonzero_blocks).all() and zero_blocks.mean() > 0.7
        assert (matrix == 0).mean() == pytest.approx(0.8, abs=0.05)


def test_nm_keeps_n_of_every_m_and_reports_layers_it_does_not_fit():
    model = _mlp((48, 64, 42, 10))  # the last layer's reduction axis (42) is not a multiple of 4
    before = _matrices(model)
    prune = SparsifyWeights("nm:2:4")
    prune(model)
    after = _matrices(model)
    for matrix in after[:2]:
        assert ((matrix.reshape(matrix.shape[0], -1, 4) != 0).sum(axis=2) == 2).all()
    np.testing.assert_array_equal(after[2], before[2])
    skipped = [layer for layer in prune.report.layers if layer.skipped]
    assert len(skipped) == 1 and "42 is not a multiple of M=4" in skipped[0].skipped
    assert "left dense" in prune.report.summary()


@pytest.mark.parametrize("allocator", ["global", "lamp"])
def test_global_allocators_meet_the_total_and_differ_per_layer(allocator):
    model = _mlp()
    with torch.no_grad():  # make one layer's weights much smaller: a global ranking takes more from it
        layer = sparse_weight_layers(model)[1]
        layer.write(layer.matrix() * 0.1)
    prune = SparsifyWeights("block:4x4", 0.6, allocator)
    prune(model)
    assert prune.report.achieved == pytest.approx(0.6, abs=0.02)
    per_layer = [layer.sparsity for layer in prune.report.layers]
    assert max(per_layer) - min(per_layer) > 0.1
    if allocator == "global":
        assert per_layer[1] == max(per_layer)


def test_sparsity_zero_leaves_the_model_as_it_was():
    model = _mlp()
    x = np.random.default_rng(1).standard_normal((4, 48)).astype(np.float32)
    expected = _run(model, x)
    SparsifyWeights("block:16x1", 0.0)(model)
    np.testing.assert_array_equal(_run(model, x), expected)


def test_channel_allocators_are_refused():
    with pytest.raises(InvalidRequestError, match="does not apply to --sparsify"):
        SparsifyWeights("unstructured", 0.5, "dp")(_mlp())


def test_batchnorm_is_re_estimated_after_the_weights_are_zeroed(zoo_cache):
    """Zeroed conv weights shift every BatchNorm's input statistics; re-estimating them before sparsifying
    (as the pipeline once did) left stale statistics that collapsed a trained CNN to chance."""
    from pcc.compiler.calibration import CalibrationData
    from pcc.compiler.pipeline import channel_pruning_pipeline
    from pcc.passes.transforms.recalibrate_batchnorm import RecalibrateBatchNorm

    model = zoo_cache.model("resnet_basic")
    images = np.random.default_rng(0).standard_normal((8, *zoo_cache.example_input("resnet_basic").shape[1:]))
    calibration = CalibrationData.from_arrays(model, {"x": images.astype(np.float32)})
    pipeline = channel_pruning_pipeline(0.5, sparsify="unstructured", calibration=calibration, recalibrate_bn=True)
    assert pipeline.index(SparsifyWeights) < pipeline.index(RecalibrateBatchNorm)

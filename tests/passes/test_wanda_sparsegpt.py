"""Wanda and SparseGPT in SparsifyWeights, on a tiny random Llama exported as pcc imports LLMs.

Masks have exactly the requested pattern (per-row 50% for Wanda, 50% per column block for SparseGPT, N:M),
the head that writes the logits stays dense, Wanda's mask is |W|·‖X‖ per output row with the norms of the
layer's real inputs (read with a torch hook), and SparseGPT's update leaves a lower layer output error and
a lower logits error than magnitude pruning at the same sparsity on the same calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.compiler.test_llm import VOCAB, tiny_import, tiny_llama, torch_logits  # noqa: E402
from tests.conftest import run_onnx  # noqa: E402

from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.errors import InvalidRequestError  # noqa: E402
from pcc.passes.transforms.sparsify_weights import SparsifyWeights, sparse_weight_layers  # noqa: E402

Q_PROJ = "model.layers.0.self_attn.q_proj.weight.T"


@pytest.fixture(scope="module")
def exported():
    return tiny_llama(), tiny_import()[1]


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(3).integers(0, VOCAB, (16, 32)).astype(np.int64)


def _sparsify(exported, windows, pattern, criterion, sparsity=0.5) -> tuple[ir.Model, SparsifyWeights]:
    model = ir.serde.deserialize_model(exported[1])
    calibration = CalibrationData.from_arrays(model, {"input_ids": windows}, batch_size=8)
    sparsify = SparsifyWeights(pattern, sparsity, criterion=criterion, calibration=calibration, exclude_outputs=True)
    sparsify(model)
    return model, sparsify


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {layer.weight.name: layer.matrix() for layer in sparse_weight_layers(model)}


def _q_proj_hessian(llama, windows) -> np.ndarray:
    """Σ x xᵀ of the first q_proj's inputs, read from the torch model."""
    seen = []
    hook = llama.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    torch_logits(llama, windows)
    hook.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    return (x.T @ x).numpy()


def _layer_error(dense: np.ndarray, sparse: np.ndarray, hessian: np.ndarray) -> float:
    delta = dense - sparse
    return float(np.trace(delta @ hessian @ delta.T) / np.trace(dense @ hessian @ dense.T))


def _logits_error(model: ir.Model, llama, windows) -> float:
    dense = torch_logits(llama, windows)
    return float(np.square(run_onnx(model, {"input_ids": windows})[0] - dense).sum() / np.square(dense).sum())


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_unstructured_half_exactly_and_the_head_stays_dense(exported, windows, criterion):
    model, sparsify = _sparsify(exported, windows, "unstructured", criterion)
    layers = {layer.node: layer for layer in sparsify.report.layers}
    head = [layer for layer in layers.values() if layer.skipped]
    assert len(head) == 1 and head[0].sparsity == 0 and head[0].shape == (VOCAB, 64)
    sparse = [layer for layer in layers.values() if not layer.skipped]
    assert len(sparse) == 14 and all(layer.sparsity == 0.5 for layer in sparse)
    if criterion == "wanda":  # compared within each output row
        for name, matrix in _weights(model).items():
            if name != head[0].weight:
                assert ((matrix == 0).sum(axis=1) == matrix.shape[1] // 2).all()
    assert np.isfinite(run_onnx(model, {"input_ids": windows[:2]})[0]).all()


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_pattern_in_every_group(exported, windows, criterion, n, m):
    model, sparsify = _sparsify(exported, windows, f"nm:{n}:{m}", criterion)
    for layer in sparsify.report.layers:
        if layer.skipped:
            continue
        matrix = _weights(model)[layer.weight]
        groups = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(axis=2)
        assert (groups == n).all(), layer.node


def test_wanda_mask_is_weight_times_input_norm_per_row(exported, windows):
    llama = exported[0]
    dense = _weights(ir.serde.deserialize_model(exported[1]))[Q_PROJ]
    norms = np.sqrt(np.diagonal(_q_proj_hessian(llama, windows)))
    scores = np.abs(dense) * norms[None, :]
    expected = np.ones_like(dense, dtype=bool)
    np.put_along_axis(expected, np.argsort(scores, axis=1)[:, : dense.shape[1] // 2], False, axis=1)
    model, _ = _sparsify(exported, windows, "unstructured", "wanda")
    got = _weights(model)[Q_PROJ]
    np.testing.assert_array_equal(got != 0, expected)
    np.testing.assert_array_equal(got[expected], dense[expected])  # Wanda only masks: kept weights unchanged


def test_sparsegpt_beats_magnitude_on_layer_and_logits_error(exported, windows):
    llama = exported[0]
    dense = _weights(ir.serde.deserialize_model(exported[1]))[Q_PROJ]
    hessian = _q_proj_hessian(llama, windows)
    obs, sparsify = _sparsify(exported, windows, "unstructured", "sparsegpt")
    magnitude, _ = _sparsify(exported, windows, "unstructured", "l2")
    obs_error = _layer_error(dense, _weights(obs)[Q_PROJ], hessian)
    magnitude_error = _layer_error(dense, _weights(magnitude)[Q_PROJ], hessian)
    assert obs_error < 0.8 * magnitude_error
    reported = next(layer.error for layer in sparsify.report.layers if layer.weight == Q_PROJ)
    assert reported == pytest.approx(obs_error, rel=1e-3)  # the report's error is the layer's real one
    assert _logits_error(obs, llama, windows) < _logits_error(magnitude, llama, windows)


def test_calibrated_criteria_refuse_what_they_cannot_do(exported, windows):
    model = ir.serde.deserialize_model(exported[1])
    with pytest.raises(InvalidRequestError, match="--calib"):
        SparsifyWeights("unstructured", 0.5, criterion="wanda")(model)
    calibration = CalibrationData.from_arrays(model, {"input_ids": windows})
    with pytest.raises(InvalidRequestError, match="allocator"):
        SparsifyWeights("unstructured", 0.5, "global", criterion="sparsegpt", calibration=calibration)(model)
    with pytest.raises(InvalidRequestError, match="block"):
        SparsifyWeights("block:4x4", 0.5, criterion="wanda", calibration=calibration)(model)
    with pytest.raises(InvalidRequestError, match="taylor"):
        SparsifyWeights("unstructured", 0.5, criterion="taylor")(model)


def test_only_the_selected_layers(exported, windows):
    model = ir.serde.deserialize_model(exported[1])
    sparsify = SparsifyWeights("nm:2:4", criterion="wanda", only=(Q_PROJ,),
                               calibration=CalibrationData.from_arrays(model, {"input_ids": windows}))
    sparsify(model)
    zeroed = {layer.weight: layer.sparsity for layer in sparsify.report.layers}
    assert zeroed.pop(Q_PROJ) == 0.5 and set(zeroed.values()) == {0.0}

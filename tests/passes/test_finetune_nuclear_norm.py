"""FineTune's `nuclear_norm` (TRP's regulariser): it lowers the weights' nuclear norms and concentrates their
spectra, so a later truncation keeps more of each weight's energy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from pcc.backends.onnx.runtime import classify
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import load_onnx
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.transforms import FineTune, FineTuneReport
from pcc.passes.transforms.factorize_lowrank import decompose, factorizable_layers

CNN = Path(__file__).resolve().parents[2] / "examples" / "models" / "fashion_cnn.onnx"  # trained, 91.2% top-1


@pytest.fixture(scope="module")
def cnn_and_data() -> tuple[ir.Model, CalibrationData]:
    model = load_onnx(CNN)
    Pipeline(preparation_passes()).run(model)
    images = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    unlabelled = CalibrationData.from_arrays(model, {"image": images})
    labels = classify(ir.serde.serialize_model(model).SerializeToString(), unlabelled)  # the model's own answers
    return model, CalibrationData.from_arrays(model, {"image": images}, labels=labels.astype(np.int64))


def _spectra(model: ir.Model) -> dict[str, np.ndarray]:
    matrices = {name: model.graph.initializers[name].const_value.numpy() for name in (l.weight for l in factorizable_layers(model))}
    return {name: decompose(m.reshape(m.shape[0], -1)).singular for name, m in matrices.items()}


def test_the_regulariser_lowers_nuclear_norms_and_concentrates_energy(cnn_and_data):
    model, data = cnn_and_data
    spectra = {}
    for strength in (0.0, 0.01):
        tuned = model.clone()
        result = Pipeline([FineTune(data, lr=3e-3, nuclear_norm=strength)]).run(tuned)
        spectra[strength] = _spectra(tuned)
    assert result.get(FineTuneReport).loss == "cross-entropy + 0.01 x nuclear norm"
    nuclear = {s: sum(v.sum() for v in spectra[s].values()) for s in spectra}
    assert nuclear[0.01] < 0.97 * nuclear[0.0]

    def top_quarter_energy(values: np.ndarray) -> float:
        return float((values[: max(1, len(values) // 4)] ** 2).sum() / (values**2).sum())

    for name in spectra[0.0]:
        assert top_quarter_energy(spectra[0.01][name]) > top_quarter_energy(spectra[0.0][name])


def test_a_negative_strength_is_refused(cnn_and_data):
    model, data = cnn_and_data
    with pytest.raises(InvalidRequestError, match="nuclear-norm"):
        FineTune(data, nuclear_norm=-1.0).requires(model)

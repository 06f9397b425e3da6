"""FineTune's pruning schedules: the cubic ramp and IMP's per-round sparsity, GMP ending at exactly the
target, N:M reached gradually, IMP rewinding survivors to the values it stored."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import from_torch
from pcc.compiler.pipeline import Pipeline
from pcc.passes.transforms import FineTune, FineTuneReport
from pcc.passes.transforms.schedules import WeightRewind, cubic_sparsity, round_sparsity
from pcc.passes.transforms.sparsify_weights import sparse_weight_layers

WEIGHTS = {"0.weight": 8 * 9, "2.weight": 12 * 72, "6.weight": 4 * 12}  # Conv, Conv, Gemm: elements


@pytest.fixture(scope="module")
def exported() -> bytes:
    """Conv-ReLU x2, global pool, Linear (a Gemm), exported once."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 4),
    )
    model = from_torch(net, (torch.randn(2, 1, 12, 12),), dynamic_batch=True)
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.fixture
def cnn(exported) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(exported))


def stripe_data(model: ir.Model, samples: int = 128) -> CalibrationData:
    """Noisy stripes or checkerboards labelled by which (a task the CNN can learn)."""
    rng = np.random.default_rng(1)
    rows, cols = np.indices((12, 12))
    templates = np.stack([(rows % 2) * 2 - 1, (cols % 2) * 2 - 1, ((rows + cols) % 2) * 2 - 1, np.zeros((12, 12))])
    labels = rng.integers(0, 4, samples)
    images = (templates[labels] + rng.normal(size=(samples, 12, 12)))[:, None].astype(np.float32)
    return CalibrationData.from_arrays(model, {model.graph.inputs[0].name: images}, labels=labels, batch_size=16)


def sparse_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {layer.weight.name: layer.weight.const_value.numpy().copy() for layer in sparse_weight_layers(model)}


def _tune(model: ir.Model, **options) -> FineTuneReport:
    return Pipeline([FineTune(stripe_data(model), lr=1e-2, **options)]).run(model).get(FineTuneReport)


def test_cubic_ramp_and_round_sparsities():
    assert [cubic_sparsity(t, 8, 0.9) for t in (0, 2, 4, 8, 12)] == pytest.approx(
        [0.0, 0.9 * (1 - 0.75**3), 0.9 * (1 - 0.5**3), 0.9, 0.9]
    )
    assert [round_sparsity(r, 3, 0.875) for r in (1, 2, 3)] == pytest.approx([0.5, 0.75, 0.875])


def test_gmp_follows_the_ramp_and_ends_at_exactly_the_target(cnn):
    """8 steps a run x 2 epochs = 16 steps, ramp 0.75 -> 12 steps, masks every 3: sparsity 0 before step 3,
    then SparsifyWeights' per-layer floor of s_t at steps 3, 6, 9, and exactly 0.8 from step 12 on."""
    report = _tune(cnn, schedule="gmp", sparsity=0.8, epochs=2, prune_every=3)
    assert report.steps == 16 and report.schedule == "gmp to 80.0% unstructured"

    def uniform(s: float) -> float:  # what the uniform allocator zeroes at s: floor(s * n) per layer
        return sum(math.floor(s * n + 1e-9) for n in WEIGHTS.values()) / sum(WEIGHTS.values())

    expected = [0.0, 0.0] + [uniform(cubic_sparsity(3 * (1 + i // 3), 12, 0.8)) for i in range(9)] + [uniform(0.8)] * 5
    assert report.sparsities == pytest.approx(expected, abs=1e-9)
    for name, weight in sparse_weights(cnn).items():
        assert int((weight == 0).sum()) == math.floor(0.8 * WEIGHTS[name] + 1e-9), name
    assert report.sparsity == pytest.approx(uniform(0.8))


def test_gmp_walks_nm_down_to_its_pattern(cnn):
    """nm:2:4 ramps through nm:3:4 to nm:2:4; the first conv (reduction 9) is left dense."""
    report = _tune(cnn, schedule="gmp", sparsify="nm:2:4", epochs=2, prune_every=2)
    weights = sparse_weights(cnn)
    assert (weights["0.weight"] != 0).all()
    for name in ("2.weight", "6.weight"):
        groups = (weights[name].reshape(weights[name].shape[0], -1) != 0).reshape(weights[name].shape[0], -1, 4)
        assert (groups.sum(axis=2) == 2).all(), name
    levels = sorted(set(report.sparsities))
    both = WEIGHTS["2.weight"] + WEIGHTS["6.weight"]
    assert levels == pytest.approx([0.0, 0.25 * both / sum(WEIGHTS.values()), 0.5 * both / sum(WEIGHTS.values())])


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_imp_rewinds_the_survivors_to_the_stored_values(cnn, monkeypatch, rewind_step):
    initial = sparse_weights(cnn)
    restored = []
    original = WeightRewind.restore

    def spy(self, student, masks, shuffle=None):
        original(self, student, masks, shuffle)
        after = {name: student.weight(name).detach().numpy().copy() for name in WEIGHTS}
        restored.append(({name: self.values[name].numpy().copy() for name in WEIGHTS}, after))

    monkeypatch.setattr(WeightRewind, "restore", spy)
    report = _tune(cnn, schedule="imp", sparsity=0.75, rounds=2, rewind_step=rewind_step)
    assert len(restored) == 2 and report.steps == 3 * 8 and report.epochs == 3
    for index, (stored, after) in enumerate(restored, start=1):
        for name, value in after.items():
            kept = value != 0
            assert (value[kept] == stored[name][kept]).all()  # survivors are exactly the stored values
            assert int((~kept).sum()) == math.floor(round_sparsity(index, 2, 0.75) * WEIGHTS[name] + 1e-9)
            # the stored values are the start (rewind 0) or the weights after 3 steps (rewind 3)
            assert np.array_equal(stored[name], initial[name]) == (rewind_step == 0)
    assert restored[0][0]["2.weight"].tobytes() == restored[1][0]["2.weight"].tobytes()  # one snapshot, used each round
    final = sparse_weights(cnn)
    for name, weight in final.items():
        assert int((weight == 0).sum()) == math.floor(0.75 * WEIGHTS[name] + 1e-9)
    assert report.sparsities[8] > 0 and report.sparsities[-1] == pytest.approx(report.sparsity)


def test_oneshot_prunes_before_training_and_keeps_the_mask(cnn):
    report = _tune(cnn, sparsity=0.5)
    assert report.sparsities == pytest.approx([report.sparsity] * report.steps)
    for name, weight in sparse_weights(cnn).items():
        assert int((weight == 0).sum()) == math.floor(0.5 * WEIGHTS[name])


def test_schedule_requests_that_cannot_apply_are_refused(cnn):
    with pytest.raises(InvalidRequestError, match="--sparsity"):
        _tune(cnn, schedule="gmp")
    with pytest.raises(InvalidRequestError, match="--params all"):
        _tune(cnn, schedule="imp", sparsity=0.5, params="lora")
    with pytest.raises(InvalidRequestError, match="--rewind-step"):
        _tune(cnn, schedule="imp", sparsity=0.5, rewind_step=100)
    with pytest.raises(InvalidRequestError, match="--schedule"):
        _tune(cnn, schedule="cosine", sparsity=0.5)

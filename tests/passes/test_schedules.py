"""The lottery-ticket controls and GMP's BatchNorm re-estimation: random masks keep magnitude's pattern and
per-layer amounts, a shuffled rewind is a permutation of the stored values, IMP with `reinit` ends on the same
mask as the winning ticket from other values, and after GMP's last mask update BatchNorm holds the statistics
of the pruned weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import from_torch
from pcc.compiler.pipeline import Pipeline
from pcc.compiler.torch_module import IRModule
from pcc.passes.transforms import FineTune, FoldConstants
from pcc.passes.transforms.recalibrate_batchnorm import reestimate_batchnorm_statistics
from pcc.passes.transforms.schedules import MagnitudeMasks, WeightRewind
from tests.passes.test_finetune_schedules import sparse_weights, stripe_data


@pytest.fixture(scope="module")
def exported() -> bytes:
    """Conv-BN-ReLU x2, global pool, Linear, exported with its BatchNormalization nodes kept (BN statistics
    randomised, as a trained network's are)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4),
    )
    for norm in (net[1], net[4]):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    model = from_torch(net.eval(), (torch.randn(2, 1, 12, 12),), dynamic_batch=True, optimize=False)
    FoldConstants()(model)  # the unoptimised export's Constant nodes become initializers
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.fixture
def cnn(exported) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(exported))


def _statistics(model: ir.Model) -> dict[str, np.ndarray]:
    return {v.name: v.const_value.numpy().copy() for node in model.graph if node.op_type == "BatchNormalization" for v in node.inputs[3:5]}


@pytest.mark.parametrize("pattern", ["unstructured", "block:4x1"])
def test_random_masks_have_magnitudes_pattern_and_amounts(cnn, pattern):
    student = IRModule(cnn)
    magnitude = MagnitudeMasks(cnn, pattern).compute(student, 0.5)
    random = MagnitudeMasks(cnn, pattern, score="random", seed=3).compute(student, 0.5)
    again = MagnitudeMasks(cnn, pattern, score="random", seed=3).compute(student, 0.5)
    assert set(random) == set(magnitude) == set(sparse_weights(cnn))
    for name, mask in random.items():
        assert int(mask.sum()) == int(magnitude[name].sum()), name  # the same amount per layer
        assert torch.equal(mask, again[name])  # seeded
        overlap = float((mask * magnitude[name]).sum() / magnitude[name].sum())
        assert overlap < 0.8, name  # not magnitude's choice (chance overlap is about 0.5)
        if pattern == "block:4x1":  # whole 4-row blocks
            rows = mask.reshape(mask.shape[0], -1)
            assert torch.equal(rows, rows[::4].repeat_interleave(4, 0)[: rows.shape[0]]), name


def test_random_masks_only_grow(cnn):
    student = IRModule(cnn)
    masks = MagnitudeMasks(cnn, score="random", seed=0)
    first = masks.compute(student, 0.4)
    with torch.no_grad():
        for name, mask in first.items():
            student.weight(name).mul_(mask)
    second = masks.compute(student, 0.7)
    for name in first:
        assert bool((second[name] <= first[name]).all()), name  # what was zero stays pruned


def test_shuffled_rewind_is_a_permutation_of_the_stored_values(cnn):
    student = IRModule(cnn)
    names = set(sparse_weights(cnn))
    rewind = WeightRewind()
    rewind.capture(student, names)
    masks = MagnitudeMasks(cnn).compute(student, 0.5)
    rewind.restore(student, masks, torch.Generator().manual_seed(0))
    for name in names:
        stored, now = rewind.values[name], student.weight(name).detach()
        kept = masks[name].bool()
        assert bool((now[~kept] == 0).all())
        assert float((now[kept] == stored[kept]).float().mean()) < 0.2, name  # the pairing with positions is gone
    # unmasked, the values are exactly the stored ones in another order
    rewind.restore(student, {}, torch.Generator().manual_seed(1))
    for name in names:
        assert torch.equal(student.weight(name).detach().flatten().sort().values, rewind.values[name].flatten().sort().values)


def test_imp_reinit_trains_the_tickets_mask_from_other_values(cnn, exported):
    ticket = ir.serde.deserialize_model(onnx.load_from_string(exported))
    options = {"schedule": "imp", "sparsity": 0.75, "rounds": 2, "lr": 1e-2}
    FineTune(stripe_data(ticket, samples=96), **options)(ticket)
    FineTune(stripe_data(cnn, samples=96), reinit=True, **options)(cnn)
    winning, control = sparse_weights(ticket), sparse_weights(cnn)
    for name in winning:
        np.testing.assert_array_equal(winning[name] == 0, control[name] == 0)  # the same mask
        assert np.mean(np.isclose(winning[name], control[name])[winning[name] != 0]) < 0.1, name  # trained from other values
    with pytest.raises(InvalidRequestError, match="schedule imp"):
        Pipeline([FineTune(stripe_data(cnn, samples=96), schedule="gmp", sparsity=0.5, reinit=True)]).run(cnn)
    with pytest.raises(InvalidRequestError, match="magnitude or random"):
        Pipeline([FineTune(stripe_data(cnn, samples=96), schedule="gmp", sparsity=0.5, score="taylor")]).run(cnn)


def test_gmp_reestimates_batchnorm_after_each_mask_update(cnn, exported):
    """With the ramp ending on the last step, the written statistics are those of the final pruned weights
    on the first `recalibrate_batches` batches; with 0 batches they stay the exported ones."""
    data = stripe_data(cnn, samples=96)
    FineTune(data, schedule="gmp", sparsity=0.8, ramp=1.0, prune_every=2, recalibrate_batches=3)(cnn)
    written = _statistics(cnn)
    expected = ir.serde.deserialize_model(onnx.load_from_string(ir.serde.serialize_model(cnn).SerializeToString()))
    reestimate_batchnorm_statistics(expected, [feeds for feeds, _ in list(data.batches())[:3]])
    for name, value in _statistics(expected).items():
        np.testing.assert_allclose(written[name], value, rtol=1e-5, atol=1e-6)
    frozen = ir.serde.deserialize_model(onnx.load_from_string(exported))
    exported_statistics = _statistics(frozen)
    FineTune(stripe_data(frozen, samples=96), schedule="gmp", sparsity=0.8, recalibrate_batches=0)(frozen)
    for name, value in _statistics(frozen).items():
        np.testing.assert_array_equal(value, exported_statistics[name])
    assert any(not np.allclose(written[name], exported_statistics[name]) for name in written)

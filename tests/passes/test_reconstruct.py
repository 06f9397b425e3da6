"""Reconstruction after pruning: least squares and bias compensation against the dense model, SparseGPT's update."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from pcc.compiler import from_torch
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, channel_pruning_pipeline, preparation_passes
from pcc.compiler.torch_module import IRModule
from pcc.passes.allocation.allocation import Allocation
from pcc.passes.analysis.cost import MeasureCost
from pcc.passes.analysis.dense_reference import KeepDenseReference, RecordKeptChannels
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups, DependencyGroups
from pcc.passes.transforms import PruneChannels
from pcc.passes.transforms.reconstruct import Reconstruct, ReconstructionReport
from pcc.passes.transforms.sparsegpt import sparsegpt_prune, sparsegpt_update
from pcc.passes.transforms.sparsify_weights import SparsifyWeights
from tests.conftest import run_onnx


def _bars(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """12x12 noisy images of a short bar, horizontal, vertical or on either diagonal (the class), anywhere."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, count)
    images = 0.3 * rng.standard_normal((count, 1, 12, 12))
    steps = np.array([(0, 1), (1, 0), (1, 1), (1, -1)])
    centres = rng.integers(3, 9, (count, 2))
    for t in range(-3, 4):
        rows, cols = (centres + t * steps[labels]).T
        images[np.arange(count), 0, rows, cols] += 1.0
    return images.astype(np.float32), labels


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32))
        self.classifier = nn.Linear(32, 4)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def trained_cnn() -> onnx.ModelProto:
    """A Conv-BN CNN trained on the bars (test top-1 printed by the assertion), exported with BN folded."""
    torch.manual_seed(0)
    module = _SmallCNN()
    images, labels = _bars(4096, seed=1)
    optimiser = torch.optim.Adam(module.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread only waits, and on a busy machine spins
    try:
        for step in range(150):
            batch = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
            loss = nn.functional.cross_entropy(module(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    module.eval()
    test, test_labels = _bars(512, seed=2)
    with torch.no_grad():
        accuracy = float((module(torch.from_numpy(test)).argmax(1).numpy() == test_labels).mean())
    assert accuracy > 0.9, f"the CNN did not learn the bars: {accuracy:.3f}"
    model = from_torch(module, (x[:2],), dynamic_batch=True)
    assert not any(node.op_type == "BatchNormalization" for node in model.graph)  # the exporter folded BN
    return ir.serde.serialize_model(model)


def _with_reconstruction(pipeline: Pipeline, calibration: CalibrationData, mode: str | None) -> Pipeline:
    """The wiring `pcc compile --reconstruct` uses: a dense reference after preparation, the kept channels
    noted before PruneChannels, the re-fit after it (after SparsifyWeights when weights are sparsified)."""
    pipeline.insert(pipeline.index(MeasureCost) + 1, KeepDenseReference())
    if not any(isinstance(p, RecordKeptChannels) for p in pipeline):  # compile_pipeline places it itself
        pipeline.insert(pipeline.index(PruneChannels), RecordKeptChannels())
    if mode is not None:
        last = max(i for i, p in enumerate(pipeline) if isinstance(p, (PruneChannels, SparsifyWeights)))
        pipeline.insert(last + 1, Reconstruct(calibration, mode=mode))
    return pipeline


def _outputs(model: ir.Model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return IRModule(model)({model.graph.inputs[0].name: x})[0].numpy()


def _relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(((y - reference) ** 2).sum() / (reference**2).sum())


def _prune_cnn(proto: onnx.ModelProto, mode: str | None, sparsity: float = 0.5, **options):
    model = ir.serde.deserialize_model(proto)
    images, _ = _bars(256, seed=3)
    calibration = CalibrationData.from_arrays(model, {model.graph.inputs[0].name: images}, batch_size=64)
    pipeline = _with_reconstruction(channel_pruning_pipeline(sparsity, calibration=calibration, **options), calibration, mode)
    return pipeline.run(model)


def test_least_squares_repairs_a_bn_folded_cnn_pruned_by_half(trained_cnn):
    """Half the parameters removed from a trained CNN whose BatchNorm was folded (so there are no
    statistics to re-estimate): on held-out inputs, least squares takes the output error vs the dense model
    down many times, bias compensation part of the way, and every layer's error on the calibration data
    only falls."""
    test, test_labels = _bars(512, seed=2)
    dense = _outputs(ir.serde.deserialize_model(trained_cnn), test)
    errors, accuracy = {}, {}
    for mode in (None, "bias", "ls"):
        result = _prune_cnn(trained_cnn, mode)
        pruned = _outputs(result.model, test)
        errors[mode] = _relative_error(pruned, dense)
        accuracy[mode] = float((pruned.argmax(1) == test_labels).mean())
        report = result.get(ReconstructionReport)
        if mode is None:
            assert report is None
            continue
        refitted = [fit.node for fit in report.layers]
        assert len(refitted) == 3  # the second and third convs and the classifier lost inputs; the first did not
        assert all(fit.error_after <= fit.error_before for fit in report.layers), report.table()
        assert report.summary().startswith(f"{mode}: ")
    assert errors["ls"] < errors[None] / 10, errors
    assert errors["bias"] < errors[None], errors
    assert accuracy["ls"] >= accuracy[None], accuracy


def test_fits_that_make_the_output_worse_together_are_undone(trained_cnn, monkeypatch):
    """Each fit is kept only where it lowers its own layer's error; the whole model's output is checked
    too, and where the fits together move it away from the dense output they are all undone."""
    import pcc.passes.transforms.reconstruct as reconstruct_module

    test, _ = _bars(64, seed=2)
    helped = _prune_cnn(trained_cnn, "ls").get(ReconstructionReport)
    before, after = helped.output_distortion
    assert after < before and not helped.reverted  # on this CNN least squares helps the output (measured)

    unfitted = _outputs(_prune_cnn(trained_cnn, None).model, test)
    monkeypatch.setattr(reconstruct_module, "_output_distortions", lambda *args: (1.0, 2.0))
    result = _prune_cnn(trained_cnn, "ls")
    report = result.get(ReconstructionReport)
    assert report.reverted and "undone" in report.summary()
    np.testing.assert_allclose(_outputs(result.model, test), unfitted, rtol=1e-5, atol=1e-6)


def test_nothing_removed_leaves_the_model_as_it_was(trained_cnn):
    test, _ = _bars(64, seed=2)
    dense = _outputs(ir.serde.deserialize_model(trained_cnn), test)
    result = _prune_cnn(trained_cnn, "ls", sparsity=0.0)
    assert result.get(ReconstructionReport).layers == []
    assert np.abs(_outputs(result.model, test) - dense).max() <= 1e-5


class _ConstantChannels(nn.Module):
    """conv1's channels 4-7 have zero weights and a positive bias: after the ReLU they are constants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 6, 3)  # no padding: a removed constant adds the same amount everywhere
        self.head = nn.Linear(6 * 4 * 4, 5)
        with torch.no_grad():
            self.conv1.weight[4:] = 0.0
            self.conv1.bias[4:] = torch.tensor([0.5, 1.0, 1.5, 2.0])

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(y.flatten(1))


def test_bias_compensation_is_exact_when_the_removed_channels_are_constant():
    model = from_torch(_ConstantChannels(), (torch.randn(2, 3, 8, 8),), dynamic_batch=True)
    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    dense = _outputs(model, x)
    calibration = CalibrationData.from_arrays(model, {model.graph.inputs[0].name: x})
    Pipeline([*preparation_passes(), KeepDenseReference(), BuildDependencyGroups()]).run(model)
    groups = model.meta[DependencyGroups.META_KEY]
    conv1 = next(n for n in model.graph if n.name.endswith("conv2d")).inputs[1].name
    units = groups.space_units[groups.space_id(conv1, 0)]
    removed = np.zeros(groups.num_units, dtype=bool)
    removed[units[4:]] = True
    keep = np.array([g.num_units - int(removed[g.units].sum()) for g in groups.groups])
    model.meta[Allocation.META_KEY] = Allocation("by hand", "params", 0.0, removed, keep, 1.0, 1.0, 1.0)

    Pipeline([RecordKeptChannels(), PruneChannels()]).run(model)
    uncompensated = _outputs(model, x)
    result = Pipeline([Reconstruct(calibration, mode="bias")]).run(model)
    [fit] = result.get(ReconstructionReport).layers
    assert fit.op_type == "Conv" and fit.error_after <= 1e-10 < fit.error_before
    assert _relative_error(uncompensated, dense) > 1e-2
    assert np.abs(_outputs(model, x) - dense).max() <= 1e-4 * np.abs(dense).max()


@pytest.mark.parametrize("prune, op_types", [(("channels",), {"MatMul"}), (("heads",), {"Gemm", "MatMul"})])
def test_least_squares_refits_the_ffn_and_the_output_projection_after_pruned_heads(zoo_cache, prune, op_types):
    """A transformer encoder: FFN hidden units removed (the second FFN matmul is re-fitted) or half the heads
    (the attention's output projection is), in every layer, and the model's output moves closer to the dense one."""
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((64, 10, 32)).astype(np.float32)
    test = rng.standard_normal((2, 10, 32)).astype(np.float32)
    dense = _outputs(zoo_cache.model("transformer_encoder"), test)
    errors = {}
    for mode in (None, "ls"):
        model = zoo_cache.model("transformer_encoder")
        calibration = CalibrationData.from_arrays(model, {model.graph.inputs[0].name: calib})
        pipeline = channel_pruning_pipeline(0.5, prune=prune, calibration=calibration)
        result = _with_reconstruction(pipeline, calibration, mode).run(model)
        errors[mode] = _relative_error(_outputs(result.model, test), dense)
        if mode == "ls":
            layers = result.get(ReconstructionReport).layers
            assert len(layers) == 2 and {fit.op_type for fit in layers} <= op_types
            assert all(fit.error_after < 0.7 * fit.error_before for fit in layers), result.get(ReconstructionReport).table()
    assert errors["ls"] < 0.8 * errors[None], errors


def _correlated(samples: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, features, generator=generator)
    return torch.randn(samples, 8, generator=generator) @ mixing + 0.1 * torch.randn(samples, features, generator=generator)


def test_sparsegpt_update_beats_plain_masking_and_keeps_the_mask():
    x = _correlated(2000, 64, seed=0).double()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hessian = x.T @ x
    mask = torch.rand(32, 64, generator=torch.Generator().manual_seed(2)) > 0.5

    def error(w):
        return float(((weight - w) @ x.T).norm())

    updated = sparsegpt_update(weight, hessian, mask, block=16)
    assert torch.equal(updated != 0, mask)
    assert error(updated) < 0.7 * error(weight * mask)
    assert torch.equal(sparsegpt_update(weight, hessian, torch.ones_like(mask)), weight)

    pruned, chosen = sparsegpt_prune(weight, hessian, sparsity=0.5, block=16)
    assert float(chosen.float().mean()) == 0.5 and torch.equal(pruned != 0, chosen)
    magnitude = weight.abs() >= weight.abs().median(dim=1, keepdim=True).values
    assert error(pruned) < error(weight * magnitude)
    two_of_four, kept = sparsegpt_prune(weight, hessian, n_m=(2, 4), block=16)
    assert torch.equal(kept.reshape(32, -1, 4).sum(-1), torch.full((32, 16), 2))
    assert error(two_of_four) < error(weight * mask)


def test_sparse_weights_are_refitted_with_their_zeros_in_place(trained_cnn):
    test, _ = _bars(256, seed=2)
    dense = _outputs(ir.serde.deserialize_model(trained_cnn), test)
    errors = {}
    for mode in (None, "ls"):
        model = ir.serde.deserialize_model(trained_cnn)
        calibration = CalibrationData.from_arrays(model, {model.graph.inputs[0].name: _bars(256, seed=3)[0]})
        pipeline = _with_reconstruction(
            channel_pruning_pipeline(0.6, sparsify="unstructured", calibration=calibration), calibration, mode
        )
        result = pipeline.run(model)
        if mode is None:
            zeros = {name: value.const_value.numpy() == 0 for name, value in model.graph.initializers.items()}
        else:
            for name, mask in zeros.items():  # the same zeros: SparseGPT keeps the mask
                np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy() == 0, mask)
            assert {fit.method for fit in result.get(ReconstructionReport).layers} == {"sparsegpt"}
        errors[mode] = _relative_error(_outputs(model, test), dense)
    assert errors["ls"] < errors[None] / 3, errors


class _BiasFreeMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 48, bias=False)
        self.down = nn.Linear(48, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_written_model_passes_the_checker_and_runs_in_onnxruntime(trained_cnn):
    """A MatMul without a bias gets one (a new Add after it, the output keeping its name) and a re-fitted
    CNN stays valid; onnxruntime computes what pcc's own interpreter does."""
    model = from_torch(_BiasFreeMLP(), (torch.randn(2, 5, 16),), dynamic_batch=True)
    x = np.random.default_rng(0).standard_normal((64, 5, 16)).astype(np.float32) + 0.5
    calibration = CalibrationData.from_arrays(model, {model.graph.inputs[0].name: x})
    output_name = model.graph.outputs[0].name
    result = _with_reconstruction(channel_pruning_pipeline(0.5, calibration=calibration), calibration, "ls").run(model)
    [fit] = result.get(ReconstructionReport).layers
    assert fit.op_type == "MatMul" and fit.applied
    assert [n.op_type for n in model.graph][-1] == "Add" and model.graph.outputs[0].name == output_name

    cnn = _prune_cnn(trained_cnn, "ls").model
    for pruned, feeds in ((model, x[:4]), (cnn, _bars(8, seed=4)[0])):
        proto = ir.serde.serialize_model(pruned)
        onnx.checker.check_model(proto, full_check=True)
        expected = _outputs(pruned, feeds)
        np.testing.assert_allclose(run_onnx(proto, {pruned.graph.inputs[0].name: feeds})[0], expected, rtol=1e-4, atol=1e-5)


def test_reconstruct_needs_a_dense_reference_and_real_data(trained_cnn):
    model = ir.serde.deserialize_model(trained_cnn)
    with pytest.raises(ir.passes.PreconditionError, match="KeepDenseReference"):
        Pipeline([Reconstruct(CalibrationData.from_arrays(model, {model.graph.inputs[0].name: _bars(8, 0)[0]}))]).run(model)
    with pytest.raises(InvalidRequestError, match="real calibration data"):
        Pipeline([KeepDenseReference(), Reconstruct(CalibrationData.random(model, samples=4))]).run(model)


def _gemm_layer(features: int, outputs: int):
    from pcc.passes.transforms.reconstruct import _describe

    model = from_torch(nn.Linear(features, outputs), (torch.zeros(2, features),))
    (layer,) = [_describe(node) for node in model.graph if node.op_type in ("Gemm", "MatMul")]
    return layer


def test_least_squares_declines_a_fit_that_only_matches_the_calibration_samples():
    """More inputs than samples (a classifier after global pooling): the exact fit is noise held-out samples
    expose, so the layer keeps its weights; with plenty of samples the same layer is re-fitted."""
    from pcc.passes.transforms.reconstruct import _least_squares

    generator = torch.Generator().manual_seed(0)
    features, outputs = 256, 10
    layer = _gemm_layer(features, outputs)
    weight = torch.randn(outputs, features, generator=generator) / features**0.5
    bias = torch.zeros(outputs)

    def fit(samples: int, noise: float):
        x = torch.randn(samples, features, generator=generator)
        target = x @ weight.T + noise * torch.randn(samples, outputs, generator=generator)
        return _least_squares(layer, [x], [target], weight.clone(), bias.clone(), None, ridge=1e-4)

    matrix, _, rows, ridge = fit(samples=100, noise=1.0)  # the weights are already the best linear map
    assert ridge is None and torch.equal(matrix, weight) and rows == 100
    shifted = weight + 0.3 * torch.randn(outputs, features, generator=generator) / features**0.5
    x = torch.randn(4000, features, generator=generator)
    matrix, _, rows, ridge = _least_squares(layer, [x], [x @ shifted.T], weight.clone(), bias.clone(), None, ridge=1e-4)
    assert ridge is not None and rows == 4000
    assert torch.allclose(matrix, shifted, atol=1e-3)

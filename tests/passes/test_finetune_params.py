"""FineTune's `params` modes: what `bn-bias` and `lora` train, that LoRA merges into the original graph
exactly, that sparse weights stay sparse, and that every mode lowers the loss."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import from_torch
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.compiler.torch_module import IRModule
from pcc.passes.transforms import FineTune, FineTuneReport
from pcc.passes.transforms.finetune import bias_and_norm_initializers
from pcc.passes.transforms.lora import LowRankAdapters
from pcc.passes.transforms.sparsify_weights import SparsifyWeights
from tests.conftest import ROOT, run_onnx


@pytest.fixture(scope="module")
def exported() -> bytes:
    """Conv-BN-ReLU x2, global pool, Linear (a Gemm): BatchNorm kept, any batch size (exported once)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.BatchNorm2d(12), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 4),
    )
    model = from_torch(net, (torch.randn(2, 1, 12, 12),), optimize=False, dynamic_batch=True)
    Pipeline(preparation_passes()).run(model)
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.fixture
def cnn(exported) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(exported))


def _patterns(model: ir.Model, samples: int = 256, batch: int = 32) -> CalibrationData:
    """A learnable task: noisy images of horizontal stripes, vertical stripes, a checkerboard or noise
    only, labelled by which."""
    rng = np.random.default_rng(1)
    rows, cols = np.indices((12, 12))
    templates = np.stack([(rows % 2) * 2 - 1, (cols % 2) * 2 - 1, ((rows + cols) % 2) * 2 - 1, np.zeros((12, 12))])
    labels = rng.integers(0, 4, samples)
    images = (templates[labels] + rng.normal(size=(samples, 12, 12)))[:, None].astype(np.float32)
    return CalibrationData.from_arrays(model, {model.graph.inputs[0].name: images}, labels=labels, batch_size=batch)


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}


def _tune(model: ir.Model, data: CalibrationData, **options) -> FineTuneReport:
    return Pipeline([FineTune(data, **options)]).run(model).get(FineTuneReport)


def test_bias_and_norm_parameters_of_an_exported_block():
    """LayerNormalization's scale and shift and the Linear biases the exporter writes as MatMul + Add."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc, self.out = torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.out(torch.relu(self.fc(self.norm(x)))).mean(1)

    model = from_torch(Block(), (torch.randn(2, 5, 16),))
    assert sorted(bias_and_norm_initializers(model)) == ["fc.bias", "norm.bias", "norm.weight", "out.bias"]


def test_bn_bias_changes_only_biases_and_norms(cnn):
    model = cnn
    data = _patterns(model)
    before = _initializers(model)
    selected = set(bias_and_norm_initializers(model))
    report = _tune(model, data, params="bn-bias", lr=1e-2)
    after = _initializers(model)
    changed = {name for name in before if before[name].tobytes() != after[name].tobytes()}
    assert changed == selected  # every bias/norm parameter moved, nothing else did (byte for byte)
    assert {"0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "8.bias"} == selected
    assert report.trained_params == sum(before[name].size for name in selected) == 8 + 8 + 8 + 12 + 12 + 12 + 4
    assert report.params == "bn-bias"


def test_lora_keeps_the_graph_and_trains_few_parameters(cnn):
    model = cnn
    data = _patterns(model)
    nodes = [(node.op_type, [v.name if v is not None else None for v in node.inputs]) for node in model.graph]
    shapes = {name: value.shape for name, value in _initializers(model).items()}
    report = _tune(model, data, params="lora", lora_rank=2, lr=1e-2)
    assert [(node.op_type, [v.name if v is not None else None for v in node.inputs]) for node in model.graph] == nodes
    assert {name: value.shape for name, value in _initializers(model).items()} == shapes
    # adapters: conv 8x9 (r 2: 2*(8+9)), conv 12x72 (2*(12+72)), gemm 4x12 (2*(4+12)); plus 7 bias/norm vectors
    assert report.trained_params == 2 * (8 + 9) + 2 * (12 + 72) + 2 * (4 + 12) + (8 * 3 + 12 * 3 + 4)
    assert report.params == "lora (rank 2)"


def test_merged_adapters_compute_what_the_trained_module_computed(cnn):
    """Give the adapters nonzero B, run the module with them, merge: onnxruntime on the written model
    must give the same outputs (the merged weight is W + mask * B.A in the stored layout)."""
    model = cnn
    SparsifyWeights("unstructured", 0.5)(model)  # zeros to keep, in the conv and the Gemm weights
    zeros = {name: array == 0 for name, array in _initializers(model).items() if array.ndim >= 2}
    student = IRModule(model)
    adapters = LowRankAdapters(model, student, rank=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for up in adapters.up:
            up.normal_(0, 0.5)
    x = np.random.default_rng(2).normal(size=(6, 1, 12, 12)).astype(np.float32)
    name = model.graph.inputs[0].name
    with torch.no_grad():
        adapted = student({name: x}, weights=adapters.weights())[0].numpy()
        adapters.merge()
    student.write_back(model)
    np.testing.assert_allclose(run_onnx(model, {name: x})[0], adapted, rtol=1e-5, atol=1e-5)
    after = _initializers(model)
    for weight, mask in zeros.items():
        assert (after[weight][mask] == 0).all()  # pruned weights stay pruned
        assert (after[weight][~mask] != 0).all()


@pytest.mark.parametrize("params", ["all", "lora"])
def test_sparse_weights_stay_sparse(cnn, params):
    model = cnn
    SparsifyWeights("unstructured", 0.6)(model)
    zeros = {name: array == 0 for name, array in _initializers(model).items() if array.ndim >= 2}
    _tune(model, _patterns(model, samples=128), params=params, lr=1e-2)
    after = _initializers(model)
    for name, mask in zeros.items():
        assert mask.mean() == pytest.approx(0.6, abs=0.02)
        np.testing.assert_array_equal(after[name] == 0, mask)


@pytest.mark.parametrize("params", ["all", "bn-bias", "lora"])
def test_every_mode_recovers_the_pruned_fashion_cnn_on_real_images(params):
    """The committed Fashion-MNIST CNN with 70% of its weights zeroed, 384 real training images: the
    cross-entropy of the last steps is well below that of the first."""
    fashion_mnist = pytest.importorskip("fashion_mnist")
    if not fashion_mnist.available():
        pytest.skip("dataset-fashion-mnist is not installed")
    images, labels = fashion_mnist.load("train", limit=384)
    model = ir.load(str(ROOT / "examples" / "models" / "fashion_cnn.onnx"))
    SparsifyWeights("unstructured", 0.7)(model)
    data = CalibrationData.from_arrays(model, {"image": images}, labels=labels, batch_size=32)
    report = _tune(model, data, params=params, epochs=1, lr=3e-3)
    assert report.steps == 12 == len(report.losses)
    assert np.mean(report.losses[-3:]) < 0.8 * np.mean(report.losses[:3]), report.losses


def test_unknown_mode_and_bad_rank_are_refused(cnn):
    model = cnn
    data = _patterns(model, samples=32)
    with pytest.raises(InvalidRequestError, match="--params"):
        _tune(model, data, params="heads")
    with pytest.raises(InvalidRequestError, match="--lora-rank"):
        _tune(model, data, params="lora", lora_rank=0)

"""FactorizeLowRank: truncated-SVD factorisation of Conv/Gemm/MatMul weights, exact at full rank, costs as predicted."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.compiler import from_torch
from pcc.passes.analysis.cost import measure_cost
from pcc.passes.transforms.factorize_lowrank import (
    FactorizeLowRank, FactorizeReport, factorizable_layers, factorize, low_rank_factors,
)
from tests.conftest import max_relative_difference, run_onnx


class _Net(torch.nn.Module):
    """A k x k Conv, a strided one, a depthwise one (never factorised), a token-wise Linear (MatMul) and a
    classifier (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.tokens = torch.nn.Linear(32, 48)
        self.head = torch.nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(torch.relu(self.down(torch.relu(self.conv(x)))))
        tokens = torch.relu(self.tokens(x.flatten(2).transpose(1, 2)))  # [B, 64, 48]
        return self.head(tokens.mean(dim=1))


@pytest.fixture(scope="module")
def exported() -> tuple[onnx.ModelProto, np.ndarray]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    return ir.serde.serialize_model(from_torch(_Net().eval(), (x,))), x.numpy()


def _model(exported) -> ir.Model:
    return ir.serde.deserialize_model(exported[0])


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    return run_onnx(model, {model.graph.inputs[0].name: x})


def test_every_op_kind_is_found_and_grouped_convolutions_are_not(exported):
    found = factorizable_layers(_model(exported))
    assert [layer.op_type for layer in found] == ["Conv", "Conv", "MatMul", "Gemm"]  # not the depthwise Conv
    layers = {layer.weight: layer for layer in found}
    conv, down, tokens = layers["conv.weight"], layers["down.weight"], found[2]  # the exporter names the MatMul's
    assert (conv.outputs, conv.reduction, conv.positions) == (16, 27, 2 * 256)  # [O, I*3*3] at 2 x 16 x 16
    assert (down.outputs, down.reduction, down.positions) == (32, 144, 2 * 64)  # stride 2: 2 x 8 x 8
    assert (tokens.outputs, tokens.reduction, tokens.positions) == (48, 32, 2 * 64)  # 2 x 64 tokens
    assert conv.max_saving_rank == (16 * 27 - 1) // (16 + 27) == 10


def test_full_rank_reproduces_the_model_and_passes_the_checker(exported):
    model = _model(exported)
    x = exported[1]
    before = _run(model, x)
    report = factorize(model, {layer.weight: layer.full_rank for layer in factorizable_layers(model)}, only_where_saving=False)
    assert len(report.factorized) == 4
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    ops = [node.op_type for node in model.graph]
    assert ops.count("Conv") == 5 and ops.count("MatMul") == 2 and ops.count("Gemm") == 2
    assert max_relative_difference(_run(model, x), before) < 1e-5


def test_factors_are_the_best_approximation():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((20, 30))
    left, right = low_rank_factors(matrix, 5)
    singular = np.linalg.svd(matrix, compute_uv=False)
    # Eckart-Young: the error is the dropped singular values; √σ on each side gives equal factor norms
    assert np.linalg.norm(matrix - left @ right) == pytest.approx(np.sqrt((singular[5:] ** 2).sum()), rel=1e-9)
    assert np.linalg.norm(left) == pytest.approx(np.linalg.norm(right), rel=1e-9)


def test_params_and_macs_drop_as_predicted_and_unsaving_ranks_stay_whole(exported):
    model = _model(exported)
    x = exported[1]
    layers = factorizable_layers(model)
    ranks = {layer.weight: max(1, layer.max_saving_rank // 2) for layer in layers}
    ranks["head.weight"] = layers[-1].max_saving_rank + 1  # saves nothing: stays whole
    before = measure_cost(model)
    dense = _run(model, x)
    result = FactorizeLowRank(ranks)(model)
    after = measure_cost(model)
    report = result.model.meta[FactorizeReport.META_KEY]
    kept = {layer.node: layer.rank for layer in report.layers}
    assert kept["node_linear_1"] is None and sum(rank is not None for rank in kept.values()) == 3
    predicted_params = sum(layer.dense_params - layer.params(ranks[layer.weight]) for layer in layers)
    predicted_macs = sum(layer.macs(None) - layer.macs(ranks[layer.weight]) for layer in layers)
    assert before.params - after.params == predicted_params > 0
    assert before.macs - after.macs == predicted_macs > 0
    assert "head.weight" in model.graph.initializers and "conv.weight" not in model.graph.initializers
    outputs = _run(model, x)
    assert outputs[0].shape == dense[0].shape and 0 < max_relative_difference(outputs, dense) < 1

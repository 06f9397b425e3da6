"""FLAP: the fluctuation metric, its standardised global allocation and the bias compensation.

On a two-layer MLP the scores are Var(h_j)·||W2[:, j]||² standardised over the hidden layer, and the
compensated bias is exactly b + W2[:, removed] · E[h_removed] (so the pruned layer's mean output over the
calibration data equals the dense one's). On a tiny Llama the heads and SwiGLU channels of every layer are
ranked together, the widths differ per layer, and compensation brings the pruned logits closer to the dense ones.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from tests.conftest import run_onnx

from bench_llm_structured import flap_pipeline  # examples/: the pipeline `--importance flap --allocator global` runs
from pcc.compiler import from_torch
from pcc.compiler.calibration import CalibrationData
from pcc.passes.allocation import Allocation
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.transforms.compensate_bias import BiasCompensation


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(6, 16), torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_scores_and_compensation_on_a_linear_layer():
    torch.manual_seed(0)
    mlp = _MLP().eval()
    rng = np.random.default_rng(0)
    batches = [{"x": (rng.standard_normal((32, 6)) + 0.5).astype(np.float32)} for _ in range(3)]
    model = from_torch(mlp, (torch.from_numpy(batches[0]["x"]),), input_names=["x"])
    calibration = CalibrationData.from_iterable(model, batches, batch_size=32)
    proto = ir.serde.serialize_model(model)

    x = torch.from_numpy(np.concatenate([b["x"] for b in batches]))
    with torch.no_grad():
        hidden = torch.relu(mlp.up(x)).double().numpy()
        weight, bias = mlp.down.weight.double().numpy(), mlp.down.bias.double().numpy()
    raw = hidden.var(axis=0) * (weight**2).sum(axis=0)
    expected = (raw - raw.mean()) / raw.std()

    result = flap_pipeline(0.5, calibration, round_to=1).run(ir.serde.deserialize_model(proto))
    groups = result.get(DependencyGroups)
    (group,) = groups.groups
    np.testing.assert_allclose(result.get(Importance).scores[group.units], expected, atol=1e-6)
    removed = result.get(Allocation).removed[group.units]
    assert removed.sum() == 8 and set(np.flatnonzero(removed)) == set(np.argsort(expected)[:8])

    compensated = bias + weight[:, removed] @ hidden[:, removed].mean(axis=0)
    biases = [v.const_value.numpy() for v in result.model.graph.initializers.values() if v.const_value.shape == (5,)]
    assert len(biases) == 1
    np.testing.assert_allclose(biases[0], compensated, rtol=1e-5, atol=1e-6)
    assert result.get(BiasCompensation).layers and result.get(BiasCompensation).tokens == 96
    pruned = np.concatenate([run_onnx(result.model, b)[0] for b in batches])
    dense = np.concatenate([run_onnx(proto, b)[0] for b in batches])
    np.testing.assert_allclose(pruned.mean(axis=0), dense.mean(axis=0), atol=1e-5)


def test_flap_on_a_llama_ranks_layers_together():
    pytest.importorskip("transformers")
    from tests.passes.tiny_llama import CONFIG, exported, token_batches

    proto = exported()
    calibration = CalibrationData.from_iterable(ir.serde.deserialize_model(proto), token_batches(4), batch_size=4)
    held_out = token_batches(1, batch=4, length=12, seed=7)[0]
    dense = run_onnx(proto, held_out)[0]
    errors = {}
    for compensate in (False, True):
        result = flap_pipeline(0.3, calibration, compensate, prune=("channels", "heads"), round_to=1).run(
            ir.serde.deserialize_model(proto)
        )
        allocation = result.get(Allocation)
        assert abs(allocation.achieved - 0.3) < 0.01
        groups = result.get(DependencyGroups).groups
        ffn_kept = [int(k) for g, k in zip(groups, allocation.keep_units) if g.kind == "channels"]
        assert len(set(ffn_kept)) > 1 and max(ffn_kept) < CONFIG["intermediate_size"], "one global, adaptive ranking"
        logits = run_onnx(result.model, held_out)[0]
        assert logits.shape == dense.shape
        errors[compensate] = float(np.abs(logits - dense).mean())
    assert errors[True] < errors[False]

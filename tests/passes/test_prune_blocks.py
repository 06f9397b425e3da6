"""Block pruning: residual blocks found in CNNs and transformers; dropping one == bypassing it in torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import zoo

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.analysis.residual_blocks import FindResidualBlocks, ResidualBlocks
from pcc.passes.transforms.prune_blocks import BlockPruneReport, PruneBlocks
from tests.conftest import max_relative_difference, run_onnx


def _blocks(model: ir.Model, calibration=None):
    Pipeline([*preparation_passes(), FindResidualBlocks(calibration)]).run(model)
    return model.meta[ResidualBlocks.META_KEY].blocks


def _feeds(zoo_cache, name, model):
    return {model.graph.inputs[0].name: zoo_cache.example_input(name)}


@pytest.mark.parametrize(("name", "layers"), [("transformer_encoder", 2), ("tiny_gpt", 2), ("sequence_first_attention", 1)])
def test_transformer_layers_are_found_as_blocks(zoo_cache, name, layers):
    blocks = _blocks(zoo_cache.model(name))
    assert len(blocks) == layers and all(b.attention and b.name.startswith("layer:") for b in blocks)
    assert len({b.params for b in blocks}) == 1 and blocks[0].params > 0


def _torch_without(name: str, module: torch.nn.Module, index: int) -> torch.nn.Module:
    """The torch model with transformer layer `index` replaced by the identity."""
    if name == "transformer_encoder":
        del module.layers[index]
        module.num_layers -= 1
    elif name == "tiny_gpt":
        module.blocks[index] = torch.nn.Identity()
    return module


@pytest.mark.parametrize("name", ["transformer_encoder", "tiny_gpt"])
@pytest.mark.parametrize("index", [0, 1])
def test_dropping_a_layer_equals_bypassing_it_in_torch(zoo_cache, name, index):
    model = zoo_cache.model(name)
    blocks = _blocks(model)
    PruneBlocks(names=(blocks[index].name,))(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    module, example = zoo.build(name)
    with torch.no_grad():
        expected = _torch_without(name, module, index)(example).numpy()
    pruned = run_onnx(proto, _feeds(zoo_cache, name, model))
    assert max_relative_difference(pruned, [expected]) <= 1e-5
    report = model.meta[BlockPruneReport.META_KEY]
    assert report.removed == [blocks[index].name] and report.params_removed == blocks[index].params
    params_left = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value.dtype.is_floating_point())
    module_params = sum(p.numel() for p in zoo.build(name)[0].parameters())
    assert params_left < module_params, "the dropped layer's weights must be gone from the file"


def test_resnet_identity_block_is_found_and_dropped(zoo_cache):
    model = zoo_cache.model("resnet_basic")
    blocks = _blocks(model)
    assert len(blocks) == 1 and not blocks[0].attention  # the two downsampling blocks have a conv on the skip path
    feeds = _feeds(zoo_cache, "resnet_basic", model)
    PruneBlocks(names=(blocks[0].name,))(model)
    outputs = run_onnx(model, feeds)
    assert np.isfinite(outputs[0]).all()
    assert max_relative_difference(outputs, run_onnx(zoo_cache.proto("resnet_basic"), feeds)) > 1e-3


def test_influence_ranks_blocks_and_sparsity_picks_the_least_influential(zoo_cache):
    model = zoo_cache.model("tiny_gpt")
    calibration = CalibrationData.random(model, samples=8, batch_size=4)
    blocks = _blocks(model, calibration)
    assert all(b.influence is not None and 0 <= b.influence <= 2 for b in blocks)
    PruneBlocks(sparsity=0.5)(model)
    least = min(blocks, key=lambda b: b.influence)
    assert model.meta[BlockPruneReport.META_KEY].removed == [least.name]


def test_block_requests_that_cannot_apply(zoo_cache):
    from pcc.compiler import PccError

    model = zoo_cache.model("tiny_gpt")
    _blocks(model)
    with pytest.raises(PccError, match="at least one must stay"):
        PruneBlocks(count=2)(model)
    with pytest.raises(PccError, match="influence"):
        PruneBlocks(count=1)(model)
    with pytest.raises(PccError, match="no residual block named"):
        PruneBlocks(names=("nope",))(model)
    mlp = zoo_cache.model("mlp")
    _blocks(mlp)
    with pytest.raises(PccError, match="needs residual blocks"):
        PruneBlocks(names=())(mlp)

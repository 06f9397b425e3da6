"""The shipped metanetwork as a pass: it loads, rewrites the weights of architectures it never saw into a
valid model with sparser group norms, drives `--allocator metanet`, and is skipped at sparsity 0."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.compiler import from_torch
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, channel_pruning_pipeline, preparation_passes
from pcc.metanet.model import Metanetwork, MetanetworkConfig
from pcc.metanet.transform import (
    SHIPPED_WEIGHTS, AllocateMetanet, MetanetReport, MetanetTransform, load_metanetwork, save_metanetwork,
)
from pcc.passes.allocation import AllocateGlobal, Allocation
from pcc.passes.analysis import CostReport, ScoreImportance
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups
from tests.compiler.test_cli import pcc
from tests.conftest import max_relative_difference, run_onnx


def _prepared(model: ir.Model) -> ir.Model:
    return Pipeline([*preparation_passes(), BuildDependencyGroups()]).run(model).model


def _arrays(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: np.array(value.const_value.numpy()) for name, value in model.graph.initializers.items()}


def test_shipped_weights_are_small_and_load():
    assert SHIPPED_WEIGHTS.is_file() and SHIPPED_WEIGHTS.stat().st_size < 1_000_000
    metanet = load_metanetwork()
    assert isinstance(metanet, Metanetwork) and not metanet.training
    assert 0 < metanet.num_parameters < 250_000
    assert metanet.head.weight.abs().sum() > 0, "the shipped metanetwork is trained, not the identity"
    saved = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    assert MetanetworkConfig(**saved["config"]) == metanet.config


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_transform_rewrites_weights_of_an_unseen_architecture_into_a_valid_model(zoo_cache, name):
    before = _arrays(_prepared(zoo_cache.model(name)))
    result = Pipeline([*preparation_passes(), BuildDependencyGroups(), MetanetTransform()]).run(zoo_cache.model(name))
    after = _arrays(result.model)
    assert set(after) == set(before)
    for parameter, array in after.items():
        assert array.shape == before[parameter].shape and array.dtype == before[parameter].dtype, parameter
    changed = {n for n in after if not np.array_equal(after[n], before[n])}
    report = result.get(MetanetReport)
    assert report.parameters >= len(changed) > 0.9 * report.parameters
    assert not changed & set(report.untouched)
    assert not {n for n in changed if "running" in n}, "BatchNorm statistics stay as they are"
    assert report.relative_change > 0 and 0 < report.group_norm_ratio < 1
    assert "metanet:" in report.summary()
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = {"x": zoo_cache.example_input(name)}
    outputs = run_onnx(proto, feeds)
    expected = run_onnx(zoo_cache.path(name), feeds)
    assert [o.shape for o in outputs] == [o.shape for o in expected]
    assert all(np.isfinite(o).all() for o in outputs)


def test_an_identity_metanetwork_saved_and_loaded_changes_nothing(tmp_path, zoo_cache):
    path = tmp_path / "weights" / "identity.pt"
    save_metanetwork(Metanetwork(MetanetworkConfig(hidden=8, layers=1)), path, data_models=["none"], steps=0)
    assert path.is_file() and not path.with_suffix(".tmp").exists()
    loaded = load_metanetwork(path)
    assert loaded.config == MetanetworkConfig(hidden=8, layers=1) and not loaded.training
    assert torch.load(path, weights_only=True)["provenance"] == {"data_models": ["none"], "steps": 0}
    model = _prepared(zoo_cache.model("resnet_basic"))
    before = _arrays(model)
    result = Pipeline([MetanetTransform(weights=path)]).run(model)
    assert all(np.array_equal(array, before[n]) for n, array in _arrays(result.model).items())
    report = result.get(MetanetReport)
    assert report.relative_change == 0 and report.group_norm_ratio == pytest.approx(1.0, abs=1e-6)


def test_missing_weights_are_a_user_error(tmp_path, zoo_cache):
    with pytest.raises(InvalidRequestError, match="no metanetwork weights"):
        load_metanetwork(tmp_path / "absent.pt")
    model = _prepared(zoo_cache.model("mlp"))
    with pytest.raises(InvalidRequestError, match="no metanetwork weights"):
        Pipeline([MetanetTransform(weights=tmp_path / "absent.pt")]).run(model)


def test_transform_needs_dependency_groups_and_drops_stale_importance(zoo_cache):
    with pytest.raises(ir.passes.PreconditionError, match="BuildDependencyGroups"):
        Pipeline([*preparation_passes(), MetanetTransform()]).run(zoo_cache.model("mlp"))
    stale = [*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), MetanetTransform(), AllocateGlobal(0.5)]
    with pytest.raises(ir.passes.PreconditionError, match="ScoreImportance"):
        Pipeline(stale).run(zoo_cache.model("mlp"))


def test_metanet_allocator_refuses_weights_the_metanetwork_has_not_seen(zoo_cache):
    passes = [*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), AllocateMetanet(0.5)]
    with pytest.raises(ir.passes.PreconditionError, match="MetanetTransform"):
        Pipeline(passes).run(zoo_cache.model("resnet_basic"))


def test_nothing_to_prune_is_the_same_user_error_as_with_other_allocators():
    """A lone Linear layer has no unit to remove: `global` says so (exit 2 on the command line); `metanet`
    must too, not crash in the transform before the allocator can."""
    model = from_torch(torch.nn.Linear(5, 3).eval(), (torch.randn(4, 5),), input_names=["x"], optimize=False)
    proto = ir.serde.serialize_model(model)
    with pytest.raises(InvalidRequestError, match="nothing to prune"):
        channel_pruning_pipeline(0.5, allocator="global").run(ir.serde.deserialize_model(proto))
    with pytest.raises(InvalidRequestError, match="nothing to prune"):
        channel_pruning_pipeline(0.5, allocator="metanet").run(ir.serde.deserialize_model(proto))


def test_metanet_allocator_prunes_to_the_budget(zoo_cache):
    pipeline = channel_pruning_pipeline(0.5, allocator="metanet", budget="macs")
    assert pipeline.index(MetanetTransform) < pipeline.index(ScoreImportance) < pipeline.index(AllocateMetanet)
    result = pipeline.run(zoo_cache.model("resnet_basic"))
    costs = result.get(CostReport).costs
    assert costs["after"].macs < costs["before"].macs and costs["after"].params < costs["before"].params
    allocation = result.get(Allocation)
    assert 1 - costs["after"].macs / costs["before"].macs == pytest.approx(allocation.achieved, abs=1e-9)
    assert abs(allocation.achieved - 0.5) <= 0.05  # (one unit of the 8-wide stem is a few % of this tiny model's MACs)
    assert result.get(MetanetReport).group_norm_ratio < 1
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert all(np.isfinite(o).all() for o in run_onnx(proto, {"x": zoo_cache.example_input("resnet_basic")}))


def test_metanet_allocator_at_sparsity_zero_returns_the_input_model(zoo_cache):
    pipeline = channel_pruning_pipeline(0.0, allocator="metanet", budget="macs")
    assert not any(isinstance(p, (MetanetTransform, AllocateMetanet)) for p in pipeline)
    result = pipeline.run(zoo_cache.model("resnet_basic"))
    assert result.get(MetanetReport) is None
    feeds = {"x": zoo_cache.example_input("resnet_basic")}
    got = run_onnx(ir.serde.serialize_model(result.model), feeds)
    assert max_relative_difference(got, run_onnx(zoo_cache.path("resnet_basic"), feeds)) <= 1e-6


def test_cli_compiles_with_the_metanet_allocator(tmp_path, zoo_cache):
    source = zoo_cache.path("resnet_basic")
    out = tmp_path / "pruned.onnx"
    done = pcc("compile", source, "--sparsity", "0.5", "--allocator", "metanet", "--budget", "macs", "-o", out, "--repeats", "2")
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(str(out), full_check=True)
    pruned, original = onnx.load(str(out)), onnx.load(str(source))
    count = lambda proto: sum(int(np.prod(i.dims)) for i in proto.graph.initializer)  # noqa: E731
    assert count(pruned) < count(original)
    assert "metanet" in done.stdout
    outputs = run_onnx(out, {"x": zoo_cache.example_input("resnet_basic")})
    assert all(np.isfinite(o).all() for o in outputs)


def test_metanet_flag_puts_the_transform_in_front_of_any_allocator(zoo_cache):
    pipeline = channel_pruning_pipeline(0.5, allocator="uniform", budget="macs", metanet=True)
    assert pipeline.index(MetanetTransform) < pipeline.index(ScoreImportance)
    assert not any(isinstance(p, AllocateMetanet) for p in pipeline)
    result = pipeline.run(zoo_cache.model("resnet_basic"))
    assert result.get(MetanetReport).group_norm_ratio < 1
    assert abs(result.get(Allocation).achieved - 0.5) <= 0.05
    assert not any(isinstance(p, MetanetTransform) for p in channel_pruning_pipeline(0.0, metanet=True))
    with pytest.raises(InvalidRequestError, match="--metanet .* does not combine with --sparsify"):
        channel_pruning_pipeline(0.5, sparsify="block:4x1", metanet=True)


def test_cli_reports_the_metanetwork_transform(tmp_path, zoo_cache):
    out = tmp_path / "pruned.onnx"
    done = pcc("compile", zoo_cache.path("resnet_basic"), "--sparsity", "0.5", "--metanet", "--budget", "macs", "-o", out,
               "--repeats", "2")
    assert done.returncode == 0, done.stderr
    assert "metanet: " in done.stdout and "weight tensors rewritten" in done.stdout
    onnx.checker.check_model(str(out), full_check=True)

"""The pass manager: pipelines are editable lists of onnx_ir passes with timings and typed results."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pcc.compiler.pipeline import Pipeline, analysis_pipeline, channel_pruning_pipeline
from pcc.passes.allocation import AllocateGlobal, AllocateUniform, Allocation
from pcc.passes.analysis import BuildDependencyGroups, DependencyGroups, Importance, ScoreImportance
from pcc.passes.transforms import PruneChannels, PruneReport


def test_pipeline_is_an_editable_printable_list():
    pipeline = channel_pruning_pipeline(0.4, allocator="uniform", round_to=8)
    text = repr(pipeline)
    assert "BuildDependencyGroups(round_to=8, prune=('channels',))" in text and "AllocateUniform(sparsity=0.4, budget='params')" in text
    position = pipeline.index(AllocateUniform)
    pipeline[position] = AllocateGlobal(sparsity=0.4)
    del pipeline[pipeline.index(PruneChannels) + 1 :]
    assert isinstance(pipeline[-1], PruneChannels) and "AllocateGlobal" in repr(pipeline)
    assert all(isinstance(p, ir.passes.PassBase) for p in pipeline)


def test_run_times_every_pass_and_keeps_results(zoo_cache):
    pipeline = channel_pruning_pipeline(0.5)
    result = pipeline.run(zoo_cache.model("mobilenet_v2"))
    assert len(result.timings) == len(pipeline)
    assert all(t.seconds >= 0 for t in result.timings)
    # PruneChannels invalidates the analyses on the model, but the run kept them for inspection
    assert DependencyGroups.META_KEY not in result.model.meta
    assert isinstance(result.get(DependencyGroups), DependencyGroups)
    assert isinstance(result.get(Importance), Importance)
    assert result.get(Allocation).removed.any()
    assert result.get(PruneReport).units_removed == int(result.get(Allocation).removed.sum())
    assert "total" in result.timing_table()


def test_passes_state_what_they_need(zoo_cache):
    model = zoo_cache.model("mlp")
    with pytest.raises(ir.passes.PreconditionError, match="BuildDependencyGroups"):
        ScoreImportance()(model)
    analysis_pipeline().run(model)
    with pytest.raises(ir.passes.PreconditionError, match="allocator"):
        PruneChannels()(model)


def test_user_pipelines_compose_with_onnx_ir_passes(zoo_cache):
    import onnx_ir.passes.common as common

    pipeline = Pipeline([*analysis_pipeline(), ScoreImportance("l1"), AllocateUniform(0.3), PruneChannels()])
    pipeline.append(common.CheckerPass(full_check=True))
    result = pipeline.run(zoo_cache.model("inception"))
    assert result.get(PruneReport).groups_pruned > 0
    assert isinstance(result.get(DependencyGroups), DependencyGroups)
    assert isinstance(pipeline[-1], common.CheckerPass) and isinstance(pipeline[pipeline.index(BuildDependencyGroups)], BuildDependencyGroups)

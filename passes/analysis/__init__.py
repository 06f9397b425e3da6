"""Analysis passes: they read the model and store typed results in `model.meta` (see `pcc.passes.results`)."""

from pcc.passes.analysis.attention import AttentionBlock, AttentionBlocks, FindAttentionBlocks
from pcc.passes.analysis.cost import Cost, CostReport, MeasureCost
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups, DependencyGroup, DependencyGroups
from pcc.passes.analysis.importance import Importance, ScoreImportance
from pcc.passes.analysis.residual_blocks import FindResidualBlocks, ResidualBlock, ResidualBlocks

__all__ = [
    "AttentionBlock",
    "AttentionBlocks",
    "BuildDependencyGroups",
    "Cost",
    "CostReport",
    "DependencyGroup",
    "DependencyGroups",
    "FindAttentionBlocks",
    "FindResidualBlocks",
    "Importance",
    "MeasureCost",
    "ResidualBlock",
    "ResidualBlocks",
    "ScoreImportance",
]

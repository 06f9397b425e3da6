"""Analysis passes: they read the model and store typed results in `model.meta` (see `pcc.passes.results`)."""

from pcc.passes.analysis.cost import Cost, CostReport, MeasureCost
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups, DependencyGroup, DependencyGroups
from pcc.passes.analysis.importance import Importance, ScoreImportance

__all__ = [
    "BuildDependencyGroups",
    "Cost",
    "CostReport",
    "DependencyGroup",
    "DependencyGroups",
    "Importance",
    "MeasureCost",
    "ScoreImportance",
]

"""AllocateStandardised: one global ranking of scores that are already comparable across groups.

FLAP's adaptive structure ("AL-AM", An et al. 2024) standardises each layer's scores (`--importance flap`,
`passes/analysis/flap.py`) and then removes the globally lowest units, each weighted by what it costs,
until the budget is met. `AllocateGlobal` does the same walk but first divides each score by its group's
mean, which for standardised scores (mean 0) would erase the ranking; here the scores are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcc.passes.allocation.global_ranking import AllocateGlobal
from pcc.passes.analysis.dependency_groups import DependencyGroups

__all__ = ["AllocateStandardised"]


@dataclass
class AllocateStandardised(AllocateGlobal):
    """Remove the globally lowest-scoring units until the budget is met (scores standardised per group upstream)."""

    def comparable_scores(self, groups: DependencyGroups, scores: np.ndarray) -> np.ndarray:
        return scores.astype(np.float64)

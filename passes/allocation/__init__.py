"""Allocators: how much of each dependency group to remove under a global budget."""

from pcc.passes.allocation.allocation import Allocation, AllocatorPass
from pcc.passes.allocation.budget import BUDGETS, ProductCost, mac_cost, param_cost
from pcc.passes.allocation.global_ranking import AllocateGlobal, AllocateLAMP
from pcc.passes.allocation.rate_distortion import AllocateDP, solve_rate_distortion
from pcc.passes.allocation.uniform import AllocateUniform

__all__ = [
    "ALLOCATORS",
    "BUDGETS",
    "Allocation",
    "AllocatorPass",
    "AllocateDP",
    "AllocateGlobal",
    "AllocateLAMP",
    "AllocateUniform",
    "ProductCost",
    "mac_cost",
    "param_cost",
    "solve_rate_distortion",
]

# `--allocator` name -> pass class
ALLOCATORS: dict[str, type[AllocatorPass]] = {
    "uniform": AllocateUniform,
    "global": AllocateGlobal,
    "lamp": AllocateLAMP,
    "dp": AllocateDP,
}

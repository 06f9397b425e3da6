"""Allocators: how much of each dependency group to remove under a global budget."""

from pcc.passes.allocation.allocation import Allocation, AllocatorPass
from pcc.passes.allocation.budget import BUDGETS, ProductCost, mac_cost, param_cost
from pcc.passes.allocation.global_ranking import AllocateGlobal
from pcc.passes.allocation.uniform import AllocateUniform

__all__ = [
    "ALLOCATORS",
    "BUDGETS",
    "Allocation",
    "AllocatorPass",
    "AllocateGlobal",
    "AllocateUniform",
    "ProductCost",
    "mac_cost",
    "param_cost",
]

# `--allocator` name -> pass class
ALLOCATORS: dict[str, type[AllocatorPass]] = {"uniform": AllocateUniform, "global": AllocateGlobal}

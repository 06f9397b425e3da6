"""Allocators: how much of each dependency group to remove under a global budget."""

from pcc.passes.allocation.allocation import Allocation, AllocatorPass, ParamCost
from pcc.passes.allocation.global_ranking import AllocateGlobal
from pcc.passes.allocation.uniform import AllocateUniform

__all__ = ["ALLOCATORS", "Allocation", "AllocatorPass", "AllocateGlobal", "AllocateUniform", "ParamCost"]

# `--allocator` name -> pass class
ALLOCATORS: dict[str, type[AllocatorPass]] = {"uniform": AllocateUniform, "global": AllocateGlobal}

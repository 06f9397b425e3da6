"""Measuring kernel variants on this machine, with the results kept in a small JSON cost table.

Which tile shape or loop order wins depends on the matrix shape, the sparsity and the CPU (cache sizes,
vector width, FMA latency), and a model of that would be wrong somewhere; compiling a kernel takes
~0.1 s and timing it a few milliseconds, so the kernels' `best_*_variant` functions simply time their
candidates once and remember the answer. The table is keyed by shape, weight statistics and target, so
one file can serve several machines, and a second compile of the same model measures nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcc.backends.tvm.host import use_all_cores

__all__ = ["CostTable", "build_kernel", "target_key", "time_kernels"]


def target_key(target) -> str:
    """A stable text form of a TVM target (dict or Target) for cache keys."""
    import tvm

    return str(tvm.target.Target(target) if isinstance(target, dict) else target)


def build_kernel(prim_func, target):
    """The callable of one PrimFunc compiled on its own (no Relax)."""
    import tvm

    return tvm.compile(tvm.IRModule({"main": prim_func}), target=target)["main"]


def time_kernels(kernels: dict[str, tuple[object, list[np.ndarray]]], output_shape: tuple[int, ...], target, *,
                 repeats: int = 10, passes: int = 3, dtype: str = "float32") -> dict[str, float]:
    """Milliseconds per call of each `name: (prim_func, arguments)`, called as `prim_func(*arguments, out)`.

    Each kernel's time is the median of `repeats` calls after a warm-up call, measured in `passes` rounds
    that visit the kernels in alternating order; the best round counts, so a burst of load from elsewhere
    on the machine spoils one round of one kernel rather than the choice.
    """
    import tvm

    use_all_cores()  # timings taken on one thread would pick tiles for the wrong machine
    built = {name: build_kernel(prim_func, target) for name, (prim_func, _) in kernels.items()}
    tensors = {name: [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arguments]
               + [tvm.runtime.tensor(np.zeros(output_shape, dtype))] for name, (_, arguments) in kernels.items()}
    best = dict.fromkeys(kernels, float("inf"))
    for round_ in range(passes):
        for name in list(kernels)[:: 1 if round_ % 2 == 0 else -1]:
            built[name](*tensors[name])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                built[name](*tensors[name])
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], 1000 * float(np.median(times)))
    return best


@dataclass
class CostTable:
    """`{key: {"best": variant name, "ms": {variant name: milliseconds}}}` in a JSON file (or memory only)."""

    path: Path | None = None
    entries: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except ValueError:  # a damaged cache is re-measured, not fatal
                self.entries = {}

    def best(self, key: str, names: list[str], measure: Callable[[], dict[str, float]]) -> tuple[str, dict[str, float]]:
        """The fastest of `names` and all timings: from the table, else `measure()`d and saved."""
        entry = self.entries.get(key)
        if entry is None or entry.get("best") not in names:
            timings = measure()
            entry = {"best": min(timings, key=timings.get), "ms": timings}
            self.entries[key] = entry
            self.save()
        return entry["best"], entry["ms"]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(staged, self.path)

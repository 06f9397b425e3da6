"""A scheduled dense matmul kernel in TVMScript: the fair "TVM dense" baseline and the dense fallback.

TVM 0.27's default Relax pipeline leaves a matmul as an untiled, unvectorised loop nest (see
shared/TVM.md: two orders of magnitude behind onnxruntime), and the wheel has no BLAS to offload to,
so dense layers get the classic register-blocked GEMM micro-kernel, written out directly:

- W is packed once on the host (it is a constant) into column panels [P, K, NR]: the NR outputs of a
  panel are contiguous for every k, so the inner loop reads W strictly sequentially;
- an MR x NR tile of Y lives in registers (AVX-512: NR = 64 is four vectors, MR = 6 gives 24
  accumulators); per k it loads NR weights, broadcasts MR values of X and issues MR * NR / 16 FMAs;
- (panel, row tile) pairs are the parallel jobs.

The accumulator tile is split over two buffers because TVM 0.27 keeps an allocation on the stack (so
LLVM can promote it to registers) only below 1 KiB and in "global" scope. Edges need no padding of Y:
the last panel is packed to end at N and the last row tile moved back to end at M, so both overlap
their neighbours and recompute a few identical values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcc.backends.tvm.tuning import CostTable, target_key, time_kernels

__all__ = ["DenseVariant", "best_dense_variant", "dense_matmul_primfunc", "dense_variants", "pack_dense_weight"]

_STACK_BYTES = 1024
_CACHE_TAG = "dense/1"  # bump when the loop nest changes, so cached choices made for the old one are re-measured


@dataclass(frozen=True)
class DenseVariant:
    """The register tile: MR rows of X by NR outputs."""

    mr: int = 6
    nr: int = 64

    @property
    def name(self) -> str:
        return f"mr{self.mr}-nr{self.nr}"

    @classmethod
    def parse(cls, name: str) -> DenseVariant:
        mr, nr = name.split("-")
        return cls(int(mr[2:]), int(nr[2:]))

    def fitted(self, m: int, n: int) -> DenseVariant:
        """The tile clipped to the matrix: at most M rows, and a panel no wider than N that is a whole number
        of 16-lane vectors unless it is at most one (a 37-wide vector measured 14x slower than 32)."""
        nr = min(self.nr, n)
        return DenseVariant(min(self.mr, m), nr if nr <= 16 else nr - nr % 16)


def dense_variants(m: int, n: int, dtype: str = "float32") -> list[DenseVariant]:
    """Register tiles whose two accumulator halves fit the stack (hence registers)."""
    size = np.dtype(dtype).itemsize
    tiles = {DenseVariant(mr, nr).fitted(m, n) for mr, nr in ((6, 64), (4, 64), (8, 32), (12, 32), (14, 16))}
    return sorted((t for t in tiles if -(-t.mr // 2) * t.nr * size < _STACK_BYTES), key=lambda t: (-t.nr, -t.mr))


def pack_dense_weight(weight: np.ndarray, variant: DenseVariant) -> np.ndarray:
    """W[K, N] as [P, K, NR] column panels; the last panel ends at N (overlapping the one before)."""
    n = weight.shape[1]
    nr = variant.fitted(1, n).nr
    starts = [min(p * nr, n - nr) for p in range(-(-n // nr))]
    return np.ascontiguousarray(np.stack([weight[:, s:s + nr] for s in starts]))


def dense_matmul_primfunc(m: int, k: int, n: int, dtype: str = "float32", variant: DenseVariant | None = None):
    """`Y[m, n] = X[m, k] @ W` as a PrimFunc `(x, w_packed, y)`, `w_packed = pack_dense_weight(W, variant)`."""
    from tvm.script import tirx as T

    tile = (variant or dense_variants(m, n, dtype)[0]).fitted(m, n)
    mr, nr = tile.mr, tile.nr
    panels, tiles = -(-n // nr), -(-m // mr)
    last_panel, last_tile = n - nr, m - mr
    upper = -(-mr // 2)  # rows in the first accumulator buffer
    lower = mr - upper

    @T.macro
    def update(acc, first, rows, x, w, j, m0, p):
        for i in T.unroll(rows):
            for v in T.vectorized(nr):
                acc[i, v] = acc[i, v] + x[m0 + first + i, j] * w[p, j, v]

    @T.macro
    def store(acc, first, rows, y, m0, n0):
        for i in T.unroll(rows):
            for v in T.vectorized(nr):
                y[m0 + first + i, n0 + v] = acc[i, v]

    @T.prim_func
    def dense_matmul(x: T.Buffer((m, k), dtype), w: T.Buffer((panels, k, nr), dtype), y: T.Buffer((m, n), dtype)):
        T.func_attr({"tir.noalias": True})
        for job in T.parallel(panels * tiles):
            panel = job // tiles
            m0, n0 = T.min(job % tiles * mr, last_tile), T.min(panel * nr, last_panel)
            top = T.alloc_buffer((upper, nr), dtype)
            bottom = T.alloc_buffer((max(lower, 1), nr), dtype)
            for i in T.unroll(upper):
                for v in T.vectorized(nr):
                    top[i, v] = T.cast(0, dtype)
            if lower > 0:
                for i in T.unroll(lower):
                    for v in T.vectorized(nr):
                        bottom[i, v] = T.cast(0, dtype)
            for j in range(k):
                update(top, 0, upper, x, w, j, m0, panel)
                if lower > 0:
                    update(bottom, upper, lower, x, w, j, m0, panel)
            store(top, 0, upper, y, m0, n0)
            if lower > 0:
                store(bottom, upper, lower, y, m0, n0)

    return dense_matmul


def best_dense_variant(m: int, k: int, n: int, target, *, cache: Path | None = None, dtype: str = "float32",
                       repeats: int = 10) -> tuple[DenseVariant, float]:
    """The fastest of `dense_variants` for this shape on `target` and its milliseconds per call, timed once
    and cached in `cache`."""
    key = f"{_CACHE_TAG} m{m} k{k} n{n} {dtype} {target_key(target)}"
    variants = dense_variants(m, n, dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(dtype)
    weight = rng.standard_normal((k, n)).astype(dtype)

    def measure() -> dict[str, float]:
        kernels = {v.name: (dense_matmul_primfunc(m, k, n, dtype, v), [x, pack_dense_weight(weight, v)]) for v in variants}
        return time_kernels(kernels, (m, n), target, repeats=repeats, dtype=dtype)

    best, timings = CostTable(cache).best(key, [v.name for v in variants], measure)
    return DenseVariant.parse(best), timings[best]

"""Block-sparse (BSR) matmul kernels written in TVMScript, with the loop nest picked per shape by measurement.

A Linear/MatMul layer computes Y[M, N] = X[M, K] @ W[K, N]. Its sparse weight is stored as W^T (outputs x
reduction) in block-sparse rows with R x C blocks (R outputs, C reduction columns): `data[nnzb, R, C]`,
`indices[nnzb]` (block column), `indptr[N/R + 1]`, exactly scipy's `bsr_matrix` of W^T.

Why by hand: TVM 0.27 has no sparse operators, and its schedule primitives refuse loops whose bounds come
from `indptr`, but explicit TVMScript loops compile and run. Two loop nests, both parallel over block rows
(outputs) and register-tiled over M so that each weight block loaded is reused for a whole tile of rows:

- `rows`: the innermost, vectorised loop runs over a block's R outputs (data kept as [C, R] per block,
  so the R values are contiguous) and each X value is broadcast. Right for tall blocks (16x1) and M = 1.
  A job is a group of 8 consecutive block rows, tile by tile, so that each row of Y is written 8 blocks
  wide (with one block row per job, each job wrote one cache line per row of Y: at N = 3072 lines 12 KiB
  apart, all in the same L1 set).
- `cols`: the vectorised loop runs over a tile of M (X transposed once per call, so X^T rows are
  contiguous) and each weight value is broadcast. Right for narrow blocks (1x1, 4x4) at M >= 16, where
  a vector over R would be 1 or 4 lanes wide. Results leave through a small staging buffer so that Y is
  written 64 outputs at a time, not one scalar per cache line.

Both can split a block row's blocks over `unroll` independent accumulator sets, which hides the FMA
latency when a tile has only a few accumulators (M = 1, narrow blocks).

Accumulators: TVM 0.27 puts an allocation on the stack, where LLVM promotes it to registers, only when
its scope is "global" and it is smaller than 1 KiB; "local" scope always becomes a heap workspace and
costs a store per FMA. Hence `scope="global"` below and the size limit in `bsr_variants`.

Edges: N need not be a multiple of R (the last block row's tail is stored element by element); K need
not be a multiple of C (a block in the last, partial block column is shifted left to end at K, its
overlap with the previous block column zeroed, so X is never read past K); M need not be a multiple of
the tile (the last tile is moved back to end at M and recomputes a few rows with identical results).
Block rows with no blocks produce zeros, and a weight with no blocks at all gets one zero block so that
no buffer is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pcc.backends.tvm.tuning import CostTable, target_key, time_kernels

__all__ = [
    "BSRMatrix",
    "BSRVariant",
    "best_bsr_variant",
    "bsr_kernel_arrays",
    "bsr_matmul_primfunc",
    "bsr_variants",
    "to_bsr",
]

_STACK_BYTES = 1024  # TVM's kMaxStackAlloca: larger (or "local") buffers go to the heap workspace
_GROUP_WIDTH = 64  # outputs the `cols` nest stages before writing them to Y, 256 bytes per row of X
_CACHE_TAG = "bsr/2"  # bump when a loop nest changes, so cached choices made for the old one are re-measured
_ROW_GROUP = 8  # block rows per `rows` job (measured 1.3-1.6x faster than 1 at M = 128)


@dataclass(frozen=True)
class BSRMatrix:
    """W[K, N] as W^T in block-sparse rows (scipy's BSR layout)."""

    data: np.ndarray  # [nnzb, R, C]: R outputs x C reduction columns
    indices: np.ndarray  # [nnzb] int32: block column (reduction block) of each block
    indptr: np.ndarray  # [ceil(N / R) + 1] int32
    shape: tuple[int, int]  # W's (K, N)
    block: tuple[int, int]  # (R, C)

    @property
    def nnz_blocks(self) -> int:
        return int(self.indices.size)

    @property
    def block_grid(self) -> tuple[int, int]:
        """(block rows, block columns) of the zero-padded W^T."""
        (k, n), (r, c) = self.shape, self.block
        return -(-n // r), -(-k // c)

    @property
    def density(self) -> float:
        """Fraction of the block grid that holds a stored block."""
        rows, cols = self.block_grid
        return self.nnz_blocks / (rows * cols)

    def to_dense(self) -> np.ndarray:
        """W[K, N] back (for checks)."""
        (k, n), (r, c) = self.shape, self.block
        rows, cols = self.block_grid
        blocks = np.zeros((rows, cols, r, c), self.data.dtype)
        row_of_block = np.repeat(np.arange(rows), np.diff(self.indptr))
        blocks[row_of_block, self.indices] = self.data
        return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3).reshape(rows * r, cols * c)[:n, :k].T)


def to_bsr(weight: np.ndarray, block: tuple[int, int] = (16, 1), *, transposed: bool = False) -> BSRMatrix:
    """BSR of a MatMul weight W[K, N] (or of W^T[N, K], as Gemm with transB=1 stores it, if `transposed`).

    Every block holding a non-zero is stored; the edges are padded with zeros to whole blocks.
    """
    r, c = block
    wt = np.asarray(weight if transposed else weight.T)
    n, k = wt.shape
    rows, cols = -(-n // r), -(-k // c)
    padded = np.zeros((rows * r, cols * c), wt.dtype)
    padded[:n, :k] = wt
    blocks = padded.reshape(rows, r, cols, c).transpose(0, 2, 1, 3)  # [rows, cols, R, C]
    present = (blocks != 0).any(axis=(2, 3))
    row_index, col_index = np.nonzero(present)  # row-major: block columns sorted within each row
    return BSRMatrix(
        data=np.ascontiguousarray(blocks[row_index, col_index]),
        indices=col_index.astype(np.int32),
        indptr=np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32),
        shape=(k, n),
        block=(r, c),
    )


def bsr_kernel_arrays(matrix: BSRMatrix, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's constant arguments after X: blocks as [nnzb, C, R] in `dtype`, each block's first X
    column, indptr.

    Blocks are stored transposed so that a block's R outputs are contiguous (the `rows` nest's vector) and
    a block column's R weights share a cache line (the `cols` nest's broadcasts). A block in the partial
    last block column is shifted to end at K (see the module docstring).
    """
    (k, _), (r, c) = matrix.shape, matrix.block
    data = np.ascontiguousarray(matrix.data.transpose(0, 2, 1), dtype=dtype)
    starts = (matrix.indices * c).astype(np.int32)
    overhang = -k % c  # zero columns padded after K in the last block column
    if overhang and k >= c:
        last = matrix.indices == matrix.block_grid[1] - 1
        shifted = np.zeros_like(data[last])
        shifted[:, overhang:, :] = data[last][:, : c - overhang, :]
        data[last] = shifted
        starts[last] = k - c
    if matrix.nnz_blocks == 0:
        data, starts = np.zeros((1, c, r), dtype), np.zeros(1, np.int32)
    return data, starts, matrix.indptr


@dataclass(frozen=True)
class BSRVariant:
    """One loop nest: `layout` (see the module docstring), M rows per register tile, accumulator sets."""

    layout: Literal["rows", "cols"] = "rows"
    tile: int = 8
    unroll: int = 1

    @property
    def name(self) -> str:
        return f"{self.layout}-t{self.tile}-u{self.unroll}"

    @classmethod
    def parse(cls, name: str) -> BSRVariant:
        layout, tile, unroll = name.split("-")
        return cls(layout, int(tile[1:]), int(unroll[1:]))


def bsr_variants(m: int, block: tuple[int, int], dtype: str = "float32") -> list[BSRVariant]:
    """The candidates worth timing for M rows and this block shape, accumulators small enough for registers.

    `rows` for M = 1 and for blocks at least 8 outputs tall; `cols` otherwise (a `rows` nest on a narrow
    block writes Y one or four values per cache line, which measured 3-10x slower than `cols`).
    """
    r, _ = block
    size = np.dtype(dtype).itemsize
    if m == 1:
        return [BSRVariant("rows", 1, u) for u in (1, 2, 4, 8) if u * r * size < _STACK_BYTES]
    if r >= 8:
        return [BSRVariant("rows", min(tile, m), unroll) for tile in (4, 8, 12) for unroll in (1, 2)
                if (tile <= m or tile == 4) and min(tile, m) * unroll * r * size < _STACK_BYTES]
    return [BSRVariant("cols", _cols_tile(tile, m), unroll) for tile in (16, 32, 64) for unroll in (1, 2)
            if (tile <= m or tile == 16) and min(tile, m) * unroll * r * size < _STACK_BYTES]


def _cols_tile(tile: int, m: int) -> int:
    """The `cols` vector over M: at most M, and a whole number of 16-lane vectors unless at most one
    (LLVM splits odd wide vectors badly: a 37-wide one measured 14x slower than 32)."""
    tile = min(tile, m)
    return tile if tile <= 16 else tile - tile % 16


def bsr_matmul_primfunc(m: int, k: int, n: int, matrix: BSRMatrix, dtype: str = "float32",
                        variant: BSRVariant | None = None):
    """`Y[m, n] = X[m, k] @ W` as a PrimFunc `(x, data, starts, indptr, y)`; the middle three are
    `bsr_kernel_arrays(matrix, dtype)` (constants when embedded in Relax with `call_tir`)."""
    if matrix.shape != (k, n):
        raise ValueError(f"the BSR weight is {matrix.shape[0]}x{matrix.shape[1]}, the matmul needs {k}x{n}")
    if matrix.block[1] > k:
        raise ValueError(f"blocks {matrix.block[1]} columns wide cannot tile a reduction of {k}")
    variant = variant or bsr_variants(m, matrix.block, dtype)[0]
    build = _rows_nest if variant.layout == "rows" else _cols_nest
    return build(m, k, n, matrix.block, max(1, matrix.nnz_blocks), dtype, variant)


def best_bsr_variant(m: int, matrix: BSRMatrix, target, *, cache: Path | None = None,
                     dtype: str = "float32", repeats: int = 10) -> tuple[BSRVariant, float]:
    """The fastest of `bsr_variants` for this weight and M on `target` and its milliseconds per call, timed
    once and cached in `cache`."""
    (k, n), (r, c) = matrix.shape, matrix.block
    key = f"{_CACHE_TAG} m{m} k{k} n{n} block{r}x{c} nnzb{matrix.nnz_blocks} {dtype} {target_key(target)}"
    variants = bsr_variants(m, matrix.block, dtype)
    arguments = [np.random.default_rng(0).standard_normal((m, k)).astype(dtype), *bsr_kernel_arrays(matrix, dtype)]

    def measure() -> dict[str, float]:
        kernels = {v.name: (bsr_matmul_primfunc(m, k, n, matrix, dtype, v), arguments) for v in variants}
        return time_kernels(kernels, (m, n), target, repeats=repeats, dtype=dtype)

    best, timings = CostTable(cache).best(key, [v.name for v in variants], measure)
    return BSRVariant.parse(best), timings[best]


def _transpose_macro(m: int, k: int):
    """X[m, k] -> X^T[k, m], in parallel strips of 16 columns of X; each store is a vector over up to 8
    rows of X (a strided load, measured faster than scalar copies)."""
    from tvm.script import tirx as T

    strip, width = min(16, k), min(8, m)

    @T.macro
    def transpose(x, xt):
        for s in T.parallel(-(-k // strip)):
            for i in range(-(-m // width)):
                for j in T.unroll(strip):
                    for v in T.vectorized(width):
                        xt[T.min(s * strip, k - strip) + j, T.min(i * width, m - width) + v] = \
                            x[T.min(i * width, m - width) + v, T.min(s * strip, k - strip) + j]

    return transpose


def _block_row_sum(accumulate, unroll: int, outer: int, inner: int, dtype: str):
    """The reduction over one block row shared by both nests: `unroll` accumulator slots of [outer, inner]
    (zeroed, `accumulate` over the row's blocks in turns, the remainder into slot 0, slots folded into slot
    0). The nests differ only in the accumulator's layout and in `accumulate`."""
    from tvm.script import tirx as T

    @T.macro
    def block_row_sum(acc, operand, data, starts, indptr, row, m0):
        for slot in T.unroll(unroll):
            for i in T.unroll(outer):
                for v in T.vectorized(inner):
                    acc[slot, i, v] = T.cast(0, dtype)
        for q in range((indptr[row + 1] - indptr[row]) // unroll):
            for slot in T.unroll(unroll):
                accumulate(acc, slot, operand, data, starts, indptr[row] + q * unroll + slot, m0)
        if unroll > 1:
            for b in range(indptr[row + 1] - (indptr[row + 1] - indptr[row]) % unroll, indptr[row + 1]):
                accumulate(acc, 0, operand, data, starts, b, m0)
            for slot in T.unroll(1, unroll):
                for i in T.unroll(outer):
                    for v in T.vectorized(inner):
                        acc[0, i, v] = acc[0, i, v] + acc[slot, i, v]

    return block_row_sum


def _rows_nest(m: int, k: int, n: int, block: tuple[int, int], nnz: int, dtype: str, variant: BSRVariant):
    from tvm.script import tirx as T

    r, c = block
    rows, full_rows, tail = -(-n // r), n // r, n % r
    tile, unroll = min(variant.tile, m), variant.unroll
    tiles, last_tile = -(-m // tile), m - tile
    group = min(_ROW_GROUP, max(1, rows // 8))  # block rows per parallel job, keeping >= 8 jobs

    @T.macro
    def accumulate(acc, slot, x, data, starts, b, m0):
        for j in T.unroll(c):
            for i in T.unroll(tile):
                for v in T.vectorized(r):
                    acc[slot, i, v] = acc[slot, i, v] + data[b, j, v] * x[m0 + i, starts[b] + j]

    block_row_sum = _block_row_sum(accumulate, unroll, tile, r, dtype)

    @T.prim_func
    def bsr_matmul_rows(x: T.Buffer((m, k), dtype), data: T.Buffer((nnz, c, r), dtype), starts: T.Buffer((nnz,), "int32"),
                        indptr: T.Buffer((rows + 1,), "int32"), y: T.Buffer((m, n), dtype)):
        T.func_attr({"tir.noalias": True})
        for job in T.parallel(-(-rows // group)):
            for t in range(tiles):
                m0 = T.min(t * tile, last_tile)
                for member in range(group):
                    if job * group + member < rows:
                        row = job * group + member
                        acc = T.alloc_buffer((unroll, tile, r), dtype)
                        block_row_sum(acc, x, data, starts, indptr, row, m0)
                        if tail == 0 or row < full_rows:
                            for i in T.unroll(tile):
                                for v in T.vectorized(r):
                                    y[m0 + i, row * r + v] = acc[0, i, v]
                        else:
                            for i in T.unroll(tile):
                                for v in range(tail):
                                    y[m0 + i, row * r + v] = acc[0, i, v]

    return bsr_matmul_rows


def _cols_nest(m: int, k: int, n: int, block: tuple[int, int], nnz: int, dtype: str, variant: BSRVariant):
    from tvm.script import tirx as T

    r, c = block
    rows = -(-n // r)
    tile, unroll = _cols_tile(variant.tile, m), variant.unroll
    tiles, last_tile = -(-m // tile), m - tile
    group = max(1, _GROUP_WIDTH // r)  # block rows staged together: group * r outputs per Y row write
    width = group * r
    groups, full_groups, tail = -(-rows // group), n // width, n % width
    transpose = _transpose_macro(m, k)

    @T.macro
    def accumulate(acc, slot, xt, data, starts, b, m0):
        for j in T.unroll(c):
            for i in T.unroll(r):
                for v in T.vectorized(tile):
                    acc[slot, i, v] = acc[slot, i, v] + data[b, j, i] * xt[starts[b] + j, m0 + v]

    block_row_sum = _block_row_sum(accumulate, unroll, r, tile, dtype)

    @T.prim_func
    def bsr_matmul_cols(x: T.Buffer((m, k), dtype), data: T.Buffer((nnz, c, r), dtype), starts: T.Buffer((nnz,), "int32"),
                        indptr: T.Buffer((rows + 1,), "int32"), y: T.Buffer((m, n), dtype)):
        T.func_attr({"tir.noalias": True})
        xt = T.alloc_buffer((k, m), dtype)
        transpose(x, xt)
        for job in T.parallel(groups * tiles):
            first = job // tiles * group  # the job's first block row
            m0 = T.min(job % tiles * tile, last_tile)
            stage = T.alloc_buffer((tile, width), dtype)
            for member in range(group):
                if first + member < rows:
                    row = first + member
                    acc = T.alloc_buffer((unroll, r, tile), dtype)
                    block_row_sum(acc, xt, data, starts, indptr, row, m0)
                    for i in T.unroll(r):
                        for v in T.unroll(tile):
                            stage[v, member * r + i] = acc[0, i, v]
            if tail == 0 or job // tiles < full_groups:
                for v in range(tile):
                    for w in T.vectorized(width):
                        y[m0 + v, first * r + w] = stage[v, w]
            else:
                for v in range(tile):
                    for w in range(tail):
                        y[m0 + v, first * r + w] = stage[v, w]

    return bsr_matmul_cols

"""Matmul kernels written directly in TVMScript: block-sparse (BSR) and a register-tiled dense one.

TVM 0.27 has no sparse operators and its schedule primitives refuse loops whose bounds come from
`indptr`, but a PrimFunc written as explicit loops compiles and runs. Both kernels compute
Y[M, Np] = X[M, K] @ W[K, N] (Np = N rounded up to the block height; the caller slices) with:
- a register tile of TM rows of X (TM = the largest of 8, 4, 2, 1 dividing M) times one block of
  outputs, so each weight value loaded is used TM times;
- the output block as the innermost, vectorised loop: W's non-zeros are stored block-transposed
  ([nnz blocks, C, R]), so the R outputs of a block are contiguous for any block shape;
- parallel over block rows of outputs (2 cores here; more where there are).
The dense kernel is the same loop nest over every block (16-wide column strips of W), so "sparse vs
dense" compares one code generator with itself and the difference is the skipped zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BSRMatrix", "to_bsr", "bsr_matmul_primfunc", "dense_matmul_primfunc", "row_tile"]

DENSE_STRIP = 16  # outputs per dense strip: two AVX2 vectors


@dataclass(frozen=True)
class BSRMatrix:
    """W[K, N] as block rows of W^T: `data[b]` is block b as [C, R] (reduction, outputs)."""

    data: np.ndarray  # [nnz_blocks, C, R] float32
    indices: np.ndarray  # [nnz_blocks] int32: the block column (reduction block)
    indptr: np.ndarray  # [block_rows + 1] int32
    shape: tuple[int, int]  # W's [K, N]
    block: tuple[int, int]  # (R outputs, C reduction)

    @property
    def nnz_blocks(self) -> int:
        return int(self.indices.size)

    @property
    def density(self) -> float:
        rows, cols = self.block_grid
        return self.nnz_blocks / (rows * cols)

    @property
    def block_grid(self) -> tuple[int, int]:
        (k, n), (r, c) = self.shape, self.block
        return -(-n // r), -(-k // c)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # at least one (zero) block, so the kernel's buffers are never empty
        if self.nnz_blocks == 0:
            r, c = self.block
            return np.zeros((1, c, r), np.float32), np.zeros(1, np.int32), self.indptr
        return self.data, self.indices, self.indptr


def to_bsr(weight: np.ndarray, block: tuple[int, int]) -> BSRMatrix:
    """Blocks of W^T holding any non-zero; edges padded with zeros (shapes need not be multiples)."""
    k, n = weight.shape
    r, c = block
    rows, cols = -(-n // r), -(-k // c)
    padded = np.zeros((rows * r, cols * c), np.float32)
    padded[:n, :k] = weight.T
    blocks = padded.reshape(rows, r, cols, c).transpose(0, 2, 3, 1)  # [rows, cols, C, R]
    present = np.abs(blocks).reshape(rows, cols, -1).max(axis=2) > 0
    indptr = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
    row_index, col_index = np.nonzero(present)
    return BSRMatrix(np.ascontiguousarray(blocks[row_index, col_index]), col_index.astype(np.int32), indptr, (k, n), block)


def row_tile(m: int) -> int:
    return next(t for t in (8, 4, 2, 1) if m % t == 0)


def bsr_matmul_primfunc(m: int, k: int, n: int, matrix: BSRMatrix):
    """Y[m, Np] = X[m, k] @ W, W given as `matrix`; the BSR arrays are the kernel's 2nd-4th arguments."""
    from tvm.script import tirx as T

    r, c = matrix.block
    rows, _ = matrix.block_grid
    nnz = max(1, matrix.nnz_blocks)
    tm = row_tile(m)

    @T.prim_func
    def bsr_matmul(
        x: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnz, c, r), "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((rows + 1,), "int32"),
        y: T.Buffer((m, rows * r), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        for row in T.parallel(rows):
            for tile in range(m // tm):
                acc = T.alloc_buffer((tm, r), "float32", scope="local")
                for i in T.unroll(tm):
                    for v in T.vectorized(r):
                        acc[i, v] = T.float32(0)
                for b in range(indptr[row], indptr[row + 1]):
                    for j in range(c):
                        for i in T.unroll(tm):
                            for v in T.vectorized(r):
                                acc[i, v] = acc[i, v] + data[b, j, v] * x[tile * tm + i, indices[b] * c + j]
                for i in T.unroll(tm):
                    for v in T.vectorized(r):
                        y[tile * tm + i, row * r + v] = acc[i, v]

    return bsr_matmul


def dense_matmul_primfunc(m: int, k: int, n: int):
    """Y[m, Np] = X[m, k] @ W[k, n] (Np = n rounded up to 16; W's tail strip reads only its columns)."""
    from tvm.script import tirx as T

    strips = -(-n // DENSE_STRIP)
    full = n // DENSE_STRIP
    tail = n - full * DENSE_STRIP
    tm = row_tile(m)
    s = DENSE_STRIP

    @T.prim_func
    def dense_matmul(x: T.Buffer((m, k), "float32"), w: T.Buffer((k, n), "float32"), y: T.Buffer((m, strips * s), "float32")):
        T.func_attr({"tir.noalias": True})
        for strip in T.parallel(full):
            for tile in range(m // tm):
                acc = T.alloc_buffer((tm, s), "float32", scope="local")
                for i in T.unroll(tm):
                    for v in T.vectorized(s):
                        acc[i, v] = T.float32(0)
                for j in range(k):
                    for i in T.unroll(tm):
                        for v in T.vectorized(s):
                            acc[i, v] = acc[i, v] + w[j, strip * s + v] * x[tile * tm + i, j]
                for i in T.unroll(tm):
                    for v in T.vectorized(s):
                        y[tile * tm + i, strip * s + v] = acc[i, v]
        for row in range(m):
            for v in range(tail):
                y[row, full * s + v] = T.float32(0)
                for j in range(k):
                    y[row, full * s + v] = y[row, full * s + v] + w[j, full * s + v] * x[row, j]

    return dense_matmul

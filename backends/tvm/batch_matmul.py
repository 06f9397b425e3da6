"""A batched matmul of two activations (attention's Q x K^T and P x V) as a TVMScript kernel.

TVM 0.27's default CPU lowering leaves `relax.matmul` of two activations unscheduled: one thread, no
vectorisation (the CPU rules of `s_tir.dlight` cover GEMV and reductions, not matmul), about 100x slower
than onnxruntime on a BERT layer's attention. Attention matmuls are small and many (batch x heads of
[L, d] x [d, L]), so the kernel spreads (batch, row) pairs over the cores and, per row, accumulates
`a[i, k] * b[k, :]` into a register-resident tile of `nr` output columns: the rows of b stream through
once per tile while the row of a stays in cache.
"""

from __future__ import annotations

__all__ = ["batch_matmul_primfunc"]

_TILE = 64  # output columns per accumulator tile (4 AVX-512 registers)


def batch_matmul_primfunc(batch: int, m: int, k: int, n: int, dtype: str = "float32"):
    """`y[b, m, n] = a[b, m, k] @ w[b, k, n]` as a PrimFunc `(a, w, y)`."""
    from tvm.script import tirx as T

    nr = min(_TILE, n)
    tiles = -(-n // nr)
    last = n - nr  # the last tile ends at n, overlapping the one before when nr does not divide n

    @T.prim_func
    def batch_matmul(a: T.Buffer((batch, m, k), dtype), w: T.Buffer((batch, k, n), dtype), y: T.Buffer((batch, m, n), dtype)):
        T.func_attr({"tir.noalias": True})
        for row in T.parallel(batch * m):
            b, i = row // m, row % m
            acc = T.alloc_buffer((nr,), dtype, scope="global")
            for tile in range(tiles):
                n0 = T.min(tile * nr, last)
                for v in T.vectorized(nr):
                    acc[v] = T.cast(0, dtype)
                for j in range(k):
                    for v in T.vectorized(nr):
                        acc[v] = acc[v] + a[b, i, j] * w[b, j, n0 + v]
                for v in T.vectorized(nr):
                    y[b, i, n0 + v] = acc[v]

    return batch_matmul

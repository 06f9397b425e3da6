"""SparseGPT's weight update (Frantar & Alistarh, 2023): re-fit the weights a sparsity mask keeps.

Zeroing weights w_q of a linear layer y = W x changes its output by the removed weights times their
inputs. Optimal Brain Surgeon answers how the *kept* weights of the same row should move to cancel that,
measured on the layer's inputs: with H = Σ x xᵀ, removing weight q moves the row by
-(w_q / [H⁻¹]_qq) · H⁻¹[q, :]. SparseGPT makes this affordable for every row at once by visiting the
columns left to right and, after each column, updating only the columns to its right with one row of the
upper Cholesky factor U of H⁻¹ (U[i, i:] is H⁻¹ restricted to columns ≥ i, conditioned on the columns
already fixed); the updates are applied lazily per block of columns to keep the work in large matmuls.

`sparsegpt_update` keeps a given mask (the masked weights end exactly zero, nothing else becomes zero by
design); `sparsegpt_prune` also chooses the mask the way SparseGPT does, by the OBS saliency w² / U_ii²
of the weights as updated so far: per block of columns for unstructured sparsity, per group of M columns
for N:M.
"""

from __future__ import annotations

import torch

__all__ = ["sparsegpt_update", "sparsegpt_prune", "inverse_hessian_factor"]

Tensor = torch.Tensor


def inverse_hessian_factor(hessian: Tensor, damp: float = 0.01) -> Tensor:
    """The upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹, in float64.

    Inputs that never fired (zero diagonal) get a unit diagonal so H stays invertible; their weights
    then move only by their own removal.
    """
    h = hessian.to(torch.float64).clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += damp * diagonal.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def sparsegpt_update(weight: Tensor, hessian: Tensor, mask: Tensor, block: int = 128, damp: float = 0.01) -> Tensor:
    """`weight` [outputs, inputs] with the weights where `mask` is False set to zero and the kept ones
    updated to minimise ||(weight − result) X||² for inputs X with Σ x xᵀ = `hessian` [inputs, inputs].

    Returns a new tensor of `weight`'s dtype; the zeros are exactly where `mask` is False.
    """
    result, _ = _sweep(weight, hessian, block, damp, lambda w, d, start: mask[:, start : start + w.shape[1]])
    return result.to(weight.dtype)


def sparsegpt_prune(
    weight: Tensor, hessian: Tensor, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
    block: int = 128, damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT with its own mask: (updated weight, mask of kept weights).

    Either `sparsity` (unstructured: in each block of columns, that fraction of the weights with the lowest
    saliency goes) or `n_m` = (N, M) (N kept of every M consecutive inputs, chosen as each group is reached).
    """
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity or n_m")
    if n_m is not None:
        n, m = n_m
        if not 0 < n < m or weight.shape[1] % m:
            raise ValueError(f"N:M needs 0 < N < M and inputs ({weight.shape[1]}) a multiple of M; got {n}:{m}")
        block = max(m, block - block % m)  # a group of M never straddles two blocks
        result, mask = _sweep(weight, hessian, block, damp, lambda w, d, start: _keep_n_of_m(w, d, n), group=m)
    else:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        result, mask = _sweep(weight, hessian, block, damp, lambda w, d, start: _keep_most_salient(w, d, sparsity))
    return result.to(weight.dtype), mask


def _saliency(w: Tensor, d: Tensor) -> Tensor:
    """OBS: the output error of removing each weight alone, w² / [H⁻¹]_qq (here U_qq², conditioned on
    the columns already fixed)."""
    return w**2 / d.unsqueeze(0) ** 2


def _keep_most_salient(w: Tensor, d: Tensor, sparsity: float) -> Tensor:
    scores = _saliency(w, d).reshape(-1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores)[: round(sparsity * scores.numel())]] = False
    return keep.reshape(w.shape)


def _keep_n_of_m(w: Tensor, d: Tensor, n: int) -> Tensor:
    """`w` is one group of M columns: keep each row's N most salient."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.scatter_(1, torch.topk(_saliency(w, d), n, dim=1).indices, True)
    return keep


def _sweep(weight: Tensor, hessian: Tensor, block: int, damp: float, choose, group: int | None = None) -> tuple[Tensor, Tensor]:
    """SparseGPT's column sweep. `choose(w, u_diag, start)` gives the kept mask of columns
    `start : start + w.shape[1]` from their weights as updated so far and U's diagonal there; it is asked
    per block, or per `group` columns (N:M; `block` is then a multiple of `group`)."""
    w_all = weight.to(torch.float64).clone()
    u = inverse_hessian_factor(hessian, damp)
    rows, cols = w_all.shape
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w = w_all[:, start:end].clone()
        u_block = u[start:end, start:end]
        u_diag = torch.diagonal(u_block)
        keep = mask[:, start:end]
        errors = torch.zeros_like(w)
        step = group or end - start
        for i in range(end - start):
            if i % step == 0:
                keep[:, i : i + step] = choose(w[:, i : i + step], u_diag[i : i + step], start + i)
            column = w[:, i]
            kept = torch.where(keep[:, i], column, torch.zeros_like(column))
            errors[:, i] = (column - kept) / u_block[i, i]
            w[:, i:] -= errors[:, i : i + 1] * u_block[i : i + 1, i:]
            w[:, i] = kept  # exact zeros, whatever rounding in the update left
        w_all[:, start:end] = w
        w_all[:, end:] -= errors @ u[start:end, end:]
    return w_all, mask

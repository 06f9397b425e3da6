"""Low-rank adapters for recovery fine-tuning, merged back into the weights they adapt.

LoRA (Hu et al. 2021) trains, instead of a weight W [outputs, reduction], a product B·A of rank r added
to it: A [r, reduction] starts small and random, B [outputs, r] starts at zero, so training begins
exactly at the pruned model and touches r·(outputs + reduction) numbers per layer instead of
outputs·reduction. PERP (Zimmer et al. 2023) found such adapters recover most of what pruning costs at a
fraction of full fine-tuning's trained parameters.

Every MatMul/Gemm/Conv weight is adapted in the matrix view `SparsifyWeights` uses (a Conv weight
[O, I, kh, kw] as [O, I·kh·kw], a MatMul weight [K, N] as its transpose), so one adapter shape fits every
layer. A sparse weight's zeros are kept: the update is multiplied by the weight's nonzero mask, in
training and when merged, so what the adapter learns is exactly what the merged model computes.
After training, `merged()` gives W + mask ⊙ B·A per weight: the model written out has the original
graph, shapes and cost; the adapters leave no trace in it.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from pcc.compiler.torch_module import IRModule
from pcc.passes.transforms.sparsify_weights import sparse_weight_layers

__all__ = ["LowRankAdapters", "nonzero_masks"]


def nonzero_masks(student: IRModule, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Where each weight (2-D and up) holding exact zeros is nonzero, by initializer name.

    Exact zeros in a weight matrix are what `SparsifyWeights` (or a schedule) made: recovery must keep
    them, since Adam's momentum or an adapter's dense update would refill them. Vectors are left out: a
    zero bias is an initial value, not a pruning decision."""
    return {
        name: (p != 0).to(p.dtype) for name, p in student.named_weights()
        if (names is None or name in names) and p.dim() >= 2 and bool((p == 0).any())
    }


class LowRankAdapters(torch.nn.Module):
    """A rank-`rank` adapter B·A for every MatMul/Gemm/Conv weight of `model`, over `student`'s weights.

    `weights()` is the mapping of adapted weights to pass to `IRModule.forward(weights=...)`; the
    student's own weights stay frozen. A weight shared by several nodes gets one adapter. With
    `keep_zeros`, a weight's exact zeros stay zero (the update is masked).
    """

    def __init__(
        self, model: ir.Model, student: IRModule, rank: int, keep_zeros: bool = True, generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        layers = {layer.weight.name: layer for layer in sparse_weight_layers(model)}
        self._student = [student]  # a list, so the student's parameters are not registered twice
        self.names = list(layers)
        self._transposed = [layers[name].transposed for name in self.names]
        self._masks = nonzero_masks(student, set(self.names)) if keep_zeros else {}
        self.down = torch.nn.ParameterList()
        self.up = torch.nn.ParameterList()
        for name, transposed in zip(self.names, self._transposed):
            shape = student.weight(name).shape
            outputs, reduction = (shape[1], shape[0]) if transposed else (shape[0], math.prod(shape[1:]))
            r = min(rank, outputs, reduction)
            # A as nn.Linear initialises its weight (uniform within 1/sqrt(fan-in)), B zero: B·A = 0 at the start
            bound = 1.0 / math.sqrt(reduction)
            down = torch.empty(r, reduction, dtype=student.weight(name).dtype).uniform_(-bound, bound, generator=generator)
            self.down.append(torch.nn.Parameter(down))
            self.up.append(torch.nn.Parameter(torch.zeros(outputs, r, dtype=down.dtype)))

    def weights(self) -> dict[str, torch.Tensor]:
        """W + mask ⊙ B·A for every adapted weight, in the stored layout (differentiable in A and B)."""
        student = self._student[0]
        adapted = {}
        for name, transposed, down, up in zip(self.names, self._transposed, self.down, self.up):
            weight = student.weight(name)
            delta = up @ down
            delta = delta.t() if transposed else delta.reshape(weight.shape)
            if name in self._masks:
                delta = delta * self._masks[name]
            adapted[name] = weight + delta
        return adapted

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into its weight (the student then computes what it computed with them)
        and reset B to zero, so `weights()` stays equal to the student's own weights."""
        student = self._student[0]
        for name, value in self.weights().items():
            student.weight(name).copy_(value)
        for up in self.up:
            up.zero_()

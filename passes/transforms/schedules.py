"""When and how much to prune while training: one-shot, gradual (GMP) and iterative with rewinding (IMP).

Pruning all at once and then fine-tuning asks the surviving weights to recover from a large jump.
Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune") raises the sparsity during
training along a cubic ramp, s_t = S·(1 − (1 − t/T_ramp)³): fast at first, while the network still has
redundant weights to lose, slowly near S, so the last pruning steps cost little and the network adapts
between them. Iterative magnitude pruning with rewinding (Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis") trains, prunes the smallest weights, resets the
survivors to their values at an early step of the first training and trains again, for several rounds,
each removing the same fraction of what is left: after r of R rounds the sparsity is 1 − (1 − S)^(r/R).

The masks come from `SparsifyWeights` itself, run on the current weights, so every pattern
(unstructured, N:M, blocks) and allocator it has applies here with the same ranking: a schedule only
decides the sparsity at each point. Zeros already in a weight rank lowest, so masks only grow. N:M fixes
the sparsity at 1 − N/M; its schedules walk N down from M to the target N (nm:M−1:M, ... nm:N:M).

Two controls tell what a mask found this way is worth (Frankle & Carbin 2019): `random` masks rank the
surviving weights by random scores instead of magnitude, in the same pattern and per-layer amounts
(random pruning), and a rewind can `shuffle` each weight's stored values before restoring them: the
same mask, started from a random initialisation drawn from the same distribution as the stored one
(every value of the tensor, in a random order), so only the pairing of values with positions is lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from pcc.compiler.torch_module import IRModule
from pcc.passes.transforms.sparsify_weights import SparsifyWeights, SparsityPattern, sparse_weight_layers
from pcc.compiler.options import SCHEDULES

__all__ = ["MASK_SCORES", "SCHEDULES", "MagnitudeMasks", "WeightRewind", "cubic_sparsity", "round_sparsity"]

MASK_SCORES = ("magnitude", "random")  # what ranks the weights a mask keeps


def cubic_sparsity(step: int, ramp_steps: int, target: float) -> float:
    """Zhu & Gupta's sparsity after `step` of `ramp_steps` steps: 0 at the start, `target` from the
    end of the ramp on."""
    progress = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return target * (1.0 - (1.0 - progress) ** 3)


def round_sparsity(round_index: int, rounds: int, target: float) -> float:
    """The sparsity after round `round_index` (1-based) of `rounds`: each round prunes the same fraction
    of the remaining weights, 1 − (1 − target)^(1/rounds)."""
    return 1.0 - (1.0 - target) ** (round_index / rounds)


@dataclass
class MagnitudeMasks:
    """Masks for the student's Conv/Gemm/MatMul weights at a given sparsity, ranked by `SparsifyWeights`.

    `model` is the IR the student was built from: the current weights are written into it and the pass
    zeroes what it would remove, so the masks are exactly what `pcc compile --sparsify` would keep. With
    `score="random"` the pass ranks random scores (drawn from `seed`) in place of the weights, so the
    pattern and each layer's amount stay what magnitude would give, and zeros still rank lowest.
    """

    model: ir.Model
    pattern: str = "unstructured"
    allocator: str = "uniform"
    score: str = "magnitude"  # MASK_SCORES
    seed: int = 0

    def __post_init__(self) -> None:
        self._pattern = SparsityPattern.parse(self.pattern)
        self.names = list(dict.fromkeys(layer.weight.name for layer in sparse_weight_layers(self.model)))
        self._random = np.random.default_rng(self.seed)

    @property
    def target(self) -> float | None:
        """The sparsity the pattern itself fixes (N:M), or None."""
        return 1.0 - self._pattern.n / self._pattern.m if self._pattern.kind == "nm" else None

    def compute(self, student: IRModule, sparsity: float) -> dict[str, torch.Tensor]:
        """Where each weight survives at `sparsity` (of the weights, split by the allocator)."""
        pattern = self._pattern_at(sparsity)
        if sparsity <= 0 or pattern is None:
            return {}
        student.write_back(self.model)
        if self.score == "random":
            for name in self.names:
                value = self.model.graph.initializers[name]
                weights = value.const_value.numpy()
                scores = (1.0 + self._random.random(weights.shape)) * (weights != 0)  # in [1, 2): no new zeros
                value.const_value = ir.tensor(scores.astype(weights.dtype), name=name)
        SparsifyWeights(pattern, sparsity, self.allocator)(self.model)
        masks = {}
        for name in self.names:
            array = self.model.graph.initializers[name].const_value.numpy()
            masks[name] = torch.from_numpy(array != 0).to(student.weight(name).dtype)
        return masks

    def _pattern_at(self, sparsity: float) -> str | None:
        """N:M on the way to its target keeps more of every M: nm:n:M with n = M − floor(sparsity·M), from
        M−1 down to N (None while that is all M: nothing to prune yet)."""
        if self._pattern.kind != "nm":
            return self.pattern
        m = self._pattern.m
        kept = max(self._pattern.n, m - math.floor(sparsity * m + 1e-9))
        return f"nm:{kept}:{m}" if kept < m else None


class WeightRewind:
    """The trained weights at one step of training, to reset the survivors of a pruning round to."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def capture(self, student: IRModule, names: set[str]) -> None:
        self.values = {name: p.detach().clone() for name, p in student.named_weights() if name in names}

    @torch.no_grad()
    def restore(self, student: IRModule, masks: dict[str, torch.Tensor], shuffle: torch.Generator | None = None) -> None:
        """Every captured weight back to its value, or with `shuffle` to its values in a random order (a
        random re-initialisation from the same distribution); pruned entries (by `masks`) stay zero."""
        for name, value in self.values.items():
            if shuffle is not None:
                value = value.flatten()[torch.randperm(value.numel(), generator=shuffle)].reshape(value.shape)
            student.weight(name).copy_(value * masks[name] if name in masks else value)

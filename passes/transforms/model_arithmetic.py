"""Arithmetic on the weights of models that share a graph: sparse model soups and DARE deltas.

Two models fine-tuned from the same starting point lie in one basin of the loss, so their weights can be
combined without training. A *soup* (Wortsman et al. 2022; for sparse models, Zimmer et al. 2023,
"Sparse Model Soups") averages ingredients fine-tuned from one pruned model with different data orders
or hyper-parameters: the average often beats each ingredient and costs nothing at inference. Averaging
is only sparse when every ingredient has the same zeros, so a soup is refused unless the ingredients
share every initializer (name, shape) and the zero pattern of every weight.

DARE (Yu et al. 2024, "Language Models are Super Mario") treats a fine-tuned model as base + delta and
drops each delta entry with probability p, scaling the survivors by 1/(1 − p): the delta keeps its
expectation, and most fine-tuned deltas are so redundant that 90% of their entries can go. Sparse
deltas of models fine-tuned from one base interfere less, so DARE-d deltas of two tasks can be summed
into one model (`others`).

The result keeps the fine-tuned model's graph. Its float initializers that the base also has (same
name; the shape and dtype must agree) get base + delta'; the others (a task head added on top of the
base) have no delta and are kept as they are, listed in the report. Non-float initializers (shapes,
indices) are graph structure and stay the fine-tuned model's. Ingredients of a soup, and the models of
a merge, must share the whole graph: every initializer name, and equal non-float constants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.results import store

__all__ = ["AverageWeights", "DeltaReport", "DropAndRescaleDelta", "SoupReport", "float_initializers", "shared_initializers"]


def float_initializers(model: ir.Model) -> dict[str, np.ndarray]:
    """The model's floating point initializers as arrays (the weights arithmetic applies to)."""
    arrays = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None and value.const_value.dtype.is_floating_point():
            arrays[name] = value.const_value.numpy()
    return arrays


def shared_initializers(reference: ir.Model, other: ir.Model, reference_label: str, other_label: str,
                        same_graph: bool = True) -> list[str]:
    """The float initializers `other` shares with `reference` (by name), after checking they can be combined.

    A shared name must have one shape and dtype. With `same_graph` the two models must also have exactly
    the same initializer names, and equal non-float constants (shapes, indices: graph structure, not
    weights); without it, names only one model has are left out and non-float constants belong to
    `reference`'s graph. Raises `InvalidRequestError` naming the first tensor that differs.
    """
    mine, theirs = reference.graph.initializers, other.graph.initializers
    if same_graph:
        missing = next((n for n in mine if n not in theirs), None) or next((n for n in theirs if n not in mine), None)
        if missing is not None:
            where = other_label if missing not in theirs else reference_label
            raise InvalidRequestError(
                f"tensor '{missing}' is missing from {where}: the models do not share a graph (export them from one architecture)"
            )
    shared = []
    for name, value in mine.items():
        a, b = value.const_value, theirs[name].const_value if name in theirs else None
        if a is None or b is None:
            continue
        if a.dtype.is_floating_point() or b.dtype.is_floating_point():
            if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
                raise InvalidRequestError(
                    f"tensor '{name}' is {a.dtype.name}{list(a.shape)} in {reference_label} but {b.dtype.name}{list(b.shape)} "
                    f"in {other_label}: the models do not share a graph"
                )
            shared.append(name)
        elif same_graph and (a.dtype != b.dtype or not np.array_equal(a.numpy(), b.numpy())):
            raise InvalidRequestError(
                f"constant '{name}' differs between {reference_label} and {other_label}: the models do not share a graph"
            )
    return shared


def _replace(model: ir.Model, name: str, array: np.ndarray) -> None:
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(array.astype(value.const_value.dtype.numpy()), name=name)


@dataclass
class SoupReport:
    """What `AverageWeights` averaged."""

    META_KEY = "pcc.soup"
    PRODUCED_BY = "AverageWeights"

    ingredients: int
    tensors: int  # float initializers averaged
    params: int  # their elements
    weight_zeros: float  # zero fraction of the weights (2-D and up), the mask all ingredients share

    def summary(self) -> str:
        return (f"soup of {self.ingredients} models: {self.tensors} tensors ({self.params:,} numbers) averaged; "
                f"weights {100 * self.weight_zeros:.1f}% zero, the mask they share")


@dataclass
class AverageWeights(ir.passes.InPlacePass):
    """Replace every float initializer of the model by its mean over the model and `others` (a soup).

    The ingredients must share every initializer (name, shape, equal non-float constants) and, for every
    weight of two or more dimensions, the positions of its zeros: the average of models with different
    masks would be denser than each, and the soup would lose the sparsity it was pruned for. `labels`
    names the model and then each of `others` in refusals (default: "model 1", "model 2", ...).
    """

    others: Sequence[ir.Model] = field(repr=False)
    labels: Sequence[str] | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.others:
            raise InvalidRequestError("a soup needs at least two models")
        models = [model, *self.others]
        labels = list(self.labels) if self.labels is not None else [f"model {i + 1}" for i in range(len(models))]
        arrays = [float_initializers(m) for m in models]
        for other, label, theirs in zip(models[1:], labels[1:], arrays[1:]):
            shared_initializers(model, other, labels[0], label)
            for name, array in arrays[0].items():
                if array.ndim >= 2:
                    differ = int(np.count_nonzero((array == 0) != (theirs[name] == 0)))
                    if differ:
                        raise InvalidRequestError(
                            f"tensor '{name}' has a different zero pattern in {label} than in {labels[0]} ({differ} entries): "
                            "a soup averages models with one sparsity mask (fine-tune each from the same pruned model)"
                        )
        for name, array in arrays[0].items():
            mean = np.mean([theirs[name].astype(np.float64) for theirs in arrays], axis=0)
            _replace(model, name, mean)
        weights = [a for a in arrays[0].values() if a.ndim >= 2]
        total = sum(a.size for a in weights)
        store(model, SoupReport(
            ingredients=len(models), tensors=len(arrays[0]), params=sum(a.size for a in arrays[0].values()),
            weight_zeros=sum(int(np.count_nonzero(a == 0)) for a in weights) / total if total else 0.0,
        ))
        return ir.passes.PassResult(model, modified=True)


@dataclass
class DeltaReport:
    """What `DropAndRescaleDelta` did to the fine-tuned delta(s)."""

    META_KEY = "pcc.delta"
    PRODUCED_BY = "DropAndRescaleDelta"

    drop: float
    models: int  # fine-tuned models whose deltas were summed
    tensors: int  # initializers shared with the base (given base + delta')
    params: int  # their elements
    changed: int  # delta entries that were non-zero, all models together
    kept: int  # of them, kept (rescaled) after the drop
    own: list[str] = field(default_factory=list)  # initializers only the fine-tuned model has, kept as they are

    def summary(self) -> str:
        text = (f"delta: {self.models} fine-tuned model(s) on the base, {self.tensors} shared tensors ({self.params:,} numbers), "
                f"drop {self.drop:g}: {self.kept:,} of {self.changed:,} changed numbers kept, rescaled by {1 / (1 - self.drop):.4g}")
        return f"{text}; {len(self.own)} tensor(s) only in the fine-tuned model kept as they are" if self.own else text


@dataclass
class DropAndRescaleDelta(ir.passes.InPlacePass):
    """DARE: rewrite the (fine-tuned) model as `base` + its delta with each entry dropped with probability
    `drop` and the rest scaled by 1/(1 − drop); the DARE-d deltas of `others` (fine-tuned from the same
    base, with the model's graph) are added too, which merges them into one model.

    Initializers without a base (a task head) are the model's own, kept as they are. Every model draws
    its own drop mask from `seed`. `labels` names the model, then the base, then each of
    `others` in refusals.
    """

    base: ir.Model = field(repr=False)
    drop: float = 0.9
    seed: int = 0
    others: Sequence[ir.Model] = field(default=(), repr=False)
    labels: Sequence[str] | None = None

    def requires(self, model: ir.Model) -> None:
        if not 0 <= self.drop < 1:
            raise InvalidRequestError(f"--drop is a probability in [0, 1), got {self.drop}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        labels = list(self.labels) if self.labels is not None else (
            ["the fine-tuned model", "the base"] + [f"fine-tuned model {i + 2}" for i in range(len(self.others))]
        )
        names = shared_initializers(model, self.base, labels[0], labels[1], same_graph=False)
        for other, label in zip(self.others, labels[2:]):
            shared_initializers(model, other, labels[0], label)
        base = float_initializers(self.base)
        tuned = [float_initializers(m) for m in (model, *self.others)]
        rng = np.random.default_rng(self.seed)
        changed = kept = 0
        for name in names:
            total = base[name].astype(np.float64)
            for arrays in tuned:
                delta = arrays[name].astype(np.float64) - base[name]
                keep = rng.random(delta.shape) >= self.drop
                changed += int(np.count_nonzero(delta))
                kept += int(np.count_nonzero(delta * keep))
                total = total + np.where(keep, delta / (1.0 - self.drop), 0.0)
            _replace(model, name, total)
        own = [name for name in float_initializers(model) if name not in base]
        store(model, DeltaReport(
            drop=self.drop, models=len(tuned), tensors=len(names), params=sum(base[n].size for n in names),
            changed=changed, kept=kept, own=own,
        ))
        return ir.passes.PassResult(model, modified=True)

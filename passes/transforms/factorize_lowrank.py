"""FactorizeLowRank: replace weight matrices by products of two thin ones (truncated SVD).

Channel pruning removes whole units, so every layer that reads or writes them narrows with them. Low rank
keeps every unit and shrinks what is inside a layer instead: a weight M [outputs, reduction] becomes
L·R with L [outputs, r] and R [r, reduction], the best rank-r approximation by truncated SVD
(M = P·S·Qᵀ, L = P_r·√S_r, R = √S_r·Q_rᵀ: the singular values split evenly, so the two factors have equal
scale and fine-tune equally well). The layer then costs r·(outputs + reduction) weights and MACs per
output position instead of outputs·reduction, which saves only where r·(outputs + reduction) <
outputs·reduction; a layer whose chosen rank does not save is left whole.

Weights are seen in the matrix view `SparsifyWeights` and LoRA use (`sparse_weight_layers`): a MatMul
weight [K, N] transposed, a Gemm B as its transB says, a Conv weight [O, I, kh, kw] as [O, I·kh·kw]. A
MatMul becomes two MatMuls, a Gemm two Gemms (bias on the second), and a k×k Conv TRP's channel-wise
decomposition (Xu et al., "Trained Rank Pruning", IJCAI 2020): a k×k Conv to r channels with the original
strides, pads and dilations, then a 1×1 Conv to the outputs carrying the bias. Grouped convolutions and
Gemms with transA are not factorised.

The ranks come from a `RankAllocation` (`passes/allocation/ranks.py`) or are given directly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.results import fetch, invalidate, store
from pcc.passes.transforms.sparsify_weights import SparseLayer, sparse_weight_layers

__all__ = [
    "Decomposition",
    "FactorizeLowRank",
    "FactorizeReport",
    "LowRankLayer",
    "decompose",
    "factorizable_layers",
    "factorize",
    "low_rank_factors",
    "low_rank_weight",
]


@dataclass(frozen=True)
class LowRankLayer:
    """A weight that can be factorised: its matrix view [outputs, reduction] and where it is applied."""

    node: str
    op_type: str  # Conv | Gemm | MatMul
    weight: str  # the initializer's name
    outputs: int  # rows of the matrix view (n)
    reduction: int  # columns (k: the inputs times the kernel positions of a Conv)
    positions: int  # output positions per inference (symbolic axes count as 1): MACs = positions x weights

    @property
    def full_rank(self) -> int:
        return min(self.outputs, self.reduction)

    @property
    def dense_params(self) -> int:
        return self.outputs * self.reduction

    def params(self, rank: int | None) -> int:
        """Weights at this rank; `None` (or a rank that does not save) is the layer left whole."""
        return self.dense_params if rank is None or not self.saves(rank) else rank * (self.outputs + self.reduction)

    def macs(self, rank: int | None) -> int:
        return self.positions * self.params(rank)

    def saves(self, rank: int) -> bool:
        return rank * (self.outputs + self.reduction) < self.dense_params

    @property
    def max_saving_rank(self) -> int:
        """The largest rank that still saves (0 when none does: a layer with a single output or input)."""
        return (self.dense_params - 1) // (self.outputs + self.reduction)


def _factorizable(layer: SparseLayer, node: ir.Node) -> bool:
    if layer.op_type == "Conv":
        return node.attributes.get_int("group", 1) == 1 and len(layer.weight.const_value.shape) >= 3
    return len(layer.weight.const_value.shape) == 2


def factorizable_layers(model: ir.Model, only: Collection[str] | None = None) -> list[LowRankLayer]:
    """The Conv (groups = 1), Gemm (no transA) and MatMul nodes with a constant float weight, in graph
    order; `only` restricts them to these weight names."""
    nodes = {node.name: node for node in model.graph}
    found = []
    for layer in sparse_weight_layers(model):
        node = nodes[layer.node]
        if (only is not None and layer.weight.name not in only) or not _factorizable(layer, node):
            continue
        outputs, reduction = layer.matrix().shape
        found.append(LowRankLayer(layer.node, layer.op_type, layer.weight.name, outputs, reduction, _positions(node, layer)))
    return found


def _positions(node: ir.Node, layer: SparseLayer) -> int:
    """Output positions the matrix is applied at: the output's elements over its channels."""
    shape = node.outputs[0].shape
    if shape is None:
        return 1
    dims = [d if isinstance(d, int) else 1 for d in shape]
    channels = dims[1] if layer.op_type == "Conv" else dims[-1]
    return max(1, int(np.prod(dims, dtype=np.int64)) // max(channels, 1))


@dataclass(frozen=True)
class Decomposition:
    """A matrix's SVD M = P·S·Qᵀ (float64) with the singular values split as √σ to each side, so that the
    first r columns of `left` times the first r rows of `right` are the best rank-r approximation. Computed
    once per layer: sweeps ask for many ranks."""

    left: np.ndarray  # P·√S [outputs, full rank]
    right: np.ndarray  # √S·Qᵀ [full rank, reduction]
    singular: np.ndarray  # descending

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return self.left[:, :rank], self.right[:rank]


def decompose(matrix: np.ndarray) -> Decomposition:
    """The SVD on one thread: a layer's matrix is small, and on a loaded machine BLAS threads waiting for
    each other made numpy's multi-threaded SVD of a 128 x 576 matrix take 0.2-6 s instead of 30 ms."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p, s, qt = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(np.array(matrix, dtype=np.float64)), full_matrices=False))
    finally:
        torch.set_num_threads(threads)
    root = np.sqrt(s)
    return Decomposition(p * root, root[:, None] * qt, s)


def low_rank_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """L [outputs, rank], R [rank, reduction] with L·R the best rank-`rank` approximation of `matrix`."""
    return decompose(matrix).factors(rank)


def low_rank_weight(layer: SparseLayer, rank: int, decomposition: Decomposition | None = None) -> np.ndarray:
    """The layer's weight in its stored layout, replaced by its rank-`rank` approximation (same shape);
    `decomposition` is the layer's matrix's, when already computed."""
    left, right = (decomposition or decompose(layer.matrix())).factors(rank)
    array = layer.weight.const_value.numpy()
    approx = left @ right
    return np.ascontiguousarray(approx.T if layer.transposed else approx.reshape(array.shape), dtype=array.dtype)


@dataclass
class LayerFactorization:
    node: str
    op_type: str
    shape: tuple[int, int]  # matrix view [outputs, reduction]
    rank: int | None  # None: left whole
    params_before: int
    params_after: int


@dataclass
class FactorizeReport:
    """What `FactorizeLowRank` did, per layer."""

    META_KEY = "pcc.factorize"
    PRODUCED_BY = "FactorizeLowRank"

    layers: list[LayerFactorization] = field(default_factory=list)

    @property
    def factorized(self) -> list[LayerFactorization]:
        return [layer for layer in self.layers if layer.rank is not None]

    def summary(self) -> str:
        before = sum(layer.params_before for layer in self.layers)
        after = sum(layer.params_after for layer in self.layers)
        ranks = ", ".join(f"{layer.rank}/{min(layer.shape)}" for layer in self.factorized)
        return (f"{len(self.factorized)}/{len(self.layers)} layers factorised (ranks {ranks or 'none'}), "
                f"their weights {before:,} -> {after:,}")


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name, index = base, 1
    while name in graph.initializers:
        name, index = f"{base}_{index}", index + 1
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, node: ir.Node, layer: SparseLayer, rank: int) -> None:
    """Insert the first factor's node before `node` and turn `node` into the second factor's."""
    dtype = layer.weight.const_value.numpy().dtype
    left, right = (f.astype(dtype) for f in low_rank_factors(layer.matrix(), rank))
    x, y, weight = node.inputs[0], node.outputs[0], layer.weight.name
    hidden = ir.Value(name=f"{y.name}.lowrank", type=y.type)
    if y.shape is not None:
        dims = list(y.shape)
        dims[1 if node.op_type == "Conv" else -1] = rank
        hidden.shape = ir.Shape(dims)
    kept = dict(node.attributes)
    if node.op_type == "MatMul":
        first = ir.Node("", "MatMul", [x, _initializer(graph, f"{weight}.lowrank_r", right.T.copy())], outputs=[hidden])
        second_weight = _initializer(graph, f"{weight}.lowrank_l", left.T.copy())
    elif node.op_type == "Gemm":
        first_attrs = [ir.AttrInt64("transB", 1)] + [kept[a] for a in ("alpha",) if a in kept]
        first = ir.Node("", "Gemm", [x, _initializer(graph, f"{weight}.lowrank_r", right)], first_attrs, outputs=[hidden])
        second_weight = _initializer(graph, f"{weight}.lowrank_l", left)
        node.attributes.pop("alpha", None)
        node.attributes["transB"] = ir.AttrInt64("transB", 1)
    else:  # Conv: k x k to `rank` channels with the original geometry, then 1 x 1 to the outputs
        kernel = layer.weight.const_value.shape[2:]
        first_weight = _initializer(graph, f"{weight}.lowrank_r", right.reshape(rank, -1, *kernel))
        first = ir.Node("", "Conv", [x, first_weight], list(kept.values()), outputs=[hidden])
        second_weight = _initializer(graph, f"{weight}.lowrank_l", left.reshape(*left.shape, *([1] * len(kernel))))
        for name in ("strides", "pads", "dilations", "auto_pad"):
            node.attributes.pop(name, None)
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [1] * len(kernel))
    first.name = f"{node.name}.lowrank"
    graph.insert_before(node, first)
    node.replace_input_with(0, hidden)
    node.replace_input_with(1, second_weight)


def factorize(model: ir.Model, ranks: Mapping[str, int | None], only_where_saving: bool = True) -> FactorizeReport:
    """Factorise each weight named in `ranks` (weight name -> rank) at its rank, in place; a `None` rank, or
    one that does not save weights (unless `only_where_saving` is off: to check the rewrite at full rank),
    leaves the layer whole."""
    graph = model.graph
    nodes = {node.name: node for node in graph}
    report = FactorizeReport()
    described = {layer.weight: layer for layer in factorizable_layers(model, set(ranks))}
    for layer in sparse_weight_layers(model):
        info = described.get(layer.weight.name)
        if info is None or info.node != layer.node:
            continue
        rank = ranks[layer.weight.name]
        if rank is not None and only_where_saving and not info.saves(rank):
            rank = None
        if rank is not None:
            _rewrite(graph, nodes[layer.node], layer, rank)
        report.layers.append(LayerFactorization(
            layer.node, layer.op_type, (info.outputs, info.reduction), rank, info.dense_params,
            info.dense_params if rank is None else rank * (info.outputs + info.reduction),
        ))
    for name in [name for name, value in graph.initializers.items() if not value.uses() and not value.is_graph_output()]:
        if name in ranks:
            graph.initializers.pop(name)
    return report


@dataclass
class FactorizeLowRank(ir.passes.InPlacePass):
    """Factorise the weights at `ranks` (weight name -> rank), or, without it, at the ranks of the
    `RankAllocation` an allocation pass left on the model; stores a `FactorizeReport`."""

    ranks: Mapping[str, int | None] | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ranks = self.ranks
        if ranks is None:
            from pcc.passes.allocation.ranks import RankAllocation  # it imports this module

            ranks = fetch(model, RankAllocation).ranks_by_weight()
        report = factorize(model, ranks)
        if report.factorized:
            invalidate(model, DependencyGroups)  # its tensors and axes name weights that are gone
        store(model, report)
        return ir.passes.PassResult(model, modified=bool(report.factorized))

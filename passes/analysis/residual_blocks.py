"""FindResidualBlocks: residual branches that can be dropped whole (x + f(x) → x), and how much each matters.

A residual Add whose one input `x` is an ancestor of the other, `f(x)`, closes a branch: the nodes that
descend from `x` and lead to `f(x)`. The branch can go if nothing outside it reads any of its values.
A LayerNormalization right after the Add belongs to the block when the branch does not normalise its
own input (post-norm transformers write LN(x + f(x)); pre-norm ones x + f(LN(x)), and the LN after
their last Add is the model's final norm), so bypassing a block means its output becomes its input. In a transformer an
attention block directly followed by an MLP block is one *layer*, and layers are what get dropped.

Influence is ShortGPT's: 1 − cos(input, output) of the block, averaged over calibration tokens. A block
that barely turns its input is one the network can lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.passes.analysis.dependency_groups import is_parameter
from pcc.passes.results import store

__all__ = ["ResidualBlock", "ResidualBlocks", "FindResidualBlocks", "find_residual_blocks", "block_influence"]


@dataclass(frozen=True)
class ResidualBlock:
    name: str
    entry: str  # the value the block reads
    exit: str  # the value that becomes `entry` when the block is dropped
    nodes: tuple[str, ...]
    params: int  # weight elements only this block uses
    attention: bool  # the block holds an attention softmax
    influence: float | None = None  # 1 - cos(entry, exit) on calibration data

    def to_json(self) -> dict:
        return {"name": self.name, "entry": self.entry, "exit": self.exit, "nodes": len(self.nodes),
                "params": self.params, "attention": self.attention, "influence": self.influence}


@dataclass
class ResidualBlocks:
    META_KEY = "pcc.residual_blocks"
    PRODUCED_BY = "FindResidualBlocks"

    blocks: list[ResidualBlock]

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)


def _ancestors(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [value.producer()] if value.producer() is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return seen


def _descendants(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [use.node for use in value.uses()]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(use.node for out in node.outputs for use in out.uses())
    return seen


def _shape_only(node: ir.Node, memo: dict[ir.Node, bool]) -> bool:
    """A Shape op, or arithmetic on shapes and constants only: exporters compute every layer's reshape
    targets from the model input's Shape, which reads no data and may be shared by any block."""
    if node not in memo:
        integer = all(out.dtype in (ir.DataType.INT64, ir.DataType.INT32) for out in node.outputs)
        memo[node] = node.op_type in ("Shape", "Size") or (
            integer and node.op_type != "Constant" and all(
                v is None or v.const_value is not None or (v.producer() is not None and _shape_only(v.producer(), memo))
                for v in node.inputs
            ) and any(v is not None and v.producer() is not None for v in node.inputs)
        )
    return memo[node]


def _branch(add: ir.Node, skip: ir.Value, branch_out: ir.Value, outputs: set[ir.Value]) -> set[ir.Node] | None:
    """The nodes of `branch_out = f(skip)`, if `skip` feeds it and nothing outside reads the branch's data
    (its shape arithmetic may be shared: it stays, or goes with the unused nodes)."""
    memo: dict[ir.Node, bool] = {}
    nodes = {n for n in _ancestors(branch_out) & _descendants(skip) if not _shape_only(n, memo)}
    if not nodes or branch_out.producer() not in nodes:
        return None
    for node in nodes:
        for out in node.outputs:
            if out in outputs or any(use.node not in nodes and use.node is not add for use in out.uses()):
                return None
    return nodes


def _only_consumer(value: ir.Value) -> ir.Node | None:
    users = {use.node for use in value.uses()}
    return users.pop() if len(users) == 1 else None


def _block_params(nodes: set[ir.Node]) -> int:
    weights = {v for n in nodes for v in n.inputs if v is not None and is_parameter(v)}
    return sum(v.const_value.size for v in weights if all(use.node in nodes for use in v.uses()))


def find_residual_blocks(model: ir.Model) -> list[ResidualBlock]:
    """Residual blocks in graph order, consecutive attention + MLP blocks merged into layers."""
    outputs = set(model.graph.outputs)
    units = []
    for add in model.graph:
        if add.op_type != "Add" or len(add.inputs) != 2 or any(v.const_value is not None for v in add.inputs):
            continue
        for skip, branch_out in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            nodes = _branch(add, skip, branch_out, outputs)
            if nodes is None:
                continue
            nodes.add(add)
            exit_value = add.outputs[0]
            norm = _only_consumer(exit_value)
            pre_norm = any(use.node.op_type == "LayerNormalization" and use.node in nodes for use in skip.uses())
            if not pre_norm and norm is not None and norm.op_type == "LayerNormalization" and exit_value not in outputs:
                nodes.add(norm)
                exit_value = norm.outputs[0]
            units.append((add.name, skip, exit_value, nodes))
            break
    merged = []
    for name, entry, exit_value, nodes in units:
        attention = any(n.op_type == "Softmax" for n in nodes)
        previous = merged[-1] if merged else None
        if previous and previous[4] and not attention and previous[2] is entry and not previous[5]:
            merged[-1] = (previous[0], previous[1], exit_value, previous[3] | nodes, True, True)
        else:
            merged.append((name, entry, exit_value, nodes, attention, False))
    order = {node: i for i, node in enumerate(model.graph)}
    return [
        ResidualBlock(
            name=f"layer:{name}" if is_layer else name, entry=entry.name, exit=exit_value.name,
            nodes=tuple(n.name for n in sorted(nodes, key=order.__getitem__)), params=_block_params(nodes),
            attention=attention,
        )
        for name, entry, exit_value, nodes, attention, is_layer in merged
    ]


def block_influence(model: ir.Model, blocks: list[ResidualBlock], calibration: CalibrationData) -> list[float]:
    """1 - cos(entry, exit) per block, over every row of the last axis of all calibration batches."""
    from pcc.backends.onnx.runtime import session

    proto = ir.serde.serialize_model(model)
    names = list(dict.fromkeys(name for b in blocks for name in (b.entry, b.exit)))
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    sess = session(proto.SerializeToString())
    sums, counts = np.zeros(len(blocks)), np.zeros(len(blocks))
    for batch in calibration:
        values = dict(zip(names, sess.run(names, batch)))
        for i, block in enumerate(blocks):
            a, b = values[block.entry], values[block.exit]
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            sums[i] += float((1.0 - cos).sum())
            counts[i] += len(cos)
    return (sums / np.maximum(counts, 1)).tolist()


@dataclass
class FindResidualBlocks(ir.passes.InPlacePass):
    """Analysis: droppable residual blocks (transformer layers, ResNet blocks), with influence when given data."""

    calibration: CalibrationData | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = find_residual_blocks(model)
        if self.calibration is not None and blocks:
            influence = block_influence(model, blocks, self.calibration)
            blocks = [ResidualBlock(**{**b.__dict__, "influence": s}) for b, s in zip(blocks, influence)]
        store(model, ResidualBlocks(blocks))
        return ir.passes.PassResult(model, False)

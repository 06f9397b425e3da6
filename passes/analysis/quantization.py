"""Quantized models: what `FoldQuantization` lifted to float (to be put back), and what to tell a user
whose quantization pcc cannot lift.

onnxruntime's QDQ format keeps weights as integers behind DequantizeLinear and puts a Quantize/Dequantize
pair on activations between float ops. `FoldQuantization` turns both into float for the analyses and
records them here (`FoldedQuantization`), and `RestoreQuantization` quantizes the pruned model again.
Integer ops (QLinearConv, MatInteger) and the QDQ forms it does not lift still stop the channels; both
refusals that meet them (nothing to prune, no attention) end with the same hint, from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.passes.results import TracksKeptChannels

__all__ = ["ActivationQuantization", "FoldedQuantization", "QUANTIZATION_OPS", "WeightQuantization", "quantized_model_hint"]

QUANTIZATION_OPS = frozenset(
    ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")
)


def quantized_model_hint(model: ir.Model) -> str:
    """"; the model is quantized (...): prune the float model, then quantize the result", naming one of its
    quantization nodes, or "" for a float model."""
    quantized = [node for node in model.graph if node.op_type in QUANTIZATION_OPS]
    if not quantized:
        return ""
    # an integer op is what stops the channels (FoldQuantization lifts the QDQ pairs it can): name one first
    quantized.sort(key=lambda node: node.op_type in ("QuantizeLinear", "DequantizeLinear"))
    return (f"; the model is quantized ({len(quantized)} quantization ops stop the channels, e.g. {quantized[0].op_type} "
            f"'{quantized[0].name}'): prune the float model, then quantize the result")


@dataclass(frozen=True)
class WeightQuantization:
    """An integer initializer behind a DequantizeLinear, now the float initializer `name`."""

    name: str  # the float weight (the DequantizeLinear's output)
    node: str  # the DequantizeLinear
    integer: str  # the integer initializer's name
    scale_name: str
    zero_point_name: str | None
    scale: np.ndarray  # per tensor (size 1) or along `axis`
    zero_point: np.ndarray  # same shape as scale; its dtype is the integer type
    axis: int | None  # None: per tensor


@dataclass(frozen=True)
class ActivationQuantization:
    """A QuantizeLinear → DequantizeLinear pair on activation `value` (per tensor), and who read its output."""

    value: str
    quantize: str  # the QuantizeLinear
    dequantize: str
    scale: np.ndarray
    zero_point: np.ndarray
    quantize_attributes: tuple[ir.Attr, ...]
    readers: tuple[tuple[str, int], ...]  # (node name, input index) that read the dequantized value
    graph_output: str | None = None  # the model output the dequantized value was (the float tensor has its name)


@dataclass
class FoldedQuantization(TracksKeptChannels):
    """What `FoldQuantization` lifted to float; the kept channels let `RestoreQuantization` slice per-channel
    scales to the pruned weights."""

    META_KEY = "pcc.folded_quantization"
    PRODUCED_BY = "FoldQuantization"

    weights: list[WeightQuantization] = field(default_factory=list)
    activations: list[ActivationQuantization] = field(default_factory=list)
    kept: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)
    restored: tuple[int, int] | None = None  # weights, activation pairs put back

    def summary(self) -> str:
        text = f"quantization folded to float: {len(self.weights)} weights, {len(self.activations)} activation pairs"
        if self.restored is not None:
            text += f"; restored {self.restored[0]} weights, {self.restored[1]} pairs"
        return text

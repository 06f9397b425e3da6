"""FoldConstants: every weight becomes a plain initializer before analysis.

Pruning slices weight tensors, so a weight must be a tensor and not the output of a node: old model-zoo
files build weights with ConstantOfShape, exporters leave Transpose/Cast of weights or Constant nodes.
onnxscript's folder does the evaluation; by default it keeps ConstantOfShape and large tensors unfolded
to save file size, which is the opposite of what pruning needs, so every foldable node is folded here.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer._constant_folding import FoldConstantsPass

__all__ = ["FoldConstants"]

_NEVER_FOLD = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"}
_NO_LIMIT = 1 << 62


def _fold_everything(node: ir.Node) -> bool | None:
    return None if node.op_type in _NEVER_FOLD else True


@dataclass
class FoldConstants(ir.passes.InPlacePass):
    """Transform: evaluate constant subgraphs and turn every constant into an initializer."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = FoldConstantsPass(
            shape_inference=False,
            input_size_limit=_NO_LIMIT,
            output_size_limit=_NO_LIMIT,
            should_fold=_fold_everything,
        )(model)
        lifted = common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        cleaned = common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, folded.modified or lifted.modified or cleaned.modified)

"""RecalibrateBatchNorm: re-estimate BatchNorm statistics of a pruned model on calibration data.

A removed channel took its mean activation with it, so every layer after a pruned one sees inputs whose
mean and variance differ from what its BatchNorm was trained on; the stale statistics, not the lost
channels, cause most of the accuracy drop of a pruned network before fine-tuning (EagleEye, Li et al.,
ECCV 2020). One forward pass over a few hundred calibration samples re-estimates them: no gradients,
no labels, seconds. The graph is unchanged; only the running-mean and running-variance initializers
get new values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError

__all__ = ["RecalibrateBatchNorm", "reestimate_batchnorm_statistics"]


def reestimate_batchnorm_statistics(model: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]) -> bool:
    """Re-estimate `model`'s BatchNorm statistics in place over `batches`; False if it has no BatchNorm."""
    if not any(node.op_type == "BatchNormalization" for node in model.graph):
        return False
    import torch

    from pcc.compiler.torch_module import IRModule

    module = IRModule(model)
    with torch.no_grad():
        module.recalibrate_batchnorm(batches)
    module.write_back(model)
    return True


@dataclass
class RecalibrateBatchNorm(ir.passes.InPlacePass):
    """Transform: running statistics of every BatchNormalization re-estimated on `data` (real data only)."""

    data: CalibrationData = field(repr=False)

    def requires(self, model: ir.Model) -> None:
        if self.data.synthetic:
            raise InvalidRequestError("BatchNorm recalibration needs real calibration data, not random inputs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, reestimate_batchnorm_statistics(model, self.data))

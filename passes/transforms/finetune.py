"""Recovery: a short fine-tune of a (pruned) model through its differentiable copy, written back in place.

Pruning removes capacity the remaining weights were not trained to do without; a short fine-tune lets
them take over. The model runs as an `IRModule` (the ONNX graph interpreted with torch ops), its float
initializers are trained, and the new values are copied back into the same initializers, so the result
is the same graph with new weights and leaves through the usual ONNX backend.

The loss is cross-entropy on labels, knowledge distillation from a teacher (usually the dense model:
KL divergence between temperature-softened outputs, Hinton et al. 2015), or both mixed by `alpha`.
Non-classifier outputs are distilled by mean squared error. BatchNorm runs in inference mode with its
running statistics fixed, as is usual for short fine-tunes: a few hundred steps cannot re-estimate them
and a batch's statistics would make the result depend on the fine-tuning batch size.

Weights that are exactly zero stay zero (`keep_zeros`): a model from `--sparsify` is fine-tuned as a sparse
model (masked fine-tuning), so its sparsity pattern and the speed-up it buys survive recovery.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.torch_module import IRModule
from pcc.passes.results import store

__all__ = ["FineTune", "FineTuneReport"]


@dataclass
class FineTuneReport:
    """What `FineTune` did: steps, losses at the start and end, and time."""

    META_KEY = "pcc.finetune"
    PRODUCED_BY = "FineTune"

    epochs: int
    steps: int
    loss: str
    first_loss: float
    last_loss: float
    seconds: float

    def summary(self) -> str:
        return (
            f"fine-tune: {self.epochs} epoch(s), {self.steps} steps, {self.loss} loss "
            f"{self.first_loss:.4f} -> {self.last_loss:.4f} ({self.seconds:.1f} s)"
        )


@dataclass
class FineTune(ir.passes.InPlacePass):
    """Train the model's float weights on `data` (labels and/or a `teacher`), then write them back.

    `lr` is Adam's peak learning rate, decayed to zero over the run by a cosine schedule; the average
    loss over the first and the last tenth of the steps is reported.
    """

    data: CalibrationData = field(repr=False)
    teacher: ir.Model | None = field(default=None, repr=False)
    epochs: int = 1
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the distillation loss when both labels and a teacher are given
    seed: int = 0
    keep_zeros: bool = True  # weights (2-D and up) that are exactly zero stay zero: a sparsified model stays sparse
    progress: bool = field(default=False, repr=False)

    def requires(self, model: ir.Model) -> None:
        if self.epochs < 1:
            raise InvalidRequestError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise InvalidRequestError(f"--lr must be positive, got {self.lr}")
        if self.teacher is None and self.data.labels is None:
            raise InvalidRequestError(
                f"fine-tuning needs labels in the data ({self.data.source} has no 'labels' array) or a teacher model"
            )
        if self.data.synthetic:
            raise InvalidRequestError("fine-tuning needs real data, not random inputs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from pcc.backends.onnx.runtime import session

        torch.manual_seed(self.seed)
        student = IRModule(model)
        student.train()
        teacher = None
        if self.teacher is not None:
            teacher = session(ir.serde.serialize_model(self.teacher).SerializeToString())
        steps = max(1, self.epochs * self.data.num_batches)
        optimizer = torch.optim.Adam([p for _, p in student.named_weights()], lr=self.lr)
        masks = self._nonzero_masks(student) if self.keep_zeros else []
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))
        losses: list[float] = []
        start = time.perf_counter()
        for epoch in range(self.epochs):
            bar = f"fine-tune {epoch + 1}/{self.epochs}" if self.progress else None
            for feeds, labels in self.data.batches(progress=bar, shuffle_seed=self.seed + epoch):
                outputs = student(feeds)
                targets = teacher.run(None, feeds) if teacher is not None else None
                loss = self._loss(outputs, labels, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for parameter, mask in masks:
                        parameter.mul_(mask)
                schedule.step()
                losses.append(float(loss.detach()))
        student.write_back(model)
        tenth = max(1, len(losses) // 10)
        store(
            model,
            FineTuneReport(
                epochs=self.epochs, steps=len(losses), loss=self._loss_name(),
                first_loss=float(np.mean(losses[:tenth])), last_loss=float(np.mean(losses[-tenth:])),
                seconds=time.perf_counter() - start,
            ),
        )
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _nonzero_masks(student: IRModule) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(weight, where it is nonzero) for the weights holding exact zeros. Zeroed weights are what
        SparsifyWeights made; Adam's momentum would refill them, so they are re-zeroed after every step.
        Vectors are left out: a zero bias is an initial value, not a pruning decision."""
        return [(p, (p != 0).to(p.dtype)) for _, p in student.named_weights() if p.dim() >= 2 and bool((p == 0).any())]

    def _loss_name(self) -> str:
        if self.teacher is None:
            return "cross-entropy"
        return "distillation + cross-entropy" if self.data.labels is not None else "distillation"

    def _loss(self, outputs: list[torch.Tensor], labels: np.ndarray | None, targets: list[np.ndarray] | None) -> torch.Tensor:
        logits = outputs[0]
        hard = None
        if labels is not None:
            if logits.dim() != 2:
                raise InvalidRequestError(f"labels need a classifier: the model's first output has shape {tuple(logits.shape)}")
            hard = F.cross_entropy(logits, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        if targets is None:
            return hard
        soft = sum(self._distill(out, torch.from_numpy(np.asarray(ref))) for out, ref in zip(outputs, targets))
        return soft if hard is None else self.alpha * soft + (1 - self.alpha) * hard

    def _distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.dim() == 2 and student.shape[1] > 1:
            t = self.temperature
            return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True) * t * t
        return F.mse_loss(student, teacher)

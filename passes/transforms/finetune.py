"""Recovery: a short fine-tune of a (pruned) model through its differentiable copy, written back in place.

Pruning removes capacity the remaining weights were not trained to do without; a short fine-tune lets
them take over. The model runs as an `IRModule` (the ONNX graph interpreted with torch ops), its float
initializers are trained, and the new values are copied back into the same initializers, so the result
is the same graph with new weights and leaves through the usual ONNX backend.

The loss is cross-entropy on labels, knowledge distillation from a teacher (usually the dense model:
KL divergence between temperature-softened outputs, Hinton et al. 2015), or both mixed by `alpha`.
Non-classifier outputs are distilled by mean squared error. A causal language model (`causal_lm`) is
trained on text windows by next-token cross-entropy (its labels are its own input_ids, shifted), and
distilled per token over the vocabulary. BatchNorm runs in inference mode with its
running statistics fixed, as is usual for short fine-tunes: a few hundred steps cannot re-estimate them
and a batch's statistics would make the result depend on the fine-tuning batch size.

Weights that are exactly zero stay zero (`keep_zeros`): a model from `--sparsify` is fine-tuned as a sparse
model (masked fine-tuning), so its sparsity pattern and the speed-up it buys survive recovery.

What is trained (`params`) trades recovery for cost. `all` trains every float weight. `bn-bias` trains only
biases and normalisation scales and shifts: PERP (Zimmer et al. 2023) found that after pruning most of
the damage is a shift of each layer's output distribution, which these few parameters can undo (with
BatchNorm folded away, the conv/linear biases carry it). `lora` adds a low-rank adapter to every weight
matrix (`lora.LowRankAdapters`) and trains the adapters with the biases and norms; the adapters are
merged into the weights before writing, so the output has the input's graph and cost.

`nuclear_norm` λ adds Trained Rank Pruning's regulariser (Xu et al., IJCAI 2020) to the loss: λ·Σ‖W‖_*
over the weights `--factorize lowrank` can factorise, each in its matrix view (a Conv [O, I, kh, kw] as
[O, I·kh·kw], TRP's channel-wise view). The nuclear norm is the convex surrogate of the rank: its
gradient shrinks every singular value alike, so the small ones reach zero first and a later truncated
SVD drops less energy.
"""

from __future__ import annotations

import math
import time
from itertools import islice
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import FINETUNE_PARAMS, SPARSIFY_ALLOCATORS, check_sparsity
from pcc.compiler.torch_module import IRModule, trainable_initializers
from pcc.passes.results import store
from pcc.passes.transforms.factorize_lowrank import factorizable_layers
from pcc.passes.transforms.lora import LowRankAdapters, nonzero_masks
from pcc.passes.transforms.schedules import MASK_SCORES, SCHEDULES, MagnitudeMasks, WeightRewind, cubic_sparsity, round_sparsity
from pcc.passes.transforms.sparsify_weights import SparsityPattern

__all__ = ["PARAM_MODES", "FineTune", "FineTuneReport", "bias_and_norm_initializers"]

PARAM_MODES = FINETUNE_PARAMS

# Inputs that are a bias or a normalisation scale/shift, by op: (op type, input indices)
_BIAS_AND_NORM_INPUTS = {
    "Conv": (2,), "ConvTranspose": (2,), "Gemm": (2,),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "RMSNormalization": (1,),
}


def bias_and_norm_initializers(model: ir.Model) -> list[str]:
    """The float initializers that are biases or normalisation parameters (what `bn-bias` trains).

    Besides the bias/scale inputs of the ops that have them, exporters write a linear layer's bias and a
    norm's scale and shift as an Add or Mul of a per-channel vector onto a computed value (MatMul + Add,
    decomposed RMSNorm): such an operand counts when it has more than one element along a single axis.
    Scalars (epsilons, exponents, attention scales) are constants of the formula and never count.
    """
    trainable = set(trainable_initializers(model))
    found: dict[str, None] = {}
    for node in model.graph:
        picked = [node.inputs[i] for i in _BIAS_AND_NORM_INPUTS.get(node.op_type, ()) if i < len(node.inputs)]
        if node.op_type in ("Add", "Mul") and len(node.inputs) == 2:
            constant = [v for v in node.inputs if v is not None and v.is_initializer()]
            if len(constant) == 1:
                shape = constant[0].const_value.shape
                if sum(1 for d in shape if d != 1) == 1 and math.prod(shape) > 1:
                    picked.append(constant[0])
        for value in picked:
            if value is not None and value.name in trainable:
                found[value.name] = None
    return list(found)


@dataclass
class FineTuneReport:
    """What `FineTune` did: what it trained, its pruning schedule, the loss and sparsity at every step,
    and time."""

    META_KEY = "pcc.finetune"
    PRODUCED_BY = "FineTune"

    epochs: int  # passes over the data, all rounds together
    steps: int
    loss: str
    first_loss: float  # mean over the first tenth of the steps
    last_loss: float  # mean over the last tenth
    seconds: float
    params: str = "all"  # PARAM_MODES; "lora (rank R)" for adapters
    trained_params: int = 0  # numbers the optimizer updated (adapters counted, not the weights they adapt)
    schedule: str = "oneshot"  # SCHEDULES, with its pattern and target when it prunes
    losses: list[float] = field(default_factory=list, repr=False)  # per step
    sparsities: list[float] = field(default_factory=list, repr=False)  # per step: zero fraction of the Conv/Gemm/MatMul weights

    @property
    def sparsity(self) -> float:
        """The weights' zero fraction at the end (what was written)."""
        return self.sparsities[-1] if self.sparsities else 0.0

    def summary(self) -> str:
        text = (
            f"fine-tune: {self.epochs} epoch(s), {self.steps} steps, {self.loss} loss {self.first_loss:.4f} -> "
            f"{self.last_loss:.4f} ({self.seconds:.1f} s); {self.params}, {self.trained_params:,} trained parameters"
        )
        return text if self.schedule == "oneshot" else f"{text}; {self.schedule}: weights {100 * self.sparsity:.1f}% zero"


@dataclass
class FineTune(ir.passes.InPlacePass):
    """Train the model's float weights on `data` (labels and/or a `teacher`), then write them back.

    `lr` is Adam's peak learning rate, decayed to zero over each training run by a cosine schedule; the
    average loss over the first and the last tenth of the steps is reported. `params` chooses what is
    trained: `all` weights, only biases and norms (`bn-bias`), or rank-`lora_rank` adapters plus biases
    and norms (`lora`, merged into the weights when written).

    With `sparsity` > 0 (or an N:M `sparsify` pattern) the Conv/Gemm/MatMul weights are also pruned to
    that sparsity in that pattern (`schedules.py`): `oneshot` before training; `gmp` along the cubic
    ramp over the first `ramp` fraction of the steps, masks recomputed every `prune_every` steps (default:
    20 times over the ramp), then at the target; `imp` in `rounds` rounds of `epochs` epochs each, the
    survivors rewound after each to their values after `rewind_step` steps of the first, then a last
    training run at the target.

    `score="random"` ranks weights at random instead of by magnitude (random pruning) and `reinit` makes
    IMP's last round start from the rewound values shuffled within each tensor rather than the values
    themselves (the same mask, randomly re-initialised): the lottery-ticket controls. After every mask
    update, the BatchNorm statistics (if any) are re-estimated on `recalibrate_batches` training batches:
    the pruned layers' outputs moved and the frozen statistics would normalise them wrongly until the
    end of training.
    """

    data: CalibrationData = field(repr=False)
    teacher: ir.Model | None = field(default=None, repr=False)
    epochs: int = 1
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the distillation loss when both labels and a teacher are given
    seed: int = 0
    keep_zeros: bool = True  # weights (2-D and up) that are exactly zero stay zero: a sparsified model stays sparse
    params: str = "all"  # all | bn-bias | lora
    lora_rank: int = 8
    schedule: str = "oneshot"  # oneshot | gmp | imp
    sparsify: str = "unstructured"  # the pattern pruned to: unstructured | nm:N:M | block:RxC
    sparsity: float = 0.0  # target zero fraction of the Conv/Gemm/MatMul weights (N:M patterns fix it)
    allocator: str = "uniform"  # how the zeros are split over layers (SparsifyWeights': uniform | global | lamp)
    ramp: float = 0.75  # gmp: fraction of the steps over which the sparsity rises to the target
    prune_every: int | None = None  # gmp: steps between mask updates
    rounds: int = 3  # imp
    rewind_step: int = 0  # imp: the survivors go back to their values after this many steps (0: the start)
    score: str = "magnitude"  # MASK_SCORES: what ranks the weights a mask keeps
    reinit: bool = False  # imp: the last round starts from the rewound values shuffled (a random re-initialisation)
    recalibrate_batches: int = 8  # training batches BatchNorm statistics are re-estimated on after a mask update
    nuclear_norm: float = 0.0  # TRP: weight of the summed nuclear norms of the factorisable weights in the loss
    causal_lm: bool = False  # logits [batch, seq, vocab] from input_ids: next-token loss, per-token distillation
    progress: bool = field(default=False, repr=False)

    def requires(self, model: ir.Model) -> None:
        if self.epochs < 1:
            raise InvalidRequestError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise InvalidRequestError(f"--lr must be positive, got {self.lr}")
        if self.teacher is None and self.data.labels is None and not self.causal_lm:
            raise InvalidRequestError(
                f"fine-tuning needs labels in the data ({self.data.source} has no 'labels' array) or a teacher model"
            )
        if self.data.synthetic:
            raise InvalidRequestError("fine-tuning needs real data, not random inputs")
        if self.params not in PARAM_MODES:
            raise InvalidRequestError(f"--params must be one of {', '.join(PARAM_MODES)}, got {self.params!r}")
        if self.params == "lora" and self.lora_rank < 1:
            raise InvalidRequestError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        self._check_schedule()
        if not self.nuclear_norm >= 0:
            raise InvalidRequestError(f"--nuclear-norm must be at least 0, got {self.nuclear_norm}")

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InvalidRequestError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check_sparsity(self.sparsity)
        if self.allocator not in SPARSIFY_ALLOCATORS:
            raise InvalidRequestError(f"--allocator {self.allocator} does not apply to pruning weights; choose from {', '.join(SPARSIFY_ALLOCATORS)}")
        prunes = self.sparsity > 0 or SparsityPattern.parse(self.sparsify).kind == "nm"
        if self.score not in MASK_SCORES:
            raise InvalidRequestError(f"masks are ranked by {' or '.join(MASK_SCORES)}, got {self.score!r}")
        if self.reinit and self.schedule != "imp":
            raise InvalidRequestError("re-initialising the survivors applies to --schedule imp")
        if self.schedule == "oneshot":
            return
        if not prunes:
            raise InvalidRequestError(f"--schedule {self.schedule} prunes while training: give --sparsity S > 0")
        if self.params != "all":
            raise InvalidRequestError(f"--schedule {self.schedule} prunes the weights it trains: use --params all")
        if self.schedule == "gmp" and not 0 < self.ramp <= 1:
            raise InvalidRequestError(f"the gmp ramp is a fraction of the steps in (0, 1], got {self.ramp}")
        if self.prune_every is not None and self.prune_every < 1:
            raise InvalidRequestError(f"gmp prunes every N >= 1 steps, got {self.prune_every}")
        if self.schedule == "imp" and self.rounds < 1:
            raise InvalidRequestError(f"--rounds must be at least 1, got {self.rounds}")
        if self.schedule == "imp" and not 0 <= self.rewind_step < self.epochs * self.data.num_batches:
            raise InvalidRequestError(
                f"--rewind-step must be a step of the first round (0 to {self.epochs * self.data.num_batches - 1}), got {self.rewind_step}"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from pcc.backends.onnx.runtime import session

        torch.manual_seed(self.seed)
        student = IRModule(model)
        student.train()
        trained = self._trained_names(model)
        for name, parameter in student.named_weights():
            parameter.requires_grad_(name in trained)
        masks = nonzero_masks(student, trained) if self.keep_zeros else {}
        pruner = MagnitudeMasks(model, self.sparsify, self.allocator, self.score, self.seed)
        self._batchnorm = any(node.op_type == "BatchNormalization" for node in model.graph)
        target = pruner.target if pruner.target is not None else self.sparsity
        if self.schedule == "oneshot" and target > 0:  # before the adapters, which keep the zeros made here
            self._prune(student, masks, pruner.compute(student, target))
        adapters = None
        if self.params == "lora":
            adapters = LowRankAdapters(model, student, self.lora_rank, keep_zeros=self.keep_zeros)
            if not adapters.names:
                raise InvalidRequestError("--params lora found no Conv, Gemm or MatMul with a constant weight to adapt")
        parameters = [p for name, p in student.named_weights() if name in trained]
        parameters += list(adapters.parameters()) if adapters is not None else []
        teacher = None
        if self.teacher is not None:
            teacher = session(ir.serde.serialize_model(self.teacher).SerializeToString())
        regularised = [layer.weight for layer in factorizable_layers(model)] if self.nuclear_norm > 0 else []
        run = _Run(self, student, parameters, adapters, teacher, masks, pruner.names, regularised)
        start = time.perf_counter()
        if self.schedule == "gmp":
            ramp = max(1, math.ceil(self.ramp * self.epochs * self.data.num_batches))
            every = self.prune_every or max(1, ramp // 20)

            def gradual(step: int) -> None:
                if step <= ramp and (step % every == 0 or step == ramp):
                    self._prune(student, masks, pruner.compute(student, cubic_sparsity(step, ramp, target)))

            run.train(after_step=gradual)
        elif self.schedule == "imp":
            rewind = WeightRewind()
            if self.rewind_step == 0:
                rewind.capture(student, trained)

            def remember(step: int) -> None:
                if step == self.rewind_step:
                    rewind.capture(student, trained)

            run.train(after_step=remember)
            for index in range(1, self.rounds + 1):
                self._prune(student, masks, pruner.compute(student, round_sparsity(index, self.rounds, target)))
                shuffle = torch.Generator().manual_seed(self.seed) if self.reinit and index == self.rounds else None
                rewind.restore(student, masks, shuffle)
                self._recalibrate(student)
                run.train()
        else:
            run.train()
        if adapters is not None:
            adapters.merge()
        student.write_back(model)
        losses = run.losses
        tenth = max(1, len(losses) // 10)
        schedule = self.schedule if target == 0 else f"{self.schedule} to {100 * target:.1f}% {self.sparsify}"
        store(
            model,
            FineTuneReport(
                epochs=run.epochs, steps=len(losses), loss=self._loss_name(),
                first_loss=float(np.mean(losses[:tenth])), last_loss=float(np.mean(losses[-tenth:])),
                seconds=time.perf_counter() - start,
                params=f"lora (rank {self.lora_rank})" if adapters is not None else self.params,
                trained_params=sum(p.numel() for p in parameters), schedule=schedule,
                losses=losses, sparsities=run.sparsities,
            ),
        )
        return ir.passes.PassResult(model, modified=True)

    @torch.no_grad()
    def _prune(self, student: IRModule, masks: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
        """Replace the masks of the pruned weights, zero what they remove and re-estimate BatchNorm."""
        masks.update(new)
        for name, mask in new.items():
            student.weight(name).mul_(mask)
        if new:
            self._recalibrate(student)

    @torch.no_grad()
    def _recalibrate(self, student: IRModule) -> None:
        """The student's BatchNorm statistics re-estimated on the first training batches (none without BatchNorm)."""
        if self.recalibrate_batches > 0 and self._batchnorm:
            student.recalibrate_batchnorm(islice((feeds for feeds, _ in self.data.batches()), self.recalibrate_batches))

    def _trained_names(self, model: ir.Model) -> set[str]:
        """The initializers the optimizer updates: all float weights, or only biases and norms."""
        if self.params == "all":
            return set(trainable_initializers(model))
        names = set(bias_and_norm_initializers(model))
        if not names and self.params == "bn-bias":
            raise InvalidRequestError("--params bn-bias: the model has no biases or normalisation parameters to train")
        return names

    def _loss_name(self) -> str:
        hard = "next-token cross-entropy" if self.causal_lm else "cross-entropy"
        if self.teacher is None:
            name = hard
        else:
            name = f"distillation + {hard}" if self.data.labels is not None or self.causal_lm else "distillation"
        return f"{name} + {self.nuclear_norm:g} x nuclear norm" if self.nuclear_norm > 0 else name

    def _loss(
        self, outputs: list[torch.Tensor], labels: np.ndarray | None, targets: list[np.ndarray] | None,
        feeds: dict[str, np.ndarray],
    ) -> torch.Tensor:
        logits = outputs[0]
        hard = None
        if self.causal_lm:  # token t predicts token t + 1
            ids = torch.from_numpy(np.asarray(feeds["input_ids"], dtype=np.int64))
            hard = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        elif labels is not None:
            if logits.dim() != 2:
                raise InvalidRequestError(f"labels need a classifier: the model's first output has shape {tuple(logits.shape)}")
            hard = F.cross_entropy(logits, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        if targets is None:
            return hard
        soft = sum(self._distill(out, torch.from_numpy(np.asarray(ref))) for out, ref in zip(outputs, targets))
        return soft if hard is None else self.alpha * soft + (1 - self.alpha) * hard

    def _distill(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.causal_lm and student.dim() == 3:  # every token's next-token distribution
            student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        if student.dim() == 2 and student.shape[1] > 1:
            t = self.temperature
            return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True) * t * t
        return F.mse_loss(student, teacher)


class _Run:
    """Training runs of one `FineTune`: each `train()` is `epochs` passes over the data with a fresh
    Adam and cosine schedule (IMP's rounds each get one); losses and sparsities accumulate across runs."""

    def __init__(self, tune: FineTune, student: IRModule, parameters: list[torch.nn.Parameter],
                 adapters: LowRankAdapters | None, teacher, masks: dict[str, torch.Tensor], pruned: list[str],
                 regularised: list[str] = ()) -> None:
        self.tune, self.student, self.parameters, self.adapters, self.teacher = tune, student, parameters, adapters, teacher
        self.masks = masks  # updated in place by the schedule
        self.pruned = pruned
        self.regularised = regularised  # weights whose nuclear norm is added to the loss
        self.losses: list[float] = []
        self.sparsities: list[float] = []
        self.epochs = 0

    def train(self, after_step: Callable[[int], None] | None = None) -> None:
        """Train; `after_step(k)` runs after the k-th step (1-based) of this run, masks applied."""
        tune = self.tune
        steps = max(1, tune.epochs * tune.data.num_batches)
        optimizer = torch.optim.Adam(self.parameters, lr=tune.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))
        step = 0
        for epoch in range(tune.epochs):
            bar = f"fine-tune {self.epochs + 1}" if tune.progress else None
            for feeds, labels in tune.data.batches(progress=bar, shuffle_seed=tune.seed + self.epochs):
                weights = self.adapters.weights() if self.adapters is not None else None
                outputs = self.student(feeds, weights=weights)
                targets = self.teacher.run(None, feeds) if self.teacher is not None else None
                loss = tune._loss(outputs, labels, targets, feeds)
                if self.regularised:
                    loss = loss + tune.nuclear_norm * self._nuclear_norm(weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for name, mask in self.masks.items():
                        self.student.weight(name).mul_(mask)
                schedule.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                self.losses.append(float(loss.detach()))
                self.sparsities.append(self._sparsity())
            self.epochs += 1

    def _nuclear_norm(self, adapted: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Σ‖W‖_* over the regularised weights, each as [outputs, the rest] (differentiable through the SVD)."""
        total = 0.0
        for name in self.regularised:
            weight = adapted[name] if adapted and name in adapted else self.student.weight(name)
            total = total + torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord="nuc")
        return total

    @torch.no_grad()
    def _sparsity(self) -> float:
        weights = [self.student.weight(name) for name in self.pruned]
        total = sum(w.numel() for w in weights)
        return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0

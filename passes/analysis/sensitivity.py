"""Sensitivity: how much each group alone distorts the model's outputs at each kept fraction.

For every prunable group and every point of a grid of kept fractions, a copy of the model with only that
group pruned (its lowest-importance units first, as the allocation would), repaired as the final model
will be (`Repair`: BatchNorm re-estimation, reconstruction), is run on the calibration data in
onnxruntime and compared with the dense outputs: KL divergence of the softmax for classifiers, squared
error relative to the dense output's energy otherwise. These rate-distortion curves drive the DP
allocator.

Two things keep the sweep cheap. A variant differs from the dense model only downstream of its group,
so it runs as a sub-model of that region fed the dense activations entering it, computed once per group
(`downstream_region`, `region_model`). And it runs on only as many calibration samples as its estimate
needs (`Sampling`: batches are added until the standard error is a tenth of the distortion, with a
floor). The meter that measured the sweep stays on the model (`VariantMeasurements`), so the DP's final
check and the report's allocator comparison reuse its reference outputs and whole-variant runs.

The sweep is embarrassingly parallel. It runs in a local process pool by default (one onnxruntime thread
per worker) and on Ray when given an address ("auto", "local" or a cluster). Results are a typed object
that can be saved and reloaded; `MeasureSensitivity` keeps a cache file that is reused only when the
model, calibration data, scores, grid and metric hash to the same key.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from pcc.compiler.calibration import CalibrationData
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.analysis.regions import (
    Region, downstream_region, group_values, region_groups, region_model, session_with_region_inputs,
)
from pcc.passes.results import fetch, lookup, store

__all__ = [
    "METRICS",
    "DEFAULT_KEEP_FRACTIONS",
    "FULL_SET",
    "Repair",
    "Sampling",
    "Sensitivity",
    "MeasureSensitivity",
    "VariantMeasurements",
    "VariantMeter",
    "VariantScore",
    "joint_distortion",
    "measure_sensitivity",
    "output_distortion",
    "shared_meter",
]

METRICS = ("auto", "kl", "mse")
DEFAULT_KEEP_FRACTIONS = tuple(float(f) for f in np.round(np.linspace(0.1, 0.9, 8), 4))


@dataclass
class Sensitivity:
    """Per prunable group: kept units and output distortion at each grid point (the last is the full width)."""

    META_KEY = "pcc.sensitivity"
    PRODUCED_BY = "MeasureSensitivity"

    key: str
    metric: str
    keep_fractions: np.ndarray  # ascending, ends with 1.0
    groups: list[int]
    keep_units: np.ndarray  # [groups, grid] kept units
    distortion: np.ndarray  # [groups, grid] distortion (0 at full width)
    seconds: float = 0.0
    reused: bool = False
    samples: np.ndarray | None = None  # [groups, grid] calibration samples each variant was measured on (0: not run)

    def row(self, group: int) -> int:
        return self.groups.index(group)

    @property
    def variants(self) -> int:
        """Grid points narrower than their group's full width: the pruned models a sweep runs."""
        return int((self.keep_units != self.keep_units[:, -1:]).sum()) if self.keep_units.size else 0

    def summed_distortion(self, keep_units: np.ndarray) -> float:
        """Sum over measured groups of the (interpolated) distortion at these widths: the DP's objective."""
        return float(
            sum(np.interp(keep_units[g], self.keep_units[row], self.distortion[row]) for row, g in enumerate(self.groups))
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(
            tmp, key=self.key, metric=self.metric, keep_fractions=self.keep_fractions, groups=np.asarray(self.groups),
            keep_units=self.keep_units, distortion=self.distortion, seconds=self.seconds,
            samples=self.samples if self.samples is not None else np.zeros_like(self.keep_units),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sensitivity | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    key=str(data["key"]), metric=str(data["metric"]), keep_fractions=data["keep_fractions"],
                    groups=[int(g) for g in data["groups"]], keep_units=data["keep_units"],
                    distortion=data["distortion"], seconds=float(data["seconds"]), reused=True,
                    samples=data["samples"] if "samples" in data else None,
                )
        except (OSError, KeyError, ValueError):
            return None

    def plot(self, path: str | os.PathLike[str], names: Sequence[str] | None = None, top: int = 12) -> Path:
        """Rate-distortion curves, one line per group (the `top` most sensitive are labelled)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        order = np.argsort(-self.distortion[:, 0])
        fig, ax = plt.subplots(figsize=(8, 5))
        for rank, row in enumerate(order):
            label = (names[self.groups[row]] if names else f"group {self.groups[row]}") if rank < top else None
            ax.plot(1 - self.keep_fractions, np.maximum(self.distortion[row], 1e-12), marker=".", label=label, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of the group's channels removed")
        ax.set_ylabel(f"output distortion ({self.metric})")
        ax.set_title("Per-group rate-distortion (each group pruned alone)")
        ax.grid(True, alpha=0.3)
        if len(order):
            ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


@dataclass(frozen=True)
class Repair:
    """What is done to every pruned variant before it is measured: the same as to the final model.

    A sweep that scores variants without the repair the compiled model gets measures a different model
    from the one it chooses widths for (a group that BatchNorm re-estimation fixes looks fatal without
    it). `reconstruct` ("bias" or "ls", as `--reconstruct`) re-fits the layers that lost inputs against
    the dense model (`passes.transforms.reconstruct`), then `recalibrate_bn` re-estimates BatchNorm
    statistics: the order the pipeline repairs the final model in. In a sweep only the variant's region
    downstream of its group is repaired (its consumers are the only layers that lost inputs): everything
    upstream equals the repaired base model's.
    """

    recalibrate_bn: bool = False
    reconstruct: str = "none"

    def __bool__(self) -> bool:
        return self.recalibrate_bn or self.reconstruct != "none"

    @property
    def tag(self) -> bytes:
        """For cache keys ("recalibrated" alone is what sweeps before `reconstruct` existed wrote)."""
        reconstructed = b"" if self.reconstruct == "none" else f"+reconstructed:{self.reconstruct}".encode()
        return (b"recalibrated" if self.recalibrate_bn else b"") + reconstructed

    def apply(
        self, variant: ir.Model, dense: ir.Model, batches: Sequence[Mapping[str, np.ndarray]],
        kept: dict[tuple[str, int], np.ndarray], dense_batches: Sequence[Mapping[str, np.ndarray]] | None = None,
        layers: set[str] | None = None,
    ) -> None:
        """Repair `variant` in place: `dense` is the unpruned model with the same inputs, fed `batches` (or
        `dense_batches` where its inputs differ), `kept` the dense indices each pruned (tensor, axis) kept
        (`DependencyGroups.kept_indices`), and `layers` the only layers to re-fit (None: all that lost inputs)."""
        if self.reconstruct != "none" and kept:
            from pcc.passes.analysis.dense_reference import DenseReference
            from pcc.passes.transforms.reconstruct import reconstruct

            reconstruct(
                variant, DenseReference(dense, dict(kept)), list(batches), self.reconstruct,
                dense_batches=None if dense_batches is None else list(dense_batches), layers=layers,
            )
        if self.recalibrate_bn:
            from pcc.passes.transforms.recalibrate_batchnorm import reestimate_batchnorm_statistics

            reestimate_batchnorm_statistics(variant, batches)


@dataclass(frozen=True)
class Sampling:
    """How many calibration samples a variant is measured (and repaired) on.

    Batches are added, in file order, until the distortion's standard error is at most `relative_error`
    times the distortion or at most `absolute_error` (a difference too small to move an allocation: the
    DP sums distortions, so a variant that barely distorts needs no relative precision), with at least
    `min_samples` samples (or all there are) and at most the whole calibration set. The standard error is
    that of a ratio of sample means (KL: per-sample KL over 1; squared error: per-sample error over
    per-sample reference energy). `relative_error=0` measures every variant on the whole set.

    A variant's repair (BatchNorm statistics, reconstruction), in the sweep and in whole-model
    measurements alike (the DP's guard, the report's comparison), is fitted on the first `repair_samples`
    samples: statistics of a few hundred samples are what the final model's repair finds on more, and
    refitting on every sample for each of hundreds of variants dominated the sweep (and `ls` on all 512
    ResConcat samples for each of the guard's four candidates, the DP's time).
    """

    relative_error: float = 0.1
    min_samples: int = 32
    absolute_error: float = 1e-3
    repair_samples: int = 128

    def settled(self, estimate: _Estimate) -> bool:
        if self.relative_error <= 0 or estimate.samples < self.min_samples:
            return False
        return estimate.stderr <= max(self.relative_error * abs(estimate.value), self.absolute_error)

    def repair_batches(self, batches: list) -> list:
        if self.relative_error <= 0:
            return batches
        taken, count = [], 0
        for batch in batches:
            if count >= self.repair_samples:
                break
            taken.append(batch)
            count += len(next(iter(batch.values())))
        return taken


FULL_SET = Sampling(relative_error=0.0, absolute_error=0.0)


class _Estimate:
    """A running ratio estimate sum(num) / sum(den) over samples, with its standard error."""

    def __init__(self) -> None:
        self.num: list[np.ndarray] = []
        self.den: list[np.ndarray] = []

    def add(self, reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str) -> None:
        num, den = _per_sample(reference, outputs, metric)
        self.num.append(num)
        self.den.append(den)

    @property
    def samples(self) -> int:
        return sum(len(n) for n in self.num)

    @property
    def value(self) -> float:
        num, den = np.concatenate(self.num), np.concatenate(self.den)
        total = den.sum()
        return float(num.sum() / total) if total else float(num.sum())

    @property
    def stderr(self) -> float:
        num, den = np.concatenate(self.num), np.concatenate(self.den)
        n = len(num)
        if n < 2 or not den.sum():
            return float("inf")
        residual = num - self.value * den
        return float(np.sqrt(residual.var(ddof=1) / n) / den.mean())


def _per_sample(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample numerator and denominator of the distortion (the whole batch as one entry when outputs
    do not all have the samples on axis 0)."""
    if metric == "kl":
        p, q = _log_softmax(reference[0]), _log_softmax(outputs[0])
        return (np.exp(p) * (p - q)).sum(axis=1), np.ones(len(p))
    rows = reference[0].shape[0] if reference and reference[0].ndim else 1
    per_row = all(r.ndim and r.shape[0] == rows for r in reference)
    error = np.zeros(rows if per_row else 1)
    energy = np.zeros_like(error)
    for r, o in zip(reference, outputs):
        r64 = r.astype(np.float64).reshape(len(error), -1)
        error += ((o.astype(np.float64).reshape(r64.shape) - r64) ** 2).sum(axis=1)
        energy += (r64**2).sum(axis=1)
    return error, energy


def output_distortion(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], metric: str) -> float:
    """Distortion of `outputs` against `reference`, both [batch][output] arrays: mean per-sample KL of the
    softmax ("kl"), or squared error over the reference's energy ("mse")."""
    estimate = _Estimate()
    for ref, out in zip(reference, outputs):
        estimate.add(ref, out, metric)
    return estimate.value


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def resolve_metric(metric: str, reference: list[list[np.ndarray]]) -> str:
    if metric != "auto":
        return metric
    first = reference[0][0] if reference and reference[0] else None
    return "kl" if first is not None and first.ndim == 2 and first.shape[1] > 1 and len(reference[0]) == 1 else "mse"


# -- measuring variants -------------------------------------------------------------------------------


class VariantMeter:
    """Measures pruned variants of one model on calibration data; the sweep's workers are made of these.

    The base model is `base_removed` pruned from `model` and repaired (the dense model repaired when
    nothing is removed); `distortion` is always against the dense model's outputs. `region(g, removed)`
    measures a variant that differs from the base in group g only, on g's downstream region fed the
    base's activations, with as many samples as `sampling` asks; `joint(removed)` measures any variant
    whole, on every sample, and remembers the result (the DP's final check and the report's comparison
    measure the same allocations).
    """

    def __init__(
        self, model: ir.Model, groups: DependencyGroups, batches: list[dict[str, np.ndarray]], reference: list[list[np.ndarray]],
        metric: str, repair: Repair = Repair(), sampling: Sampling = FULL_SET, base_removed: np.ndarray | None = None,
        threads: int | None = None,
    ) -> None:
        self.model, self.groups, self.batches, self.reference = model, groups, batches, reference
        self.metric, self.repair, self.sampling, self.threads = metric, repair, sampling, threads
        self.base_removed = np.zeros(groups.num_units, dtype=bool) if base_removed is None else base_removed
        self.output_names = [v.name for v in model.graph.outputs]
        self.regions = {g.index: downstream_region(model.graph, group_values(groups, g)) for g in groups.groups if g.prunable}
        # around a pruned base, reconstruction aims at the dense model's activations, which a region entered
        # from that base cannot compute: the dense ones entering it are kept as well
        self.refits_around = repair.reconstruct != "none" and bool(self.base_removed.any())
        self._joint: dict[bytes, VariantScore] = {}
        self.whole_runs = 0  # whole variants actually run (repeats are answered from memory)
        self._upstream = None  # base model with every region's entering activations as outputs
        self._refitted: dict[str, ir.TensorProtocol] = {}  # the base's parameters its repair changed
        self._base_shapes: dict[str, tuple[int, ...]] = {}  # the base's initializers' shapes
        self._dense_upstream = None  # the dense model with every region's entering activations as outputs
        self._current: tuple | None = None  # one group's region, its model, groups, feeds and dense feeds

    @classmethod
    def dense(
        cls, model: ir.Model, groups: DependencyGroups, calibration: CalibrationData, metric: str = "auto",
        repair: Repair = Repair(), sampling: Sampling = FULL_SET, threads: int | None = None,
    ) -> VariantMeter:
        """A meter around the dense model, its reference outputs computed here."""
        from pcc.backends.onnx.runtime import session

        batches = list(calibration)
        dense = session(ir.serde.serialize_model(model).SerializeToString(), threads=threads)
        reference = [dense.run(None, feeds) for feeds in batches]
        return cls(model, groups, batches, reference, resolve_metric(metric, reference), repair, sampling, threads=threads)

    def matches(self, model: ir.Model, calibration: CalibrationData, repair: Repair) -> bool:
        """Whether this meter measures `model` on `calibration` with `repair` (so its results can be reused)."""
        return model is self.model and repair == self.repair and len(self.batches) == calibration.num_batches and all(
            all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(self.batches, calibration)
        )

    # whole variants

    def joint(self, removed: np.ndarray) -> VariantScore:
        """The distortion (and top-1 classes, for classifiers) of `model` with all of `removed` pruned."""
        key = np.packbits(removed).tobytes()
        if key not in self._joint:
            self.whole_runs += 1
            outputs = self._run_whole(removed)
            predicted = (
                np.concatenate([out[0].argmax(axis=1) for out in outputs]) if self.metric == "kl" else None
            )
            self._joint[key] = VariantScore(output_distortion(self.reference, outputs, self.metric), predicted)
        return self._joint[key]

    def _run_whole(self, removed: np.ndarray) -> list[list[np.ndarray]]:
        from pcc.backends.onnx.runtime import session
        from pcc.passes.transforms.prune_channels import pruned_copy

        variant = pruned_copy(self.model, self.groups, removed)
        if self.repair:
            batches = self.sampling.repair_batches(self.batches)
            self.repair.apply(variant, self.model, batches, self.groups.kept_indices(removed))
        sess = session(ir.serde.serialize_model(variant).SerializeToString(), threads=self.threads)
        return [sess.run(None, feeds) for feeds in self.batches]

    # single-group variants

    def region(self, group: int, removed: np.ndarray) -> tuple[float, int]:
        """Distortion of the variant `removed` (the base plus changes in `group` only) and the samples it took."""
        from pcc.backends.onnx.runtime import session
        from pcc.passes.transforms.prune_channels import prune_channels

        region, dense_region, local_groups, feeds, dense_feeds = self._region(group)
        variant = dense_region.clone()
        prune_channels(variant, local_groups, removed)
        if self.repair:
            kept = local_groups.kept_indices(removed)
            if self.refits_around:
                self.repair.apply(
                    variant, dense_region, self.sampling.repair_batches(feeds), kept,
                    dense_batches=self.sampling.repair_batches(dense_feeds), layers=self._adopt_base(variant),
                )
            else:
                self.repair.apply(variant, dense_region, self.sampling.repair_batches(feeds), kept)
        sess = session(ir.serde.serialize_model(variant).SerializeToString(), threads=self.threads)
        places = [self.output_names.index(name) for name in region.outputs]
        estimate = _Estimate()
        for batch, reference in enumerate(self.reference):
            outputs = list(reference)
            for place, value in zip(places, sess.run(list(region.outputs), feeds[batch]) if places else []):
                outputs[place] = value
            estimate.add(reference, outputs, self.metric)
            if self.sampling.settled(estimate):
                break
        return estimate.value, estimate.samples

    def _region(self, group: int) -> tuple[Region, ir.Model, DependencyGroups, list[dict[str, np.ndarray]], list | None]:
        """The group's region as a model (dense weights; pruning narrows them), the groups restricted to its
        tensors (the base's other pruned groups also narrow the activations entering it), the base's
        activations entering it for every batch (kept for one group at a time: they can be large), and the
        dense model's where reconstruction around a pruned base needs them (else None)."""
        region = self.regions[group]
        if self._current is None or self._current[0] != group:
            self._current = None  # free the previous group's activations first
            feeds = self._entering(region, self._upstream_session)
            dense_feeds = self._entering(region, self._dense_upstream_session) if self.refits_around else None
            model = region_model(self.model, region)
            self._current = (group, model, region_groups(self.groups, model), feeds, dense_feeds)
        return region, *self._current[1:]

    def _entering(self, region: Region, upstream_session) -> list[dict[str, np.ndarray]]:
        """The activations entering `region` for every batch, computed by `upstream_session()` when not inputs."""
        upstream = [name for name in region.inputs if name not in self.batches[0]]
        if upstream:
            session = upstream_session()
            feeds = [dict(zip(upstream, session.run(upstream, batch))) for batch in self.batches]
        else:
            feeds = [{} for _ in self.batches]
        for entry, batch in zip(feeds, self.batches):
            entry.update({name: batch[name] for name in region.inputs if name in batch})
        return feeds

    def _upstream_session(self):
        if self._upstream is None:
            from pcc.passes.transforms.prune_channels import pruned_copy

            base = pruned_copy(self.model, self.groups, self.base_removed)
            if self.repair:
                before = {name: value.const_value for name, value in base.graph.initializers.items()}
                self.repair.apply(base, self.model, self.batches, self.groups.kept_indices(self.base_removed))
                self._refitted = {
                    name: value.const_value for name, value in base.graph.initializers.items()
                    if value.const_value is not before.get(name)
                }
            self._base_shapes = {
                name: tuple(value.const_value.shape) for name, value in base.graph.initializers.items()
                if value.const_value is not None
            }
            self._upstream = self._session_with_region_inputs(base)
        return self._upstream

    def _dense_upstream_session(self):
        if self._dense_upstream is None:
            self._dense_upstream = self._session_with_region_inputs(self.model.clone())
        return self._dense_upstream

    def _session_with_region_inputs(self, model: ir.Model):
        """An onnxruntime session of `model` (changed here) that also outputs every region's entering activations."""
        return session_with_region_inputs(model, self.regions.values(), self.threads)[0]

    def _adopt_base(self, variant: ir.Model) -> set[str]:
        """Give `variant` (a region pruned as the base is, but for one group) the parameters the base's repair
        re-fitted wherever their shapes agree, and return the layers whose parameters differ in shape from
        the base's: the group's consumers and producers, the only layers a cheap reconstruction re-fits. (A
        bias the base's reconstruction added to a layer that had none is not carried over.)"""
        self._upstream_session()
        changed = set()
        for name, value in variant.graph.initializers.items():
            if value.const_value is None or name not in self._base_shapes:
                continue
            if self._base_shapes[name] != tuple(value.const_value.shape):
                changed.update(node.name for node, _ in value.uses())
            elif name in self._refitted:
                value.const_value = self._refitted[name]
        return changed


@dataclass
class VariantScore:
    """One whole variant measured on every calibration sample."""

    distortion: float
    predicted: np.ndarray | None  # top-1 class per sample (classifiers)


@dataclass
class VariantMeasurements:
    """The meter the sensitivity sweep measured with, kept so that later passes reuse its runs."""

    META_KEY = "pcc.variant_measurements"
    PRODUCED_BY = "MeasureSensitivity"

    meter: VariantMeter


def shared_meter(
    model: ir.Model, groups: DependencyGroups, calibration: CalibrationData, repair: Repair, metric: str = "auto"
) -> VariantMeter:
    """The meter a previous pass left on `model` when it measures the same thing, else a new one (stored)."""
    found = lookup(model, VariantMeasurements)
    if (
        found is not None and found.meter.groups is groups and metric in ("auto", found.meter.metric)
        and found.meter.matches(model, calibration, repair)
    ):
        return found.meter
    meter = VariantMeter.dense(model, groups, calibration, metric, repair)
    store(model, VariantMeasurements(meter))
    return meter


# -- workers --------------------------------------------------------------------------------------
# Each worker rebuilds the model and a meter once, then measures the (group, removal mask) jobs sent to
# it; jobs come sorted by group, so a worker computes each group's region and entering activations once.

_WORKER: dict[str, VariantMeter] = {}


def _worker_setup(model_bytes: bytes, groups: DependencyGroups, batches, reference, metric: str, repair: Repair,
                  sampling: Sampling, base_removed: np.ndarray | None, threads: int | None) -> None:
    import onnx

    model = ir.serde.deserialize_model(onnx.load_from_string(model_bytes))
    _WORKER["meter"] = VariantMeter(model, groups, batches, reference, metric, repair, sampling, base_removed, threads)


def _worker_evaluate(job: tuple[int | None, np.ndarray]) -> tuple[float, int]:
    group, removed = job
    meter = _WORKER["meter"]
    if group is None:
        return meter.joint(removed).distortion, sum(len(next(iter(b.values()))) for b in meter.batches)
    return meter.region(group, removed)


def _pool_worker_setup(*setup_args) -> None:
    """In a worker process: torch (used by repairs) gets one thread, as onnxruntime does."""
    if setup_args[5]:
        import torch

        torch.set_num_threads(1)
    _worker_setup(*setup_args)


def _evaluate_chunk(setup_args, jobs: list[tuple[int | None, np.ndarray]]) -> list[tuple[float, int]]:
    _pool_worker_setup(*setup_args)
    return [_worker_evaluate(job) for job in jobs]


def measure_sensitivity(
    model: ir.Model,
    groups: DependencyGroups,
    scores: np.ndarray,
    calibration: CalibrationData,
    keep_fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS,
    metric: str = "auto",
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = False,
    recalibrate_bn: bool = False,
    around: np.ndarray | None = None,
    repair: Repair | None = None,
    sampling: Sampling = Sampling(),
    reference: list[list[np.ndarray]] | None = None,
) -> Sensitivity:
    """Each prunable group's distortion at each kept fraction, every other group at full width.

    Each variant runs only the region downstream of its group (see `VariantMeter.region`), repaired as
    `repair` says (`recalibrate_bn=True` is `Repair(recalibrate_bn=True)`), on as many samples as
    `sampling` needs. With `around` (kept units per group, an allocation), the curves are conditional
    instead: every other group stays at its `around` width, the grid also holds the group's own `around`
    width, and the distortion is measured relative to the `around` allocation itself (so it is 0 there
    and may be negative where the group is wider). These curves capture how groups interact at that
    operating point. `reference` (the dense outputs on `calibration`) saves one dense pass when known.
    """
    from pcc.backends.onnx.runtime import session
    from pcc.passes.allocation.allocation import RemovalPlanner, rounded_keep

    start = time.perf_counter()
    repair = repair if repair is not None else Repair(recalibrate_bn=recalibrate_bn)
    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    batches = [feeds for feeds in calibration]
    if reference is None:
        dense = session(model_bytes)
        reference = [dense.run(None, feeds) for feeds in batches]
    metric = resolve_metric(metric, reference)
    fractions = np.asarray(sorted(set(float(f) for f in keep_fractions) | {1.0}))
    planner = RemovalPlanner(groups, scores)
    full = np.asarray([g.num_units for g in groups.groups], dtype=np.int64)
    base = full if around is None else np.asarray(around, dtype=np.int64)
    base_removed = planner.mask(base)
    prunable = [g for g in groups.groups if g.prunable]
    grid = [[rounded_keep(g, f * g.num_units) for f in fractions] for g in prunable]
    if around is not None:
        grid = [sorted([*row, int(base[g.index])]) for row, g in zip(grid, prunable)]
    keep_units = np.asarray(grid, dtype=np.int64)
    jobs: list[tuple[int | None, np.ndarray]] = [(None, base_removed)]  # the operating point itself first
    where: list[tuple[int, int] | None] = [None]
    for row, group in enumerate(prunable):
        for column, kept in enumerate(keep_units[row]):
            if kept != base[group.index]:
                keep = base.copy()
                keep[group.index] = kept
                jobs.append((group.index, planner.mask(keep)))
                where.append((row, column))
    if around is None:
        jobs, where = jobs[1:], where[1:]  # the dense model's distortion is 0
    setup = (model_bytes, groups, batches, reference, metric, repair, sampling, None if around is None else base_removed, 1)
    values = _run_jobs(setup, jobs, workers, ray_address, progress)
    offset = values[0][0] if around is not None else 0.0
    distortion = np.zeros(keep_units.shape)
    samples = np.zeros(keep_units.shape, dtype=np.int64)
    for place, (value, used) in zip(where, values):
        if place is not None:
            distortion[place] = value - offset
            samples[place] = used
    key = sensitivity_key(model_bytes, groups, scores, calibration, fractions, metric, repair, sampling)
    if around is not None:
        key = hashlib.sha256((key + base.tobytes().hex()).encode()).hexdigest()[:24]
    return Sensitivity(
        key=key,
        metric=metric, keep_fractions=fractions, groups=[g.index for g in prunable], keep_units=keep_units,
        distortion=distortion, seconds=time.perf_counter() - start, samples=samples,
    )


def joint_distortion(
    model: ir.Model, groups: DependencyGroups, removed: np.ndarray, calibration: CalibrationData, metric: str,
    recalibrate_bn: bool = False, repair: Repair | None = None,
) -> float:
    """Distortion of the model with all of `removed` pruned at once, on every calibration sample (to check
    additivity). Reuses the measurements a sweep left on `model` when they were made the same way."""
    repair = repair if repair is not None else Repair(recalibrate_bn=recalibrate_bn)
    return shared_meter(model, groups, calibration, repair, metric).joint(removed).distortion


_IN_PROCESS_CORES = 2  # on machines this small the sweep runs in the calling process unless `workers` says otherwise


def _run_jobs(setup, jobs: list, workers: int | None, ray_address: str | None, progress: bool) -> list[tuple[float, int]]:
    if not jobs:
        return []
    if ray_address is not None:
        return _run_on_ray(setup, jobs, ray_address, progress)
    groups_measured = len({group for group, _ in jobs})
    if workers is None:
        # a spawned worker costs ~5 s before its first job (importing torch and onnxruntime, one after the
        # other), which on two cores buys nothing over one process whose onnxruntime uses both
        cores = os.cpu_count() or 1
        workers = cores if cores > _IN_PROCESS_CORES else 1
    workers = min(workers, len(jobs), groups_measured)  # a worker per group at most
    if workers <= 1:
        _worker_setup(*setup[:-1], None)  # in this process: onnxruntime's default threads
        try:
            return [_worker_evaluate(job) for job in tqdm(jobs, desc="sensitivity", disable=not progress, leave=False)]
        finally:
            _WORKER.clear()
    import multiprocessing

    # spawn, not fork: the parent may hold onnxruntime thread pools that a fork would copy half-alive
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_worker_setup, initargs=setup) as pool:
        # about one group per chunk: a worker computes a group's entering activations once for all its widths
        chunk = max(1, len(jobs) // groups_measured)
        results = pool.map(_worker_evaluate, jobs, chunksize=chunk)
        return list(tqdm(results, total=len(jobs), desc="sensitivity", disable=not progress, leave=False))


def _run_on_ray(setup, jobs: list, address: str, progress: bool) -> list[tuple[float, int]]:
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    shared = ray.put(setup)
    evaluate = ray.remote(_evaluate_chunk)
    chunks = max(1, int(ray.available_resources().get("CPU", 1)))
    size = -(-len(jobs) // chunks)
    pending = [evaluate.remote(shared, jobs[i : i + size]) for i in range(0, len(jobs), size)]
    results = []
    for chunk in tqdm(pending, desc="sensitivity (ray)", disable=not progress, leave=False):
        results.extend(ray.get(chunk))
    return results


def sensitivity_key(
    model_bytes: bytes, groups: DependencyGroups, scores, calibration: CalibrationData, fractions, metric: str,
    repair: Repair, sampling: Sampling,
) -> str:
    h = hashlib.sha256(model_bytes)
    h.update(np.asarray(scores, dtype=np.float64).tobytes())
    h.update(np.asarray([(g.num_units, g.unit_multiple) for g in groups.groups], dtype=np.int64).tobytes())
    h.update(calibration.digest().encode())
    h.update(np.asarray(fractions, dtype=np.float64).tobytes())
    h.update(metric.encode())
    h.update(repair.tag)
    h.update(repr(sampling).encode())
    return h.hexdigest()[:24]


@dataclass
class MeasureSensitivity(ir.passes.InPlacePass):
    """Analysis: per-group rate-distortion curves (stores `Sensitivity`, and the `VariantMeasurements`
    later passes reuse; needs groups and importance).

    With `cache`, a previous result in that file is reused when its key matches, and a new result is
    written there otherwise. `repair` is what every variant gets before it is measured; give it what the
    pipeline does to the pruned model (`recalibrate_bn=True` alone is `Repair(recalibrate_bn=True)`).
    """

    calibration: CalibrationData | None = field(default=None, repr=False)
    keep_fractions: tuple[float, ...] = DEFAULT_KEEP_FRACTIONS
    metric: str = "auto"
    workers: int | None = None
    ray_address: str | None = None
    cache: Path | None = None
    recalibrate_bn: bool = False  # measure each variant after re-estimating its BatchNorm statistics
    progress: bool = field(default=False, repr=False)
    repair: Repair | None = None  # overrides recalibrate_bn
    sampling: Sampling = Sampling()

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)
        fetch(model, Importance)
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        scores = fetch(model, Importance).scores
        calibration = self.calibration or CalibrationData.random(model)
        repair = self.repair if self.repair is not None else Repair(recalibrate_bn=self.recalibrate_bn)
        cached = Sensitivity.load(self.cache) if self.cache and Path(self.cache).exists() else None
        if cached is not None:
            fractions = np.asarray(sorted(set(self.keep_fractions) | {1.0}))
            model_bytes = ir.serde.serialize_model(model).SerializeToString()
            key = sensitivity_key(model_bytes, groups, scores, calibration, fractions, cached.metric, repair, self.sampling)
            if cached.key == key and self.metric in ("auto", cached.metric):
                store(model, cached)
                return ir.passes.PassResult(model, modified=False)
        meter = shared_meter(model, groups, calibration, repair)  # its dense outputs serve the sweep too
        result = measure_sensitivity(
            model, groups, scores, calibration, self.keep_fractions, self.metric, self.workers, self.ray_address,
            self.progress, repair=repair, sampling=self.sampling, reference=meter.reference,
        )
        if self.cache:
            result.save(self.cache)
        store(model, result)
        return ir.passes.PassResult(model, modified=False)

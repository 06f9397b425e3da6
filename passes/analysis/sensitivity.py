"""Sensitivity: how much each group alone distorts the model's outputs at each kept fraction.

For every prunable group and every point of a grid of kept fractions, a copy of the model with only that
group pruned (its lowest-importance units first, as the allocation would) is run on the calibration data
in onnxruntime and compared with the dense outputs: KL divergence of the softmax for classifiers,
squared error relative to the dense output's energy otherwise. These rate-distortion curves drive the
DP allocator.

The sweep is embarrassingly parallel. It runs in a local process pool by default (one onnxruntime thread
per worker) and on Ray when given an address ("auto", "local" or a cluster). Results are a typed object
that can be saved and reloaded; `MeasureSensitivity` keeps a cache file that is reused only when the
model, calibration data, scores, grid and metric hash to the same key.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from pcc.compiler.calibration import CalibrationData
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.results import fetch, store

__all__ = [
    "METRICS",
    "DEFAULT_KEEP_FRACTIONS",
    "Sensitivity",
    "MeasureSensitivity",
    "joint_distortion",
    "measure_sensitivity",
    "output_distortion",
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

    def row(self, group: int) -> int:
        return self.groups.index(group)

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


def output_distortion(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], metric: str) -> float:
    """Distortion of `outputs` against `reference`, both [batch][output] arrays."""
    if metric == "kl":
        total = count = 0.0
        for ref, out in zip(reference, outputs):
            p, q = _log_softmax(ref[0]), _log_softmax(out[0])
            total += float((np.exp(p) * (p - q)).sum())
            count += len(p)
        return total / count
    error = energy = 0.0
    for ref, out in zip(reference, outputs):
        for r, o in zip(ref, out):
            error += float(((o.astype(np.float64) - r) ** 2).sum())
            energy += float((r.astype(np.float64) ** 2).sum())
    return error / energy if energy else error


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def resolve_metric(metric: str, reference: list[list[np.ndarray]]) -> str:
    if metric != "auto":
        return metric
    first = reference[0][0] if reference and reference[0] else None
    return "kl" if first is not None and first.ndim == 2 and first.shape[1] > 1 and len(reference[0]) == 1 else "mse"


# -- workers --------------------------------------------------------------------------------------
# Each worker rebuilds the model once, then evaluates removal masks sent to it.

_WORKER: dict[str, object] = {}


def _worker_setup(model_bytes: bytes, groups: DependencyGroups, batches, reference, metric: str, recalibrate: bool) -> None:
    import onnx

    _WORKER.update(
        model=ir.serde.deserialize_model(onnx.load_from_string(model_bytes)),
        groups=groups, batches=batches, reference=reference, metric=metric, recalibrate=recalibrate,
    )


def _worker_evaluate(removed: np.ndarray) -> float:
    from pcc.backends.onnx.runtime import session
    from pcc.passes.transforms.prune_channels import pruned_copy

    variant = pruned_copy(_WORKER["model"], _WORKER["groups"], removed)
    if _WORKER["recalibrate"]:
        from pcc.passes.transforms.recalibrate_batchnorm import reestimate_batchnorm_statistics

        reestimate_batchnorm_statistics(variant, _WORKER["batches"])
    sess = session(ir.serde.serialize_model(variant).SerializeToString(), threads=1)
    outputs = [sess.run(None, feeds) for feeds in _WORKER["batches"]]
    return output_distortion(_WORKER["reference"], outputs, _WORKER["metric"])


def _pool_worker_setup(*setup_args) -> None:
    """In a worker process: torch (used to recalibrate) gets one thread, as onnxruntime does."""
    if setup_args[-1]:
        import torch

        torch.set_num_threads(1)
    _worker_setup(*setup_args)


def _evaluate_chunk(setup_args, masks: list[np.ndarray]) -> list[float]:
    _pool_worker_setup(*setup_args)
    return [_worker_evaluate(mask) for mask in masks]


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
) -> Sensitivity:
    """Each prunable group's distortion at each kept fraction, every other group at full width.

    With `around` (kept units per group, an allocation), the curves are conditional instead: every other
    group stays at its `around` width, the grid also holds the group's own `around` width, and the
    distortion is measured relative to the `around` allocation itself (so it is 0 there and may be
    negative where the group is wider). These curves capture how groups interact at that operating point.
    """
    from pcc.backends.onnx.runtime import session
    from pcc.passes.allocation.allocation import RemovalPlanner, rounded_keep

    start = time.perf_counter()
    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    batches = [feeds for feeds in calibration]
    dense = session(model_bytes)
    reference = [dense.run(None, feeds) for feeds in batches]
    metric = resolve_metric(metric, reference)
    fractions = np.asarray(sorted(set(float(f) for f in keep_fractions) | {1.0}))
    planner = RemovalPlanner(groups, scores)
    full = np.asarray([g.num_units for g in groups.groups], dtype=np.int64)
    base = full if around is None else np.asarray(around, dtype=np.int64)
    prunable = [g for g in groups.groups if g.prunable]
    grid = [[rounded_keep(g, f * g.num_units) for f in fractions] for g in prunable]
    if around is not None:
        grid = [sorted([*row, int(base[g.index])]) for row, g in zip(grid, prunable)]
    keep_units = np.asarray(grid, dtype=np.int64)
    masks, where = [planner.mask(base)], [None]  # the operating point itself first
    for row, group in enumerate(prunable):
        for column, kept in enumerate(keep_units[row]):
            if kept != base[group.index]:
                keep = base.copy()
                keep[group.index] = kept
                masks.append(planner.mask(keep))
                where.append((row, column))
    if around is None:
        masks, where = masks[1:], where[1:]  # the dense model's distortion is 0
    setup = (model_bytes, groups, batches, reference, metric, recalibrate_bn)
    values = _run_jobs(setup, masks, workers, ray_address, progress)
    offset = values[0] if around is not None else 0.0
    distortion = np.zeros(keep_units.shape)
    for place, value in zip(where, values):
        if place is not None:
            distortion[place] = value - offset
    key = sensitivity_key(model_bytes, groups, scores, calibration, fractions, metric, recalibrate_bn)
    if around is not None:
        key = hashlib.sha256((key + base.tobytes().hex()).encode()).hexdigest()[:24]
    return Sensitivity(
        key=key,
        metric=metric, keep_fractions=fractions, groups=[g.index for g in prunable], keep_units=keep_units,
        distortion=distortion, seconds=time.perf_counter() - start,
    )


def joint_distortion(
    model: ir.Model, groups: DependencyGroups, removed: np.ndarray, calibration: CalibrationData, metric: str,
    recalibrate_bn: bool = False,
) -> float:
    """Distortion of the model with all of `removed` pruned at once (to check additivity)."""
    from pcc.backends.onnx.runtime import session

    model_bytes = ir.serde.serialize_model(model).SerializeToString()
    batches = list(calibration)
    dense = session(model_bytes)
    _worker_setup(model_bytes, groups, batches, [dense.run(None, feeds) for feeds in batches], metric, recalibrate_bn)
    try:
        return _worker_evaluate(removed)
    finally:
        _WORKER.clear()


def _run_jobs(setup, masks: list[np.ndarray], workers: int | None, ray_address: str | None, progress: bool) -> list[float]:
    if not masks:
        return []
    if ray_address is not None:
        return _run_on_ray(setup, masks, ray_address, progress)
    workers = min(workers or os.cpu_count() or 1, len(masks))
    if workers <= 1:
        _worker_setup(*setup)
        try:
            return [_worker_evaluate(m) for m in tqdm(masks, desc="sensitivity", disable=not progress, leave=False)]
        finally:
            _WORKER.clear()
    import multiprocessing

    # spawn, not fork: the parent may hold onnxruntime thread pools that a fork would copy half-alive
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_worker_setup, initargs=setup) as pool:
        chunk = max(1, len(masks) // (4 * workers))
        results = pool.map(_worker_evaluate, masks, chunksize=chunk)
        return list(tqdm(results, total=len(masks), desc="sensitivity", disable=not progress, leave=False))


def _run_on_ray(setup, masks: list[np.ndarray], address: str, progress: bool) -> list[float]:
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    shared = ray.put(setup)
    evaluate = ray.remote(_evaluate_chunk)
    chunks = max(1, int(ray.available_resources().get("CPU", 1)))
    size = -(-len(masks) // chunks)
    pending = [evaluate.remote(shared, masks[i : i + size]) for i in range(0, len(masks), size)]
    results = []
    for chunk in tqdm(pending, desc="sensitivity (ray)", disable=not progress, leave=False):
        results.extend(ray.get(chunk))
    return results


def sensitivity_key(
    model_bytes: bytes, groups: DependencyGroups, scores, calibration: CalibrationData, fractions, metric: str, recalibrate_bn: bool
) -> str:
    h = hashlib.sha256(model_bytes)
    h.update(np.asarray(scores, dtype=np.float64).tobytes())
    h.update(np.asarray([(g.num_units, g.unit_multiple) for g in groups.groups], dtype=np.int64).tobytes())
    h.update(calibration.digest().encode())
    h.update(np.asarray(fractions, dtype=np.float64).tobytes())
    h.update(metric.encode())
    h.update(b"recalibrated" if recalibrate_bn else b"")
    return h.hexdigest()[:24]


@dataclass
class MeasureSensitivity(ir.passes.InPlacePass):
    """Analysis: per-group rate-distortion curves (stores `Sensitivity`; needs groups and importance).

    With `cache`, a previous result in that file is reused when its key matches, and a new result is
    written there otherwise.
    """

    calibration: CalibrationData | None = field(default=None, repr=False)
    keep_fractions: tuple[float, ...] = DEFAULT_KEEP_FRACTIONS
    metric: str = "auto"
    workers: int | None = None
    ray_address: str | None = None
    cache: Path | None = None
    recalibrate_bn: bool = False  # measure each variant after re-estimating its BatchNorm statistics
    progress: bool = field(default=False, repr=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)
        fetch(model, Importance)
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        scores = fetch(model, Importance).scores
        calibration = self.calibration or CalibrationData.random(model)
        cached = Sensitivity.load(self.cache) if self.cache and Path(self.cache).exists() else None
        if cached is not None:
            fractions = np.asarray(sorted(set(self.keep_fractions) | {1.0}))
            model_bytes = ir.serde.serialize_model(model).SerializeToString()
            key = sensitivity_key(model_bytes, groups, scores, calibration, fractions, cached.metric, self.recalibrate_bn)
            if cached.key == key and (
                self.metric in ("auto", cached.metric)
            ):
                store(model, cached)
                return ir.passes.PassResult(model, modified=False)
        result = measure_sensitivity(
            model, groups, scores, calibration, self.keep_fractions, self.metric, self.workers, self.ray_address, self.progress,
            self.recalibrate_bn,
        )
        if self.cache:
            result.save(self.cache)
        store(model, result)
        return ir.passes.PassResult(model, modified=False)

"""Running models in onnxruntime: random inputs, output comparison, paired latency, classification.

Latency is measured as dense and pruned runs interleaved in one process (A, B, A, B, ...), medians of
each: the machines pcc runs on are shared and noisy, and interleaving exposes both models to the same
noise, so their ratio is meaningful even when the absolute times drift.

Sessions are created with thread spinning off. With it on, the idle session's worker threads keep
spinning after each run and steal the cores from the other session: on 2 cores a dense MobileNetV2
measured 6.0 ms next to its pruned twin but 3.9 ms next to a copy of itself, which inflated the
speed-up from 1.45x to 2.5x. Without spinning, two copies of one model time within 1% of each other.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError

__all__ = [
    "OutputDifference",
    "failing_node",
    "Latency",
    "session",
    "random_inputs",
    "compare_outputs",
    "paired_latency",
    "classify",
    "top1_accuracy",
]

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def run_pruned_tokens(pruned: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model whose token axis was pruned; a failure is a refusal naming the node, not an internal error.

    Token pruning assumes every layer after the first pruned one continues the pruned stream. A model that
    joins that stream with a tensor carrying every token (a skip connection around the attention blocks, a
    fixed-length table added late) breaks the assumption only at run time, where onnxruntime names the node.
    """
    try:
        return pruned.run(None, dict(feeds))
    except Exception as error:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
        raise InvalidRequestError(
            f"token pruning does not apply to this model: {failing_node(error)} fails in onnxruntime once tokens are removed (it joins "
            "the pruned token stream with a tensor that keeps every token, e.g. a skip around the attention blocks); "
            "prune heads or channels instead (--prune heads,channels)"
        ) from error


def failing_node(error: Exception) -> str:
    """The node an onnxruntime run error names ("node 'X'"), or a generic phrase where it names none."""
    found = re.search(r"Name:'([^']*)'", str(error))
    return f"node '{found.group(1)}'" if found else "a node after the pruned layers"


def session(model: bytes | str | Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # fatal only: pruned constants ORT would warn about are gone anyway, and a failing run raises its error itself
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def random_inputs(
    sess: ort.InferenceSession, seed: int = 0, symbolic: int = 1, length: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One random input per model input; symbolic dims become `symbolic` (or, past the first axis, `length`
    where given: a sequence length), inputs named in `shapes` get those, integer inputs are small ids.

    A symbolic dim past the first axis that shares its name with some input's first axis is a batch axis too
    (a recurrent state `[2, batch, 128]` next to an input `[batch, samples]`): it takes `symbolic`, or the
    model would not run on its own inputs."""
    rng = np.random.default_rng(seed)
    batch_names = {spec.shape[0] for spec in sess.get_inputs() if spec.shape and isinstance(spec.shape[0], str)}
    feeds = {}
    for spec in sess.get_inputs():
        shape = list((shapes or {}).get(spec.name) or [
            d if isinstance(d, int) and d > 0
            else (length if length and axis > 0 and d not in batch_names else symbolic)
            for axis, d in enumerate(spec.shape)
        ])
        dtype = _NUMPY_TYPES.get(spec.type)
        if dtype is None:
            raise ValueError(f"input '{spec.name}' has unsupported type {spec.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


@dataclass(frozen=True)
class OutputDifference:
    """How far a model's outputs are from a reference, over all outputs."""

    max_abs: float
    max_relative: float  # max |a - b| / max |b|, per output

    def __str__(self) -> str:
        return f"max |diff| {self.max_abs:.3g} (relative {self.max_relative:.3g})"


def compare_outputs(reference: list[np.ndarray], other: list[np.ndarray]) -> OutputDifference:
    """Over outputs of equal shape (token pruning shortens outputs with a token axis: those are not compared)."""
    max_abs = max_rel = 0.0
    for ref, out in zip(reference, other):
        ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            continue
        diff = float(np.abs(ref - out).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return OutputDifference(max_abs, max_rel)


@dataclass(frozen=True)
class Latency:
    dense_ms: float
    pruned_ms: float
    repeats: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms if self.pruned_ms > 0 else float("inf")


def paired_latency(
    dense: ort.InferenceSession,
    pruned: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    repeats: int = 20,
    warmup: int = 3,
    progress: bool = False,
    pruned_feeds: dict[str, np.ndarray] | None = None,
    gap: float = 0.0,
) -> Latency:
    """Median wall time of each model, runs interleaved in this process. `pruned_feeds` where the pruned
    model takes other inputs (a pruned KV cache). `gap`: seconds of idle before each timed run, for an
    engine whose thread pool keeps spinning after a call and would slow the other engine's run next to it."""
    runs = ((0, dense, feeds), (1, pruned, feeds if pruned_feeds is None else pruned_feeds))
    for _ in range(warmup):
        for _, sess, inputs in runs:
            sess.run(None, inputs)
    times = {0: [], 1: []}
    for _ in tqdm(range(repeats), desc="latency", unit="pair", disable=not progress, leave=False):
        for key, sess, inputs in runs:
            if gap:
                time.sleep(gap)
            start = time.perf_counter()
            sess.run(None, inputs)
            times[key].append(time.perf_counter() - start)
    return Latency(1000 * float(np.median(times[0])), 1000 * float(np.median(times[1])), repeats)


def classify(model: bytes | str | Path, data: CalibrationData, progress: str | None = None) -> np.ndarray:
    """The top-1 class onnxruntime gives every sample of `data` (argmax of the first output)."""
    sess = session(model)
    predictions = [np.argmax(sess.run(None, feeds)[0], axis=1) for feeds, _ in data.batches(progress=progress)]
    return np.concatenate(predictions)


def top1_accuracy(model: bytes | str | Path, data: CalibrationData, progress: str | None = None) -> float:
    """Fraction of `data`'s labelled samples the model classifies correctly."""
    if data.labels is None:
        raise InvalidRequestError(f"accuracy needs labels: {data.source} has no 'labels' array")
    predictions = classify(model, data, progress)
    return float(np.mean(predictions == data.labels[: len(predictions)]))

"""Calibration data: the inputs data-driven passes (importance, sensitivity, fine-tuning) run on.

Sources: an `.npz` with one array per model input (samples along axis 0) and optionally `labels`; a
folder of images; any iterable of input dictionaries (Python API); or, when nothing is given, random
inputs, with a warning that scores then reflect the weights only.

Model inputs of rank 0 (a sample rate, a threshold) are not batched: the data holds one value per sample
along axis 0 like any input, and each batch passes its first sample's value as the scalar.

Plain text (`.txt`) is for language models: tokenised with the model's tokenizer and cut into windows
of `length` consecutive tokens, `count` of them spread evenly over the text (so a calibration set samples
the whole file, not its opening pages); each window is one sample of `input_ids`.

Image folders are preprocessed the way ImageNet classifiers expect unless told otherwise: decoded as RGB
(or grayscale for 1-channel inputs), resized to the model's input height and width (bilinear), scaled to
[0, 1], normalised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), laid out as NCHW.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError

__all__ = ["CalibrationData", "InputSpec", "input_specs", "load_calibration", "text_windows", "IMAGE_SUFFIXES", "TEXT_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
TEXT_SUFFIXES = (".txt",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABELS_KEY = "labels"


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None: symbolic
    dtype: np.dtype

    @property
    def scalar(self) -> bool:
        """A rank-0 input: one value per call, not per sample."""
        return not self.shape

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None if the batch axis is symbolic."""
        return self.shape[0] if self.shape else None


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        shape = tuple(d if isinstance(d, int) else None for d in value.shape) if value.shape is not None else ()
        specs.append(InputSpec(value.name, shape, np.dtype(value.dtype.numpy())))
    return specs


@dataclass
class CalibrationData:
    """Samples for a model's inputs, served in batches the model accepts."""

    inputs: dict[str, np.ndarray]  # input name -> [samples, ...]
    labels: np.ndarray | None = None
    source: str = "arrays"
    synthetic: bool = False
    batch_size: int = 32
    _specs: list[InputSpec] = field(default_factory=list, repr=False)

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(
        self, progress: str | None = None, shuffle_seed: int | None = None
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(inputs, labels) per batch; a model with a fixed batch size gets exactly that size.

        `progress` names a tqdm bar to show while iterating (none when None); `shuffle_seed` visits the
        samples in a seeded random order (training), otherwise in file order (scoring, caching).
        """
        from tqdm.auto import tqdm

        size, end = self._batching()
        scalars = {s.name for s in self._specs if s.scalar}
        order = None if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(self.num_samples)
        for start in tqdm(range(0, end, size), desc=progress, unit="batch", disable=progress is None, leave=False):
            picked = slice(start, start + size) if order is None else order[start : start + size]
            labels = None if self.labels is None else self.labels[picked]
            first = picked.start if order is None else picked[0]
            yield {k: v[first, ...] if k in scalars else v[picked] for k, v in self.inputs.items()}, labels

    @property
    def num_batches(self) -> int:
        size, end = self._batching()
        return len(range(0, end, size))

    def _batching(self) -> tuple[int, int]:
        """Batch size and the end of the last batch: a fixed-batch model cannot take a short last batch."""
        size = self.model_batch or self.batch_size
        return size, self.num_samples - self.num_samples % size if self.model_batch else self.num_samples

    @property
    def model_batch(self) -> int | None:
        fixed = [s.batch for s in self._specs if s.batch is not None]
        return min(fixed) if fixed else None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (batch for batch, _ in self.batches())

    def digest(self) -> str:
        """A content hash, for caches keyed on the data."""
        h = hashlib.sha256()
        for name in sorted(self.inputs):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.inputs[name]).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls, model: ir.Model, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
        source: str = "arrays", batch_size: int = 32,
    ) -> CalibrationData:
        specs = input_specs(model)
        inputs = {}
        for spec in specs:
            if spec.name not in arrays:
                raise InvalidRequestError(
                    f"calibration data {source} has no array for model input '{spec.name}' "
                    f"(it has: {', '.join(sorted(arrays)) or 'nothing'})"
                )
            inputs[spec.name] = _conform(np.asarray(arrays[spec.name]), spec, source)
        batched = [len(inputs[s.name]) for s in specs if not s.scalar]
        for spec in specs:  # one value given for a scalar input holds for every sample
            if spec.scalar and len(inputs[spec.name]) == 1 and batched:
                inputs[spec.name] = np.repeat(inputs[spec.name], batched[0])
        extra = set(arrays) - {s.name for s in specs} - {LABELS_KEY}
        if extra:
            raise InvalidRequestError(f"calibration data {source} has arrays the model does not take: {', '.join(sorted(extra))}")
        counts = {len(v) for v in inputs.values()}
        if len(counts) != 1 or 0 in counts:
            raise InvalidRequestError(f"calibration data {source}: inputs must hold the same, non-zero number of samples")
        fixed = max((s.batch for s in specs if s.batch is not None), default=1)
        if next(iter(counts)) < fixed:
            raise InvalidRequestError(f"calibration data {source}: fewer samples than the model's fixed batch size {fixed}")
        if labels is not None:
            labels = np.asarray(labels)
            if len(labels) != next(iter(counts)) or not np.issubdtype(labels.dtype, np.integer):
                raise InvalidRequestError(f"calibration data {source}: '{LABELS_KEY}' must be one integer per sample")
        return cls(inputs, labels, source, False, batch_size, specs)

    @classmethod
    def from_npz(cls, model: ir.Model, path: str | os.PathLike[str], batch_size: int = 32) -> CalibrationData:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise InvalidRequestError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
        labels = arrays.pop(LABELS_KEY, None)
        return cls.from_arrays(model, arrays, labels, source=str(path), batch_size=batch_size)

    @classmethod
    def from_iterable(cls, model: ir.Model, samples: Iterable[Mapping[str, np.ndarray]], batch_size: int = 32) -> CalibrationData:
        """Concatenate any iterable of input dictionaries (each a batch) along the sample axis."""
        collected: dict[str, list[np.ndarray]] = {}
        for sample in samples:
            for name, array in sample.items():
                collected.setdefault(name, []).append(np.asarray(array))
        if not collected:
            raise InvalidRequestError("calibration iterable yielded no samples")
        arrays = {name: np.concatenate(parts) for name, parts in collected.items()}
        labels = arrays.pop(LABELS_KEY, None)
        return cls.from_arrays(model, arrays, labels, source="iterable", batch_size=batch_size)

    @classmethod
    def from_text(
        cls, model: ir.Model, path: str | os.PathLike[str], tokenizer, windows: int = 128, length: int = 256,
        batch_size: int = 32,
    ) -> CalibrationData:
        """`windows` token windows of `length` from the text file at `path`, as the model's `input_ids`."""
        specs = input_specs(model)
        if len(specs) != 1 or len(specs[0].shape) != 2 or not np.issubdtype(specs[0].dtype, np.integer):
            raise InvalidRequestError(f"{path}: text calibration needs a language model with one input of token ids [batch, seq]")
        tokens = text_windows(_read_text(path), tokenizer, length, windows, source=str(path))
        return cls.from_arrays(model, {specs[0].name: tokens}, source=str(path), batch_size=batch_size)

    @classmethod
    def from_images(
        cls, model: ir.Model, folder: str | os.PathLike[str], batch_size: int = 32,
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    ) -> CalibrationData:
        from PIL import Image, UnidentifiedImageError

        folder = Path(folder)
        specs = input_specs(model)
        if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].shape[1] not in (1, 3) or None in specs[0].shape[2:]:
            raise InvalidRequestError("image-folder calibration needs a model with one NCHW input of 1 or 3 channels and fixed size")
        spec = specs[0]
        channels, height, width = spec.shape[1:]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InvalidRequestError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        images = []
        for file in files:
            try:
                with Image.open(file) as image:
                    image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
                    array = np.asarray(image, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise InvalidRequestError(f"{file}: not a readable image ({exc})") from None
            array = array.reshape(height, width, channels).transpose(2, 0, 1)
            m = np.asarray(mean[:channels], np.float32).reshape(channels, 1, 1)
            s = np.asarray(std[:channels], np.float32).reshape(channels, 1, 1)
            images.append((array - m) / s)
        return cls.from_arrays(model, {spec.name: np.stack(images)}, source=str(folder), batch_size=batch_size)

    @classmethod
    def random(cls, model: ir.Model, samples: int = 64, batch_size: int = 32, seed: int = 0) -> CalibrationData:
        """Random inputs; symbolic dims become 1.

        Floating inputs are Gaussian. The value range of an integer or boolean input cannot be known from
        its type: an input the graph compares for equality with constants (silero's `sr == 16000`, a mode
        switch) takes the first such constant, so the branch the model was built for runs; other integer
        inputs are small non-negative ids (0 or 1), valid for embeddings, masks and flags. Real values
        come from `--calib`.
        """
        rng = np.random.default_rng(seed)
        hints = _compared_constants(model)
        arrays = {}
        for spec in input_specs(model):
            per_sample = [d if d is not None else 1 for d in spec.shape[1:]]
            shape = [samples, *per_sample]
            if np.issubdtype(spec.dtype, np.floating):
                arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.name in hints:
                arrays[spec.name] = np.full(shape, hints[spec.name], dtype=spec.dtype)
            else:
                arrays[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        data = cls.from_arrays(model, arrays, source="random inputs", batch_size=batch_size)
        data.synthetic = True
        return data


def _compared_constants(model: ir.Model) -> dict[str, int]:
    """Graph inputs that some node (subgraphs included) tests with Equal against a constant: input -> constant."""
    inputs = {id(v): v.name for v in model.graph.inputs}
    found: dict[str, int] = {}
    for node in model.graph.all_nodes():
        if node.op_type != "Equal" or len(node.inputs) != 2:
            continue
        for mine, other in (node.inputs, reversed(node.inputs)):
            constant = None if other is None else ir.convenience.get_const_tensor(other)
            if mine is not None and id(mine) in inputs and constant is not None and constant.size == 1:
                found.setdefault(inputs[id(mine)], int(constant.numpy().reshape(-1)[0]))
    return found


def _conform(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """Check an input array against the model's input; floats may be cast between widths.

    A rank-0 input takes one value per sample (an array of rank 1); a single scalar is that value for
    every sample, so an .npz may store `sr=16000` as it is.
    """
    if spec.scalar and array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != len(spec.shape) + spec.scalar:
        raise InvalidRequestError(
            f"calibration data {source}: '{spec.name}' has {array.ndim} dims, the model input has {len(spec.shape)} "
            f"(shape {_shape_text(spec.shape)}; samples go along axis 0"
            + (", one value per sample or one for all)" if spec.scalar else ")")
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
        if want is not None and got != want:
            raise InvalidRequestError(
                f"calibration data {source}: '{spec.name}' has shape {tuple(array.shape)}, "
                f"the model input is {_shape_text(spec.shape)} (axis {axis} differs)"
            )
    same_kind = np.issubdtype(array.dtype, np.floating) == np.issubdtype(spec.dtype, np.floating)
    if not same_kind or array.dtype.kind not in "fiub":
        raise InvalidRequestError(f"calibration data {source}: '{spec.name}' is {array.dtype}, the model input is {spec.dtype}")
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidRequestError(f"{path}: not a readable text file ({exc.strerror})") from None


def text_windows(text: str, tokenizer, length: int, count: int | None = None, source: str = "text") -> np.ndarray:
    """Token windows [windows, length] (int64) of `text`: `count` of them spread evenly over it (disjoint
    when the text holds that many), or every whole window in order when `count` is None."""
    if length < 2:
        raise InvalidRequestError(f"{source}: token windows need a length of at least 2, got {length}")
    tokens = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    whole = len(tokens) // length
    if whole == 0:
        raise InvalidRequestError(f"{source}: {len(tokens)} tokens, fewer than one window of {length}")
    if count is None:
        starts = np.arange(whole) * length
    else:
        if count < 1:
            raise InvalidRequestError(f"{source}: the number of windows must be at least 1, got {count}")
        starts = np.linspace(0, len(tokens) - length, count).round().astype(np.int64)
    return np.stack([tokens[s : s + length] for s in starts])


def load_calibration(
    model: ir.Model, path: str | os.PathLike[str] | None, batch_size: int = 32, seed: int = 0, tokenizer=None,
    windows: int = 128, length: int = 256,
) -> CalibrationData:
    """What `--calib` gives: an .npz, an image folder, a text file (`windows` x `length` tokens; language
    models, with their `tokenizer`), or (None) random inputs."""
    if path is None:
        return CalibrationData.random(model, batch_size=batch_size, seed=seed)
    path = Path(path)
    if path.is_dir():
        return CalibrationData.from_images(model, path, batch_size=batch_size)
    if not path.exists():
        raise InvalidRequestError(f"{path}: no such calibration file")
    if path.suffix.lower() in TEXT_SUFFIXES:
        if tokenizer is None:
            raise InvalidRequestError(f"{path}: text calibration is for language models (a .gguf file or a Hugging Face folder)")
        return CalibrationData.from_text(model, path, tokenizer, windows, length, batch_size=batch_size)
    if path.suffix.lower() != ".npz":
        raise InvalidRequestError(f"{path}: calibration data must be an .npz file, a folder of images or a .txt file")
    return CalibrationData.from_npz(model, path, batch_size=batch_size)

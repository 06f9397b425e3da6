"""Shared fixtures: the example model zoo exported once per test session, and small helpers."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import zoo  # noqa: E402  (examples/zoo.py: the model definitions)

from pcc.compiler import from_torch  # noqa: E402

ort.set_default_logger_severity(3)
logging.getLogger("torch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class ZooCache:
    """Exports each zoo model at most once per session; hands out fresh IR copies and ONNX files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._protos: dict[str, onnx.ModelProto] = {}
        self._inputs: dict[str, np.ndarray] = {}

    def proto(self, name: str) -> onnx.ModelProto:
        """A private copy: onnx's own savers rewrite a proto in place (external data)."""
        if name not in self._protos:
            module, example = zoo.build(name)
            self._protos[name] = ir.serde.serialize_model(from_torch(module, (example,)))
            self._inputs[name] = example.numpy()
        copy = onnx.ModelProto()
        copy.CopyFrom(self._protos[name])
        return copy

    def model(self, name: str) -> ir.Model:
        """A fresh, independent IR copy (pipelines modify models in place)."""
        return ir.serde.deserialize_model(self.proto(name))

    def example_input(self, name: str) -> np.ndarray:
        self.proto(name)
        return self._inputs[name]

    def path(self, name: str) -> Path:
        path = self.directory / f"{name}.onnx"
        if not path.exists():
            onnx.save(self.proto(name), path)
        return path


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> ZooCache:
    return ZooCache(tmp_path_factory.mktemp("zoo"))


def run_onnx(model: ir.Model | onnx.ModelProto | bytes | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def max_relative_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(float(np.abs(y).max()), 1e-12)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst

"""Writing a model so that no half-written or unchecked file is ever left behind.

The model is written to a temporary folder inside the destination folder, checked there with the full
onnx.checker (which includes strict shape inference) and loaded by onnxruntime; only then is it moved
into place with an atomic rename. Models over protobuf's 2 GB limit keep their weights in one external
data file beside the model (`<name>.data`), moved into place the same way. A weight the graph also reads
transposed (a tied embedding and LM head) is stored once (`ShareTransposedWeights`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from pcc.passes.transforms.share_transposed_weights import ShareTransposedWeights

__all__ = ["write_checked"]

_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_THRESHOLD = _PROTOBUF_LIMIT - 64 * 2**20  # leave room for the graph itself


def write_checked(model: ir.Model, path: str | os.PathLike[str], verify: Callable[[Path], None] | None = None) -> None:
    """Serialise, check, verify (e.g. run it) and atomically move `model` to `path`. `model` keeps what it
    computes but may lose duplicate transposed weights (see the module docstring)."""
    path = Path(path)
    ShareTransposedWeights()(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = ir.serde.serialize_model(model)
    external = proto.ByteSize() > _EXTERNAL_THRESHOLD
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        staged = Path(staging) / path.name
        if external:
            onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        else:
            staged.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(staged), full_check=True)
        if verify is not None:
            verify(staged)
        if external:
            os.replace(staged.with_name(data_name), path.with_name(data_name))
        os.replace(staged, path)

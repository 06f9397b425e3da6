"""Loading and running a library written by `pcc compile --target tvm` (what `pcc run` does).

The deployment artefact is two files: MODEL.so (`export_library` of the Relax executable) and MODEL.json
beside it (input and output names, shapes, dtypes, and how it was built). Running needs only
`tvm.runtime` and the Relax VM, no pcc and no ONNX, so the same few lines work on a deployment host;
this module adds the checks that turn a wrong input file into one clear error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcc.compiler.errors import InvalidRequestError, ModelLoadError

__all__ = ["CompiledModel", "save_outputs", "spec_path"]


def spec_path(library: Path) -> Path:
    return library.with_suffix(".json")


@dataclass
class CompiledModel:
    library: Path
    spec: dict
    vm: object

    @classmethod
    def load(cls, library: Path) -> CompiledModel:
        import tvm
        from tvm import relax

        from pcc.backends.tvm.host import use_all_cores

        use_all_cores()  # before the first kernel call starts TVM's thread pool
        if not library.is_file():
            raise ModelLoadError(f"{library}: no such file")
        if not spec_path(library).is_file():
            raise ModelLoadError(f"{library}: its description {spec_path(library).name} is missing (pcc writes both)")
        try:
            spec = json.loads(spec_path(library).read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{spec_path(library)}: not a pcc model description ({exc})") from None
        try:
            module = tvm.runtime.load_module(str(library))
            vm = relax.VirtualMachine(module, tvm.cpu())
        except Exception as exc:  # TVM raises its own error types for unreadable libraries
            raise ModelLoadError(f"{library}: not a loadable TVM library ({str(exc).splitlines()[0]})") from None
        return cls(library, spec, vm)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        arguments = []
        for expected in self.spec["inputs"]:
            if expected["name"] not in feeds:
                raise InvalidRequestError(f"input {expected['name']!r} is missing (the model takes {self._names('inputs')})")
            value = np.asarray(feeds[expected["name"]])
            if list(value.shape) != expected["shape"] or value.dtype != np.dtype(expected["dtype"]):
                raise InvalidRequestError(
                    f"input {expected['name']!r} is {value.dtype}{list(value.shape)}, the model takes "
                    f"{expected['dtype']}{expected['shape']}"
                )
            arguments.append(tvm.runtime.tensor(np.ascontiguousarray(value)))
        result = self.vm["main"](*arguments)
        values = [result] if hasattr(result, "numpy") else list(result)
        return {spec["name"]: value.numpy() for spec, value in zip(self.spec["outputs"], values)}

    def run_npz(self, path: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(path) as archive:
                feeds = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{path}: not a readable .npz ({exc})") from None
        return self.run(feeds)

    def _names(self, kind: str) -> str:
        return ", ".join(spec["name"] for spec in self.spec[kind])


def save_outputs(outputs: dict[str, np.ndarray], path: Path) -> None:
    """Written under a temporary name and moved into place: never half a file."""
    staged = path.with_name(f".{path.name}.tmp.npz")
    np.savez(staged, **outputs)
    os.replace(staged, path)

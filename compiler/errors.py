"""Errors a user can act on.

Every `PccError` names the file, value, node or op at fault. The command line prints it as one line,
`pcc: error: ...`, and exits with status 2; any other exception is a bug in pcc (exit 1, traceback).
"""

from __future__ import annotations

__all__ = [
    "PccError",
    "ModelLoadError",
    "UnsupportedModelError",
    "UnresolvedShapeError",
    "InvalidRequestError",
]


class PccError(Exception):
    """Base class of the errors caused by the input or the request, not by pcc itself."""


class ModelLoadError(PccError):
    """The model file is missing, empty, truncated, not ONNX, or its external data is missing."""


class UnsupportedModelError(PccError):
    """The model is valid ONNX but uses something pcc cannot handle (opset, op, attribute)."""


class UnresolvedShapeError(PccError):
    """A channel dimension pcc needs could not be inferred."""


class InvalidRequestError(PccError):
    """The request itself is out of range or cannot apply to this model."""

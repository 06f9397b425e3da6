"""Perplexity of a causal language model on held-out text, run in onnxruntime.

The text is cut into disjoint windows of a fixed number of tokens (`calibration.text_windows`); each
window is one forward pass, and every token after the first is scored by the model's prediction from the
tokens before it in the same window. Perplexity is exp of the mean negative log-likelihood over all
scored tokens. Windows (not a sliding context) keep every model, dense or pruned, scored on exactly the
same predictions at the same cost; a longer window gives a lower perplexity, so results state it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.backends.onnx.runtime import session
from pcc.compiler.calibration import text_windows
from pcc.compiler.errors import InvalidRequestError

__all__ = ["Perplexity", "perplexity", "text_perplexity"]


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens: int  # predictions scored
    windows: int
    length: int  # tokens per window

    def __str__(self) -> str:
        return f"{self.value:.2f} ({self.tokens} tokens in {self.windows} windows of {self.length})"


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per position, from logits [..., vocab] computed in float64 per row."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - norm


def perplexity(model: ir.Model | bytes | str | os.PathLike[str], windows: np.ndarray, batch_size: int = 4) -> Perplexity:
    """Perplexity of `model` (IR, serialised ONNX, or an ONNX file) over token `windows` [count, length]."""
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise InvalidRequestError(f"perplexity needs token windows [count, length >= 2], got shape {windows.shape}")
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model).SerializeToString()
    sess = session(model if isinstance(model, bytes) else Path(model))
    name = sess.get_inputs()[0].name
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = sess.run(None, {name: batch})[0]
        total -= float(_log_softmax_at(logits[:, :-1], batch[:, 1:]).sum())
    scored = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity(math.exp(total / scored), scored, windows.shape[0], windows.shape[1])


def text_perplexity(
    model: ir.Model | bytes | str | os.PathLike[str], path: str | os.PathLike[str], tokenizer, length: int = 256,
    windows: int | None = None, batch_size: int = 4,
) -> Perplexity:
    """`--eval FILE.txt`: perplexity over the file's disjoint `length`-token windows (the first `windows`
    of them, or all)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidRequestError(f"{path}: not a readable text file ({exc.strerror})") from None
    tokens = text_windows(text, tokenizer, length, source=str(path))
    return perplexity(model, tokens if windows is None else tokens[:windows], batch_size)

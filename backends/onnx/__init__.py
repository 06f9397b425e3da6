"""ONNX backend: checked, atomic output that runs in onnxruntime, with measured latency."""

from pcc.backends.onnx.runtime import compare_outputs, paired_latency, random_inputs, session
from pcc.backends.onnx.target import OnnxTarget
from pcc.backends.onnx.writer import write_checked

__all__ = ["OnnxTarget", "compare_outputs", "paired_latency", "random_inputs", "session", "write_checked"]

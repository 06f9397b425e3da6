"""pcc's passes, each an `onnx_ir` pass: `analysis` (read), `allocation` (decide), `transforms` (rewrite)."""

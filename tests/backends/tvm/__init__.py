from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from pcc.compiler.cli import main


def compile_block_sparse(model: ir.Model, library: Path, sparsity: float, capsys) -> str:
    """Save `model` beside `library`, run `pcc compile --sparsify block:16x1 --target tvm` on it in this
    process (which checks the library against onnxruntime) and return what it printed; it must succeed."""
    source = library.with_suffix(".onnx")
    onnx.save(ir.serde.serialize_model(model), source)
    code = main(["compile", str(source), "--sparsity", str(sparsity), "--sparsify", "block:16x1", "--target", "tvm",
                 "-o", str(library), "--repeats", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "matches onnxruntime on the pruned ONNX" in printed
    return printed

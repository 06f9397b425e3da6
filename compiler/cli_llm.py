"""`pcc compile` on language models: a `.gguf` file or a Hugging Face folder in, text calibration, perplexity.

The compile command (compiler/cli.py) calls these at four points: `add_arguments` when building its
parser, `load_model` instead of reading an ONNX file, `calibration_options` for `load_calibration`, and
`finish` after the target wrote the output (the tokenizer beside it; `--eval` perplexity dense vs pruned
into the report). Heavy imports stay inside the functions so `pcc --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "load_model", "dense_source", "calibration_options", "finish"]


def add_arguments(compile_parser: argparse.ArgumentParser) -> None:
    group = compile_parser.add_argument_group("language models (MODEL a .gguf file or a Hugging Face folder; pcc[llm])")
    group.add_argument("--calib-windows", type=int, default=128, metavar="N",
                       help="with --calib FILE.txt: token windows taken, spread evenly over the text (default 128)")
    group.add_argument("--calib-length", type=int, default=256, metavar="L",
                       help="with --calib FILE.txt: tokens per window (default 256)")
    group.add_argument("--eval", type=Path, default=None, metavar="FILE.txt",
                       help="held-out text: perplexity of the dense and the pruned model (onnxruntime, disjoint "
                       "windows of --calib-length tokens) in the summary and report.json")
    group.add_argument("--eval-windows", type=int, default=None, metavar="N",
                       help="with --eval: score only the first N windows (default: all)")


def load_model(path: Path) -> tuple[Any, Any]:
    """(the IR, the tokenizer) for a language model; (the IR, None) for an ONNX file."""
    from pcc.compiler.frontend import load_onnx
    from pcc.compiler.llm import is_causal_lm_path, load_causal_lm

    if is_causal_lm_path(path):
        import logging

        import torch  # noqa: F401  (its logging set-up runs at import and would undo the level below)

        if logging.getLogger().level >= logging.ERROR:  # not --verbose: the exporter's notices are not ours
            logging.getLogger("torch").setLevel(logging.ERROR)
        return load_causal_lm(path)
    return load_onnx(path), None


def dense_source(path: Path, model: Any, tokenizer: Any) -> bytes | Path:
    """What the target compares and times the pruned model against: the input file, or for a language
    model (no ONNX file exists) the serialised dense IR, taken before any pass changes it."""
    import onnx_ir as ir

    return path if tokenizer is None else ir.serde.serialize_model(model).SerializeToString()


def calibration_options(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Keywords for `load_calibration`: the tokenizer and the window sizes (a .txt --calib needs them)."""
    from pcc.compiler.errors import InvalidRequestError

    for flag, value in (("--calib-windows", args.calib_windows), ("--calib-length", args.calib_length),
                        ("--eval-windows", args.eval_windows)):
        if value is not None and value < 1:
            raise InvalidRequestError(f"{flag} must be at least 1, got {value}")
    if args.eval is not None and tokenizer is None:
        raise InvalidRequestError("--eval FILE.txt measures perplexity: it needs a language model (a .gguf file or a Hugging Face folder)")
    return {"tokenizer": tokenizer, "windows": args.calib_windows, "length": args.calib_length}


def finish(args: argparse.Namespace, report: Any, dense: bytes | Path, output: Path, tokenizer: Any) -> None:
    """After the output is written: save the tokenizer beside it and, with `--eval`, set the report's
    `perplexity_dense` / `perplexity_pruned` (and `perplexity_text`: what they were measured on)."""
    if tokenizer is None:
        return
    from pcc.compiler.llm import save_tokenizer
    from pcc.passes.analysis.perplexity import text_perplexity

    save_tokenizer(tokenizer, output)
    if args.eval is None:
        return
    measured = [text_perplexity(model, args.eval, tokenizer, args.calib_length, args.eval_windows) for model in (dense, output)]
    report.perplexity_dense, report.perplexity_pruned = measured[0].value, measured[1].value
    report.perplexity_text = f"{args.eval}: {measured[0].tokens} tokens in windows of {measured[0].length}"

"""`pcc soup` and `pcc delta`: models made from the weights of other models (passes/transforms/model_arithmetic.py).

    pcc soup A.onnx B.onnx [C.onnx ...] [-o OUT] [--eval FILE.npz]
    pcc delta BASE.onnx FINETUNED.onnx [--merge FINETUNED2.onnx ...] --drop P [--seed N] [-o OUT] [--eval FILE.npz]

`soup` averages models that share a graph and a sparsity mask; `delta` keeps a random 1 − P of the
fine-tuned model's changes to the base, rescaled (DARE), and with `--merge` adds other fine-tuned
models' DARE-d deltas. With `--eval`, each input model's and the result's top-1 accuracy is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pcc.compiler.errors import InvalidRequestError

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("soup", "delta")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `soup` and `delta` to pcc's subcommands."""
    soup = commands.add_parser("soup", help="average models that share a graph and a sparsity mask")
    soup.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="two or more ONNX models (the ingredients)")
    soup.add_argument("-o", "--output", type=Path, help="output file (default: ./FIRST.soup.onnx)")
    _common(soup)

    delta = commands.add_parser("delta", help="DARE: drop and rescale a fine-tuned model's changes to its base (and merge)")
    delta.add_argument("base", type=Path, help="the model that was fine-tuned (ONNX)")
    delta.add_argument("finetuned", type=Path, help="the fine-tuned model (ONNX); the output has its graph")
    delta.add_argument("--merge", type=Path, nargs="+", default=[], metavar="MODEL",
                       help="other models fine-tuned from BASE, with FINETUNED's graph: their DARE-d deltas are added too")
    delta.add_argument("--drop", type=float, required=True, metavar="P",
                       help="probability of dropping each changed number, in [0, 1); the rest are scaled by 1/(1-P)")
    delta.add_argument("--seed", type=int, default=0, help="seed of the random drop (default: 0)")
    delta.add_argument("-o", "--output", type=Path, help="output file (default: ./FINETUNED.dare.onnx)")
    _common(delta)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval", type=Path, metavar="FILE", help="labelled .npz to report each model's top-1 accuracy on")
    parser.add_argument("--verbose", action="store_true", help="library warnings")


def run(args: argparse.Namespace) -> int:
    """Run `pcc soup` or `pcc delta`; `PccError`s propagate to the caller (exit 2)."""
    from pcc.compiler.frontend import load_onnx
    from pcc.passes.transforms.model_arithmetic import AverageWeights, DeltaReport, DropAndRescaleDelta, SoupReport

    if args.command == "soup":
        if len(args.models) < 2:
            raise InvalidRequestError(f"a soup needs at least two models, got {len(args.models)}")
        inputs = list(args.models)
        output = _output(args.output, inputs, f"{inputs[0].stem}.soup.onnx")
        models = [load_onnx(path) for path in inputs]
        tool = AverageWeights(models[1:], labels=[str(path) for path in inputs])
        report_type = SoupReport
    else:
        if not 0 <= args.drop < 1:
            raise InvalidRequestError(f"--drop is a probability in [0, 1), got {args.drop}")
        inputs = [args.finetuned, *args.merge]
        output = _output(args.output, [args.base, *inputs], f"{args.finetuned.stem}.dare.onnx")
        models = [load_onnx(path) for path in inputs]
        tool = DropAndRescaleDelta(load_onnx(args.base), args.drop, args.seed, others=models[1:],
                                   labels=[str(args.finetuned), str(args.base), *map(str, args.merge)])
        report_type = DeltaReport
    return _write(tool, models[0], inputs, output, args.eval, report_type)


def _output(given: Path | None, inputs: list[Path], default: str) -> Path:
    output = given or Path.cwd() / default
    if any(path.exists() and output.resolve() == path.resolve() for path in inputs):
        raise InvalidRequestError(f"output {output} is one of the input models; pcc never overwrites its input")
    return output


def _write(tool, model, inputs: list[Path], output: Path, evaluation: Path | None, report_type) -> int:
    from pcc.backends.onnx.runtime import session, top1_accuracy
    from pcc.backends.onnx.writer import write_checked
    from pcc.compiler.calibration import load_calibration
    from pcc.compiler.pipeline import Pipeline

    data = load_calibration(model, evaluation, batch_size=256) if evaluation else None
    before = [top1_accuracy(str(path), data) for path in inputs] if data is not None else []
    result = Pipeline([tool]).run(model)
    write_checked(result.model, output, verify=lambda staged: session(staged))
    print(f"pcc: {', '.join(map(str, inputs))} -> {output}")
    print(f"  {result.get(report_type).summary()}")
    if data is not None:
        for path, accuracy in zip(inputs, before):
            print(f"  accuracy   {100 * accuracy:.2f}% top-1  {path}")
        print(f"  accuracy   {100 * top1_accuracy(str(output), data):.2f}% top-1  {output} (on {data.source})")
    return 0

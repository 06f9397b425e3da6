"""The `pcc` command line (see shared/CLI.md for the contract).

    pcc compile MODEL --sparsity S [--target onnx] [-o OUT] [--importance l1|l2|bn|random]
                [--allocator uniform|global] [--round-to N] [--report DIR] [--verbose] ...
    pcc inspect MODEL [--json] [--round-to N]

Exit status: 0 success; 2 bad input or a request that cannot apply (one line on stderr starting with
`pcc: error:`, no output file left behind); 1 an internal error (a bug: the traceback is shown).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pcc.backends import TARGETS
from pcc.compiler.errors import InvalidRequestError, PccError
from pcc.compiler.frontend import load_onnx
from pcc.compiler.pipeline import analysis_pipeline, channel_pruning_pipeline
from pcc.passes.allocation import ALLOCATORS
from pcc.passes.allocation.allocation import check_sparsity
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.importance import CRITERIA, REDUCTIONS

__all__ = ["main", "build_parser"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; pcc's contract is one line on stderr and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"pcc: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="pcc", description="pcc, a pruning compiler for neural networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    compile_ = commands.add_parser("compile", help="prune a model and lower it to a target")
    compile_.add_argument("model", type=Path, help="ONNX model file; external data beside it is read")
    compile_.add_argument(
        "--sparsity", type=float, required=True, help="fraction of the prunable parameters to remove, in [0, 1)"
    )
    compile_.add_argument("--target", default="onnx", choices=sorted(TARGETS), help="what to lower to (default: onnx)")
    compile_.add_argument("-o", "--output", type=Path, help="output file (default: ./MODEL.pruned.onnx)")
    compile_.add_argument("--importance", default="l2", choices=CRITERIA, help="unit importance criterion (default: l2)")
    compile_.add_argument(
        "--reduction", default="mean", choices=REDUCTIONS, help="how importance is reduced over a group's layers"
    )
    compile_.add_argument("--allocator", default="uniform", choices=list(ALLOCATORS), help="how the budget is split")
    compile_.add_argument(
        "--round-to", type=int, metavar="N", help="keep channel counts multiples of N (default: the target's, 8 for onnx)"
    )
    compile_.add_argument("--seed", type=int, default=0, help="seed for random importance and random test inputs")
    compile_.add_argument("--repeats", type=int, default=20, metavar="N", help="latency runs per model (default: 20)")
    compile_.add_argument("--report", type=Path, metavar="DIR", help="also write DIR/report.json")
    compile_.add_argument("--verbose", action="store_true", help="per-pass times, groups and library warnings")

    inspect = commands.add_parser("inspect", help="show ops, dependency groups and barriers")
    inspect.add_argument("model", type=Path, help="ONNX model file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--round-to", type=int, default=1, metavar="N", help="as for compile")
    inspect.add_argument("--verbose", action="store_true", help="list every group")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        if args.command == "compile":
            return _compile(args)
        return _inspect(args)
    except PccError as exc:
        message = " ".join(str(exc).split())
        print(f"pcc: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pcc: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    # torch, onnxscript and onnx_ir log freely; a compiler's output should be its own
    logging.basicConfig(level=logging.WARNING if verbose else logging.ERROR, format="%(name)s: %(message)s")
    if not verbose:
        warnings.filterwarnings("ignore")


def _compile(args: argparse.Namespace) -> int:
    check_sparsity(args.sparsity)
    if args.repeats < 1:
        raise InvalidRequestError(f"--repeats must be at least 1, got {args.repeats}")
    target = TARGETS[args.target](repeats=args.repeats, progress=sys.stderr.isatty(), seed=args.seed)
    output = args.output or target.default_output(args.model)
    if args.model.exists() and output.resolve() == args.model.resolve():
        raise InvalidRequestError(f"output {output} is the input model; pcc never overwrites its input")
    pipeline = channel_pruning_pipeline(
        args.sparsity,
        importance=args.importance,
        reduction=args.reduction,
        allocator=args.allocator,
        round_to=target.preferred_round_to if args.round_to is None else args.round_to,
        seed=args.seed,
    )
    model = load_onnx(args.model)
    result = pipeline.run(model, progress=sys.stderr.isatty())
    report = target.emit(
        result, args.model, output, model_name=str(args.model), allocator=args.allocator, importance=args.importance
    )
    print(report.format())
    if args.verbose:
        print("  pass times\n" + result.timing_table())
        groups = result.get(DependencyGroups)
        print("  groups\n" + "\n".join(f"    {g}" for g in groups.groups))
    if args.report:
        print(f"  report     {report.write_json(args.report)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.round_to < 1:
        raise InvalidRequestError(f"--round-to must be a positive integer, got {args.round_to}")
    result = analysis_pipeline(args.round_to).run(load_onnx(args.model))
    groups = result.get(DependencyGroups)
    ops = Counter(node.op_type for node in result.model.graph)
    summary = {
        "model": str(args.model),
        "ops": dict(ops.most_common()),
        "groups": len(groups.groups),
        "prunable_groups": sum(g.prunable for g in groups.groups),
        "units": groups.num_units,
        "barriers": [{"node": b.node, "op": b.op} for b in groups.barriers],
        "params": groups.total_params,
        "prunable_params": groups.prunable_params,
        "prunable_fraction": groups.prunable_fraction,
        "group_details": [
            {
                "index": g.index,
                "units": g.num_units,
                "channels_per_unit": g.channels_per_unit,
                "producers": g.producers,
                "consumers": g.consumers,
                "cross_channel_norm": g.cross_channel_norm,
            }
            for g in groups.groups
        ],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model      {args.model}  ({sum(ops.values())} nodes after folding constants)")
    print("ops        " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
    print(f"groups     {groups.summary()}")
    shown = groups.groups if args.verbose else [g for g in groups.groups if g.prunable][:20]
    for group in shown:
        print(f"  {group}")
    if not args.verbose and summary["prunable_groups"] > len(shown):
        print(f"  ... {summary['prunable_groups'] - len(shown)} more (--verbose lists all)")
    print(f"barriers   {len(groups.barriers)}")
    for barrier in groups.barriers:
        print(f"  {barrier.op} node '{barrier.node}': channels through it are not pruned")
    return 0

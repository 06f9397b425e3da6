"""The `pcc` command line (see shared/CLI.md for the contract).

    pcc compile MODEL --sparsity S [--target onnx|tvm|spatten] [-o OUT] [--importance CRITERION]
                [--allocator uniform|global|lamp|dp|metanet] [--metanet] [--budget params|macs|latency]
                [--calib FILE|DIR]
                [--workers N] [--ray [ADDRESS]] [--round-to N] [--no-bn-recalibration] [--report DIR]
                [--verbose] ...
    pcc compile MODEL --sparsity S --target spatten [-o DIR] [--calib FILE] [--spatten-config full|eighth]
                [--key-bits MSB+LSB] [--tau T] [--head-share F]
    pcc finetune PRUNED --data FILE [--teacher DENSE] [--epochs N] [--lr LR] [--eval FILE] [-o OUT]
    pcc inspect MODEL [--json] [--round-to N]
    pcc run MODEL.so --input X.npz [-o Y.npz]
    pcc soup A.onnx B.onnx ... [-o OUT] [--eval FILE]
    pcc delta BASE FINETUNED --drop P [--merge MODEL ...] [-o OUT] [--eval FILE]

Exit status: 0 success; 2 bad input or a request that cannot apply (one line on stderr starting with
`pcc: error:`, no output file left behind); 1 an internal error (a bug: the traceback is shown).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Only light modules at the top: `pcc --help` and argument errors must answer at once, so onnx, torch,
# tvm and the passes are imported by the commands that use them.
from pcc.compiler import cli_llm, cli_lowrank, cli_merge
from pcc.compiler.errors import InvalidRequestError, PccError
from pcc.compiler.options import (
    ALLOCATOR_NAMES, BUDGETS, RANK_ALLOCATORS, CRITERIA, DATA_CRITERIA, FINETUNE_PARAMS, HEAD_SHARE, PRUNABLE_KINDS, RECONSTRUCT_MODES,
    REDUCTIONS, SCHEDULES, SPATTEN_CONFIG_NAMES,
    TARGET_NAMES, CompileOptions, check_sparsity,
)

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
    compile_.add_argument("--target", default="onnx", choices=TARGET_NAMES, help="what to lower to (default: onnx)")
    compile_.add_argument("-o", "--output", type=Path, help="output file (default: ./MODEL.pruned.onnx); a folder for --target spatten")
    compile_.add_argument(
        "--prune", default="channels", type=_kinds, metavar="KINDS",
        help=f"what to remove, a comma list of {', '.join(PRUNABLE_KINDS)} (default: channels); "
        "channels removes conv channels and FFN units, width the width a LayerNorm normalises (a transformer's "
        "hidden size), heads whole attention heads, blocks whole residual blocks (transformer layers, ResNet blocks), "
        "tokens applies SpAtten's cascade token pruning; --sparsity applies to each kind named",
    )
    compile_.add_argument(
        "--sparsify", metavar="PATTERN",
        help="zero weights instead of removing units: unstructured, nm:N:M (N of every M along the reduction axis) or "
        "block:RxC; --sparsity is then the fraction of the MatMul/Gemm/Conv weights made zero",
    )
    compile_.add_argument(
        "--tvm-target", default="llvm", metavar="TARGET",
        help="with --target tvm: llvm (this CPU, detected), or a TVM target passed through (a JSON dict or a kind name)",
    )
    compile_.add_argument(
        "--spatten-config", default="full", choices=SPATTEN_CONFIG_NAMES,
        help="with --target spatten: the machine simulated, full SpAtten or SpAtten 1/8 (default: full)",
    )
    compile_.add_argument(
        "--key-bits", default="8+4", type=_key_bits, metavar="MSB+LSB",
        help="with --target spatten: key bits fetched first + LSBs fetched when a row's largest probability is "
        "below --tau (default: 8+4)",
    )
    compile_.add_argument(
        "--tau", type=float, default=0.1,
        help="with --target spatten: progressive quantization threshold on the largest attention probability; "
        "0 turns the LSB refetch off (default: 0.1)",
    )
    compile_.add_argument(
        "--head-share", type=float, default=HEAD_SHARE, metavar="F",
        help=f"with --target spatten: head sparsity = F x --sparsity, the rest comes from tokens (default: {HEAD_SHARE})",
    )
    compile_.add_argument("--importance", default="l2", choices=CRITERIA, help="unit importance criterion (default: l2)")
    compile_.add_argument(
        "--reduction", default="mean", choices=REDUCTIONS, help="how importance is reduced over a group's layers"
    )
    compile_.add_argument(
        "--allocator", default="uniform", choices=tuple(dict.fromkeys(ALLOCATOR_NAMES + RANK_ALLOCATORS)),
        help="how the budget is split; metanet rewrites the weights with the shipped metanetwork first, then ranks "
        "its group norms globally; energy chooses --factorize ranks by kept spectrum energy",
    )
    compile_.add_argument(
        "--metanet", action="store_true",
        help="rewrite the weights with the shipped metanetwork before scoring and allocating, with any allocator "
        "(on held-out Fashion-MNIST CNNs, best with --allocator dp)",
    )
    compile_.add_argument(
        "--budget", default="params", choices=BUDGETS,
        help="what --sparsity is a fraction of: prunable params, MACs, or latency measured in onnxruntime",
    )
    compile_.add_argument(
        "--calib", type=Path, metavar="FILE|DIR",
        help=".npz of named input arrays (+ optional 'labels') or a folder of images, for data-driven importance, "
        "sensitivity (dp) and the report",
    )
    compile_.add_argument("--workers", type=int, metavar="N", help="processes for the sensitivity sweep (default: all cores)")
    compile_.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run the sensitivity sweep on Ray: a local instance, or the cluster at ADDRESS (needs pcc[ray])",
    )
    compile_.add_argument(
        "--latency-batch", type=int, default=1, metavar="N", help="batch size latency is measured at (default: 1)"
    )
    compile_.add_argument(
        "--latency-length", type=int, default=128, metavar="N",
        help="size of other symbolic input axes (a sequence length) when measuring latency (default: 128)"
    )
    compile_.add_argument(
        "--input-shape", type=_input_shape, action="append", default=[], metavar="NAME=D0,D1,...", dest="input_shapes",
        help="the shape to analyse and time input NAME at (repeatable), for inputs with symbolic or unknown axes; "
        "the written model keeps its symbolic axes",
    )
    compile_.add_argument(
        "--round-to", type=int, metavar="N", help="keep channel counts multiples of N (default: the target's, 8 for onnx)"
    )
    compile_.add_argument("--seed", type=int, default=0, help="seed for random importance and random test inputs")
    compile_.add_argument("--repeats", type=int, default=20, metavar="N", help="latency runs per model (default: 20)")
    compile_.add_argument(
        "--reconstruct", choices=RECONSTRUCT_MODES, metavar="none|bias|ls",
        help="re-fit the layers after removed units or zeroed weights on --calib, so the pruned model's activations "
        "match the dense model's: ls (ridge least squares, ThiNet-style; SparseGPT's update for --sparsify), bias "
        "(FLAP's bias compensation), none (default: ls with --calib, none without)",
    )
    compile_.add_argument(
        "--no-bn-recalibration", action="store_true",
        help="keep the BatchNorm statistics as trained (by default, with --calib, they are re-estimated after pruning)",
    )
    compile_.add_argument(
        "--report", type=Path, metavar="DIR", help="also write DIR/report.md with plots, and DIR/report.json"
    )
    compile_.add_argument("--verbose", action="store_true", help="per-pass times, groups and library warnings")
    cli_lowrank.add_compile_arguments(compile_)
    cli_llm.add_arguments(compile_)

    finetune = commands.add_parser("finetune", help="recover accuracy of a pruned model by a short fine-tune")
    finetune.add_argument("model", type=Path, help="ONNX model to fine-tune (usually pcc compile's output)")
    finetune.add_argument("--data", type=Path, required=True,
                          help=".npz of training inputs, with 'labels' unless --teacher; or, for a language model pcc "
                          "compile wrote (its tokenizer beside it), a .txt file: next-token loss on its windows")
    finetune.add_argument("--teacher", type=Path, metavar="DENSE", help="distil from this model's outputs (the dense model)")
    finetune.add_argument("--epochs", type=int, default=1, metavar="N", help="passes over the data (default: 1)")
    finetune.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default: 1e-3)")
    finetune.add_argument("--batch-size", type=int, default=64, metavar="N", help="training batch (default: 64)")
    finetune.add_argument("--eval", type=Path, metavar="FILE",
                          help="labelled .npz to report top-1 accuracy on, before and after; with text --data, a .txt "
                          "file to report perplexity on")
    finetune.add_argument("--data-windows", type=int, default=128, metavar="N",
                          help="with text --data: token windows taken, spread evenly over the text (default 128)")
    finetune.add_argument("--data-length", type=int, default=256, metavar="L",
                          help="with text --data: tokens per window, also --eval's window (default 256)")
    finetune.add_argument("--eval-windows", type=int, default=None, metavar="N",
                          help="with text --eval: score only the first N windows (default: all)")
    finetune.add_argument(
        "--params", choices=FINETUNE_PARAMS, default="all",
        help="what is trained: all weights; bn-bias, only biases and norm scales/shifts (PERP); lora, low-rank adapters "
        "(plus biases and norms) merged into the weights on write (default: all)",
    )
    finetune.add_argument("--lora-rank", type=int, default=8, metavar="R", help="rank of the --params lora adapters (default: 8)")
    finetune.add_argument(
        "--schedule", choices=SCHEDULES, default="oneshot",
        help="with --sparsify: oneshot keeps the zeros the model has; gmp raises the zero fraction to --sparsity on a "
        "cubic ramp while training (Zhu & Gupta); imp prunes in --rounds, rewinding survivors to --rewind-step (default: oneshot)",
    )
    finetune.add_argument("--sparsify", metavar="PATTERN", default="unstructured",
                          help="with --schedule gmp|imp: unstructured, nm:N:M or block:RxC (default: unstructured)")
    finetune.add_argument("--sparsity", type=float, default=0.0, metavar="S",
                          help="with --schedule gmp|imp: the fraction of Conv/Gemm/MatMul weights zero at the end")
    finetune.add_argument("--rounds", type=int, default=3, metavar="N", help="--schedule imp: prune/rewind rounds (default: 3)")
    finetune.add_argument("--rewind-step", type=int, default=0, metavar="K",
                          help="--schedule imp: survivors go back to their values after K steps (default: 0, the start)")
    finetune.add_argument("-o", "--output", type=Path, help="output file (default: ./MODEL.finetuned.onnx)")
    finetune.add_argument("--seed", type=int, default=0, help="seed for the data order")
    finetune.add_argument("--verbose", action="store_true", help="library warnings")
    cli_lowrank.add_finetune_arguments(finetune)

    run = commands.add_parser("run", help="run a model compiled with --target tvm")
    run.add_argument("model", type=Path, help="the .so written by pcc compile --target tvm (its .json beside it)")
    run.add_argument("--input", type=Path, required=True, help=".npz of arrays named like the model's inputs")
    run.add_argument("-o", "--output", type=Path, help="write the outputs here (.npz, under the model's output names)")
    run.add_argument("--verbose", action="store_true", help="library warnings")

    inspect = commands.add_parser("inspect", help="show ops, dependency groups and barriers")
    inspect.add_argument("model", type=Path, help="ONNX model file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--round-to", type=int, default=1, metavar="N", help="as for compile")
    inspect.add_argument(
        "--input-shape", type=_input_shape, action="append", default=[], metavar="NAME=D0,D1,...", dest="input_shapes",
        help="as for compile",
    )
    inspect.add_argument("--verbose", action="store_true", help="list every group")
    cli_merge.add_commands(commands)
    return parser


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in PRUNABLE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"cannot prune {', '.join(unknown) or 'nothing'}; choose from {', '.join(PRUNABLE_KINDS)}")
    return kinds


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, equals, dims = text.partition("=")
    sizes = dims.replace("x", ",").split(",")
    if not (name and equals and all(d.strip().isdigit() for d in sizes)):
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... such as input_ids=1,128, got {text!r}")
    return name, tuple(int(d) for d in sizes)


def _key_bits(text: str) -> tuple[int, int]:
    msb, plus, lsb = text.partition("+")
    if not (msb.isdigit() and (not plus or lsb.isdigit())):
        raise argparse.ArgumentTypeError(f"expected MSB+LSB bit counts such as 8+4, got {text!r}")
    return int(msb), int(lsb or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        if args.command == "compile":
            return _compile(args)
        if args.command == "finetune":
            return _finetune(args)
        if args.command == "run":
            return _run(args)
        if args.command in cli_merge.COMMANDS:
            return cli_merge.run(args)
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
        # transformers (language models) reads these when imported: no weight-loading bars or notices
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name in ("torch", "transformers", "onnxscript"):  # loggers with their own levels and handlers
            logging.getLogger(name).setLevel(logging.ERROR)


def _compile(args: argparse.Namespace) -> int:
    import importlib.util

    check_sparsity(args.sparsity)
    for flag, value in (("--repeats", args.repeats), ("--latency-batch", args.latency_batch),
                        ("--latency-length", args.latency_length)):
        if value < 1:
            raise InvalidRequestError(f"{flag} must be at least 1, got {value}")
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        raise InvalidRequestError("--ray needs Ray: pip install 'pcc[ray]'")
    _check_target_options(args)
    progress = sys.stderr.isatty()
    if args.target == "spatten":
        return _compile_spatten(args, progress)
    from pcc.backends import TARGETS
    from pcc.backends.onnx.runtime import top1_accuracy
    from pcc.compiler.calibration import load_calibration
    from pcc.compiler.pipeline import compile_pipeline
    from pcc.compiler.report import write_report
    from pcc.passes.analysis import DependencyGroups
    from pcc.passes.transforms.reconstruct import ReconstructionReport

    target_options = {"tvm_target": args.tvm_target} if args.target == "tvm" else {}
    input_shapes = dict(args.input_shapes)
    target = TARGETS[args.target](repeats=args.repeats, progress=progress, seed=args.seed, batch=args.latency_batch,
                                 length=args.latency_length, input_shapes=input_shapes, **target_options)
    output = _output_path(args, target)
    model, tokenizer = cli_llm.load_model(args.model)  # an ONNX file, or a language model (.gguf, HF folder)
    dense = cli_llm.dense_source(args.model, model, tokenizer)
    language_model = tokenizer is not None
    target.check(model)
    calibration = load_calibration(model, args.calib, seed=args.seed, **cli_llm.calibration_options(args, tokenizer))
    if calibration.synthetic and (args.importance in DATA_CRITERIA or args.allocator == "dp" or args.report):
        print("pcc: warning: no --calib given: data-driven scores run on random inputs and reflect the weights only", file=sys.stderr)
    options = CompileOptions(
        sparsity=args.sparsity,
        prune=args.prune,
        sparsify=args.sparsify,
        importance=args.importance,
        reduction=args.reduction,
        allocator=args.allocator,
        budget=args.budget,
        metanet=args.metanet,
        round_to=target.preferred_round_to if args.round_to is None else args.round_to,
        seed=args.seed,
        # pruning shifts every later layer's input statistics; with real data, BatchNorm is re-estimated
        recalibrate_bn=(
            not calibration.synthetic and not args.no_bn_recalibration
            and any(node.op_type == "BatchNormalization" for node in model.graph)
        ),
        # the default re-fits removed units' consumers; a factorised layer has none removed
        # (and a language model's would hold every window's logits: its repair is FLAP's bias or SparseGPT's update)
        reconstruct=args.reconstruct or ("none" if calibration.synthetic or args.factorize or language_model else "ls"),
        calibration=calibration,
        input_shapes=input_shapes,
        workers=args.workers,
        ray_address=args.ray,
        sensitivity_cache=None if language_model else _sensitivity_cache(args.model),
        latency_batch=args.latency_batch,
        latency_length=args.latency_length,
        latency_repeats=args.repeats,
        compare_allocators=args.report is not None and args.factorize is None,
        factorize=args.factorize,
        language_model=language_model,
        progress=progress,
    )
    result = compile_pipeline(options).run(model, progress=progress)
    report = target.emit(
        result, dense, output, model_name=str(args.model), allocator=args.allocator, importance=args.importance
    )
    report.calibration = f"{calibration.source} ({calibration.num_samples} samples)"
    if options.recalibrate_bn:
        report.calibration += "; BatchNorm statistics re-estimated on it after pruning"
    if calibration.labels is not None:
        report.calib_accuracy_before = top1_accuracy(str(args.model), calibration)
        report.calib_accuracy_after = top1_accuracy(str(output), calibration)
    cli_llm.finish(args, report, dense, output, tokenizer)
    print(report.format())
    if args.verbose:
        print("  pass times\n" + result.timing_table())
        groups = result.get(DependencyGroups)
        print("  groups\n" + "\n".join(f"    {g}" for g in groups.groups))
        reconstruction = result.get(ReconstructionReport)
        if reconstruction is not None and reconstruction.layers:
            print("  reconstruction\n" + reconstruction.table())
    if args.report:
        print(f"  report     {write_report(args.report, report, result)}")
    return 0


def _output_path(args: argparse.Namespace, target) -> Path:
    output = args.output or target.default_output(args.model)
    if args.model.exists() and output.resolve() == args.model.resolve():
        raise InvalidRequestError(f"output {output} is the input model; pcc never overwrites its input")
    return output


# options that belong to one target; given with another they are refused, not silently ignored
_TARGET_ONLY = {
    "spatten": {"--spatten-config": "spatten_config", "--key-bits": "key_bits", "--tau": "tau", "--head-share": "head_share"},
    "tvm": {"--tvm-target": "tvm_target"},
}
# what --target spatten decides itself: cascade token + head pruning, no allocator, no channel widths
_NOT_FOR_SPATTEN = {"--prune": "prune", "--sparsify": "sparsify", "--allocator": "allocator", "--metanet": "metanet",
                    "--budget": "budget", "--importance": "importance", "--round-to": "round_to", "--report": "report",
                    "--reconstruct": "reconstruct", "--factorize": "factorize"}


def _check_target_options(args: argparse.Namespace) -> None:
    """Refuse options given for a target other than `--target` (and those `--target spatten` decides itself)."""
    defaults = build_parser().parse_args(["compile", "-", "--sparsity", "0"])
    changed = lambda flags: [f for f, attr in flags.items() if getattr(args, attr) != getattr(defaults, attr)]  # noqa: E731
    for target, flags in _TARGET_ONLY.items():
        if args.target != target and (given := changed(flags)):
            verb = "applies" if len(given) == 1 else "apply"
            raise InvalidRequestError(f"{', '.join(given)} {verb} to --target {target} only")
    if args.target == "spatten" and changed(_NOT_FOR_SPATTEN):
        raise InvalidRequestError(
            f"{', '.join(changed(_NOT_FOR_SPATTEN))} do not apply to --target spatten: it prunes tokens and heads by "
            "SpAtten's cascade schedules (--head-share splits --sparsity between them) and writes its report into -o"
        )


def _compile_spatten(args: argparse.Namespace, progress: bool) -> int:
    """Cascade token + head pruning at --sparsity of the token x head attention work, then the SpAtten target.

    The target measures its functional model on --calib (labels: accuracy) or, without it, on random inputs
    of --latency-batch x --latency-length (or --input-shape); its report goes into the output folder, so --report is refused.
    """
    from pcc.backends import TARGETS
    from pcc.backends.spatten import spatten_pipeline
    from pcc.compiler.calibration import load_calibration
    from pcc.compiler.frontend import load_onnx

    model = load_onnx(args.model)
    msb_bits, lsb_bits = args.key_bits
    target = TARGETS["spatten"](
        progress=progress, seed=args.seed, batch=args.latency_batch, length=args.latency_length,
        input_shapes=dict(args.input_shapes), config=args.spatten_config, msb_bits=msb_bits, lsb_bits=lsb_bits, tau=args.tau,
        calibration=load_calibration(model, args.calib, seed=args.seed) if args.calib else None,
    )
    output = _output_path(args, target)
    sizes = {"batch": args.latency_batch, "length": args.latency_length, "input_shapes": dict(args.input_shapes)}
    result = spatten_pipeline(args.sparsity, args.head_share, **sizes).run(model, progress=progress)
    report = target.emit(result, args.model, output, model_name=str(args.model), allocator="cascade", importance="spatten")
    print(report.format())
    if args.verbose:
        print("  pass times\n" + result.timing_table())
    return 0


def _sensitivity_cache(model_path: Path) -> Path | None:
    """MODEL.pcc-sensitivity.npz beside the model, where that folder is writable (else no cache)."""
    folder = model_path.resolve().parent
    return folder / f"{model_path.name}.pcc-sensitivity.npz" if os.access(folder, os.W_OK) else None


def _finetune(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InvalidRequestError(f"--batch-size must be at least 1, got {args.batch_size}")
    from pcc.backends.onnx.runtime import session
    from pcc.backends.onnx.writer import write_checked
    from pcc.compiler.calibration import TEXT_SUFFIXES, load_calibration
    from pcc.compiler.frontend import load_onnx
    from pcc.compiler.pipeline import Pipeline
    from pcc.passes.transforms import FineTune, FineTuneReport

    output = args.output or Path.cwd() / f"{args.model.stem}.finetuned.onnx"
    if args.model.exists() and output.resolve() == args.model.resolve():
        raise InvalidRequestError(f"output {output} is the input model; pcc never overwrites its input")
    model = load_onnx(args.model)
    text = args.data.suffix.lower() in TEXT_SUFFIXES
    tokenizer = _text_tokenizer(args) if text else None
    data = load_calibration(model, args.data, batch_size=args.batch_size, tokenizer=tokenizer,
                            windows=args.data_windows, length=args.data_length)
    teacher = load_onnx(args.teacher) if args.teacher else None
    score = _finetune_score(args, tokenizer, model)
    before = score(args.model) if score else None
    if args.schedule != "oneshot" and args.sparsity <= 0:
        raise InvalidRequestError(f"--schedule {args.schedule} prunes while training: give the final --sparsity in (0, 1)")
    if args.schedule == "oneshot" and args.sparsity > 0:
        raise InvalidRequestError("--sparsity applies to --schedule gmp|imp; a oneshot fine-tune keeps the model's own zeros")
    tune = FineTune(
        data, teacher, epochs=args.epochs, lr=args.lr, seed=args.seed, params=args.params, lora_rank=args.lora_rank,
        schedule=args.schedule, sparsify=args.sparsify, sparsity=args.sparsity, rounds=args.rounds,
        rewind_step=args.rewind_step, nuclear_norm=args.nuclear_norm, causal_lm=text, progress=sys.stderr.isatty(),
    )
    result = Pipeline([tune]).run(model)
    write_checked(result.model, output, verify=lambda staged: session(staged))
    print(f"pcc: {args.model} -> {output} (fine-tuned)")
    print(f"  {result.get(FineTuneReport).summary()}")
    print(f"  data       {data.source} ({data.num_samples} samples)")
    if score is not None:
        print(f"  {score.label:<10} {score.format(before)} -> {score.format(score(output))} on {args.eval}")
    if tokenizer is not None:
        from pcc.compiler.llm import save_tokenizer

        save_tokenizer(tokenizer, output)
    return 0


def _text_tokenizer(args: argparse.Namespace):
    """The tokenizer of the language model being fine-tuned on text (saved beside it by pcc compile)."""
    from pcc.compiler.llm import load_saved_tokenizer

    for flag, value, least in (("--data-windows", args.data_windows, 1), ("--data-length", args.data_length, 2),
                               ("--eval-windows", args.eval_windows, 1)):
        if value is not None and value < least:
            raise InvalidRequestError(f"{flag} must be at least {least}, got {value}")
    return load_saved_tokenizer(args.model)


@dataclass(frozen=True)
class _Score:
    """`pcc finetune --eval`: top-1 accuracy on a labelled .npz, or perplexity on text for a language model."""

    label: str
    measure: Callable[[Path], float]
    unit: str  # "% top-1": a fraction shown in percent; "": a plain number

    def __call__(self, model: Path) -> float:
        return self.measure(model)

    def format(self, value: float) -> str:
        return f"{100 * value:.2f}{self.unit}" if self.unit else f"{value:.2f}"


def _finetune_score(args: argparse.Namespace, tokenizer, model) -> _Score | None:
    from pcc.compiler.calibration import TEXT_SUFFIXES, load_calibration

    if args.eval is None:
        return None
    if tokenizer is not None:
        from pcc.passes.analysis.perplexity import text_perplexity

        if args.eval.suffix.lower() not in TEXT_SUFFIXES:
            raise InvalidRequestError(f"{args.eval}: with text --data, --eval is a .txt file to measure perplexity on")

        def measure(path: Path) -> float:
            return text_perplexity(str(path), args.eval, tokenizer, args.data_length, args.eval_windows).value

        return _Score("perplexity", measure, "")
    from pcc.backends.onnx.runtime import top1_accuracy

    evaluation = load_calibration(model, args.eval, batch_size=256)
    return _Score("accuracy", lambda path: top1_accuracy(str(path), evaluation), "% top-1")


def _run(args: argparse.Namespace) -> int:
    from pcc.backends.tvm.runner import CompiledModel, save_outputs

    compiled = CompiledModel.load(args.model)
    outputs = compiled.run_npz(args.input)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)}  mean {value.mean():.6g}")
    if args.output:
        save_outputs(outputs, args.output)
        print(f"pcc: wrote {args.output}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.round_to < 1:
        raise InvalidRequestError(f"--round-to must be a positive integer, got {args.round_to}")
    from pcc.compiler.frontend import load_onnx
    from pcc.compiler.pipeline import analysis_pipeline
    from pcc.passes.analysis import DependencyGroups
    from pcc.passes.analysis.attention import AttentionBlocks

    result = analysis_pipeline(args.round_to, dict(args.input_shapes)).run(load_onnx(args.model))
    groups = result.get(DependencyGroups)
    attention = result.get(AttentionBlocks)
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
        "attention_blocks": [block.to_json() for block in attention.blocks],
        "group_details": [
            {
                "index": g.index,
                "kind": g.kind,
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
    print(f"attention  {attention.summary()}")
    for block in attention.blocks if args.verbose else attention.blocks[:4]:
        projections = f"Q {block.query}, K {block.key}, V {block.value}, O {block.output}" if block.weights else block.fused_op
        print(f"  {block.name}: {block.heads} heads x {block.head_dim}; {projections}; residual {block.residual}, norm {block.norm}")
    if not args.verbose and len(attention) > 4:
        print(f"  ... {len(attention) - 4} more (--verbose lists all)")
    print(f"barriers   {len(groups.barriers)}")
    for barrier in groups.barriers:
        print(f"  {barrier.op} node '{barrier.node}': channels through it are not pruned")
    return 0

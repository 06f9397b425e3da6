"""CompileOptions: one checked object for the pipeline, and option names that match what implements them."""

import subprocess
import sys

import pytest

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import (
    ALLOCATOR_NAMES, SPATTEN_CONFIG_NAMES, TARGET_NAMES, CompileOptions,
)


def test_option_names_match_their_implementations():
    from pcc.backends import TARGETS
    from pcc.backends.spatten import CONFIGS
    from pcc.passes.allocation import ALLOCATORS

    assert set(TARGET_NAMES) == set(TARGETS)
    assert set(SPATTEN_CONFIG_NAMES) == set(CONFIGS)
    assert set(ALLOCATOR_NAMES) == set(ALLOCATORS) | {"metanet"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sparsity": 1.0}, "--sparsity must be in [0, 1)"),
        ({"allocator": "best"}, "unknown allocator 'best'"),
        ({"importance": "vibes"}, "unknown importance 'vibes'"),
        ({"reconstruct": "magic"}, "unknown reconstruct 'magic'"),
        ({"round_to": 0}, "--round-to must be at least 1"),
        ({"prune": ("layers",)}, "cannot prune layers"),
        ({"recalibrate_bn": True}, "needs real calibration data"),
        ({"reconstruct": "ls"}, "--reconstruct ls needs real calibration data"),
        ({"sparsify": "unstructured", "allocator": "dp"}, "does not apply to --sparsify"),
        ({"sparsify": "unstructured", "prune": ("heads",)}, "does not combine with --prune"),
    ],
)
def test_bad_options_are_refused_in_one_line(changes, message):
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[").replace(")", r"\)")):
        CompileOptions(**{"sparsity": 0.5, **changes})


def test_group_kinds_follow_prune_and_sparsify():
    assert CompileOptions(0.5, prune=("heads", "tokens")).group_kinds == ("heads",)
    assert CompileOptions(0.5, sparsify="nm:2:4").group_kinds == ()
    assert CompileOptions(0.0, allocator="metanet").uses_metanet is False
    assert CompileOptions(0.3, metanet=True).uses_metanet is True


def test_the_command_line_parses_without_importing_onnx_or_torch():
    # `pcc --help` and argument errors must answer at once; onnx alone takes ~0.7 s to import
    code = (
        "import sys; from pcc.compiler import cli; cli.build_parser().parse_args(['compile', 'm.onnx', '--sparsity', '0.5']);"
        "heavy = sorted(m for m in ('onnx', 'torch', 'onnx_ir', 'onnxruntime', 'tvm', 'torch_geometric') if m in sys.modules);"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_input_shape_flag_parses_and_refuses_in_one_line(capsys):
    from pcc.compiler import cli

    args = cli.build_parser().parse_args(
        ["compile", "m.onnx", "--sparsity", "0.5", "--input-shape", "input_ids=1,128", "--input-shape", "x=2x3x8x8"]
    )
    assert dict(args.input_shapes) == {"input_ids": (1, 128), "x": (2, 3, 8, 8)}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", "m.onnx", "--input-shape", "input_ids"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("pcc: error: argument --input-shape: expected NAME=D0,D1,...")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--schedule", "gmp"], "--schedule gmp prunes while training: give the final --sparsity"),
        (["--sparsity", "0.5"], "--sparsity applies to --schedule gmp|imp"),
    ],
)
def test_finetune_schedule_flags_are_checked_before_any_work(tmp_path, capsys, flags, message):
    from pcc.compiler import cli
    from pcc.compiler.frontend import from_torch

    import onnx_ir as ir
    import torch

    model_path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    ir.save(from_torch(torch.nn.Linear(4, 3), (torch.zeros(2, 4),), input_names=["x"], dynamic_batch=True), model_path)
    import numpy as np

    np.savez(data, x=np.zeros((8, 4), np.float32), labels=np.zeros(8, np.int64))
    assert cli.main(["finetune", str(model_path), "--data", str(data), "-o", str(tmp_path / "o.onnx"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()

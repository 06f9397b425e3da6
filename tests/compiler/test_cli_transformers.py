"""`pcc compile --prune blocks|tokens`: whole residual blocks and cascade token pruning from the command line."""

from __future__ import annotations

import numpy as np
import onnx

from tests.compiler.test_cli import pcc
from tests.conftest import run_onnx


def test_tokens_shrink_the_sequence_and_are_timed_at_the_requested_length(tmp_path, encoder):
    out = tmp_path / "tokens.onnx"
    done = pcc("compile", encoder, "--prune", "tokens", "--sparsity", "0.3", "-o", out, "--repeats", "3",
               "--latency-length", "64")
    assert done.returncode == 0, done.stderr
    assert "tokens     tokens kept per layer" in done.stdout and "length 64" in done.stdout
    assert "now hold the kept tokens only" in done.stdout
    onnx.checker.check_model(str(out), full_check=True)
    name = onnx.load(str(encoder)).graph.input[0].name
    x = np.random.default_rng(0).standard_normal((2, 64, 32), dtype=np.float32)
    (hidden,) = run_onnx(out, {name: x})
    assert hidden.shape[0] == 2 and hidden.shape[1] < 64 and hidden.shape[2] == 32


def test_blocks_remove_the_least_influential_layers(tmp_path, encoder):
    out = tmp_path / "blocks.onnx"
    done = pcc("compile", encoder, "--prune", "blocks", "--sparsity", "0.5", "-o", out, "--repeats", "3")
    assert done.returncode == 0, done.stderr
    assert "blocks     2 blocks removed" in done.stdout
    before, after = onnx.load(str(encoder)), onnx.load(str(out))
    softmaxes = lambda m: sum(n.op_type == "Softmax" for n in m.graph.node)  # noqa: E731
    assert (softmaxes(before), softmaxes(after)) == (4, 2)


def test_tokens_on_a_model_without_attention_is_a_one_line_error(tmp_path, zoo_cache):
    out = tmp_path / "never.onnx"
    done = pcc("compile", zoo_cache.path("resnet_basic"), "--prune", "tokens", "--sparsity", "0.3", "-o", out)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.startswith("pcc: error: --prune tokens needs multi-head attention")
    assert len(done.stderr.strip().splitlines()) == 1

"""The `pcc` command line as users and scripts see it (shared/CLI.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import max_relative_difference, run_onnx


def pcc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pcc.compiler", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_compile_at_zero_sparsity_reproduces_outputs_and_leaves_input_untouched(tmp_path, zoo_cache):
    source = zoo_cache.path("mobilenet_v3")
    before = _digest(source)
    out = tmp_path / "same.onnx"
    done = pcc("compile", source, "--sparsity", "0", "--target", "onnx", "-o", out, "--repeats", "3")
    assert done.returncode == 0, done.stderr
    assert _digest(source) == before
    feeds = {"x": zoo_cache.example_input("mobilenet_v3")}
    assert max_relative_difference(run_onnx(out, feeds), run_onnx(source, feeds)) <= 1e-6


def test_compile_prunes_and_reports(tmp_path, zoo_cache):
    source = zoo_cache.path("resnet_bottleneck")
    before = _digest(source)
    out, report_dir = tmp_path / "pruned.onnx", tmp_path / "report"
    done = pcc(
        "compile", source, "--sparsity", "0.5", "--target", "onnx", "-o", out,
        "--report", report_dir, "--repeats", "5", "--verbose", "--round-to", "4",
    )
    assert done.returncode == 0, done.stderr
    assert _digest(source) == before
    onnx.checker.check_model(str(out), full_check=True)
    report = json.loads((report_dir / "report.json").read_text())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "latency_ms_before", "latency_ms_after"):
        assert report[key] > 0, key
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert abs(report["prunable_removed"] - 0.5) <= 0.03
    assert "params" in done.stdout and "latency" in done.stdout and "BuildDependencyGroups" in done.stdout
    # round_to 4 (every width in this model is a multiple of 4): every conv keeps a multiple of 4 outputs
    conv_weights = [i for i in onnx.load(str(out)).graph.initializer if len(i.dims) == 4]
    assert conv_weights and all(w.dims[0] % 4 == 0 for w in conv_weights)
    assert any(w.dims[0] not in (8, 16, 32, 64, 128) for w in conv_weights), "some width must have been pruned"


@pytest.mark.parametrize(
    "make_input",
    ["truncated", "random_bytes", "empty", "wrong_extension", "missing_external_data", "missing_file", "future_opset"],
)
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, zoo_cache, make_input):
    proto = zoo_cache.proto("vgg")
    data = proto.SerializeToString()
    path = tmp_path / "model.onnx"
    if make_input == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif make_input == "random_bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    elif make_input == "empty":
        path.write_bytes(b"")
    elif make_input == "wrong_extension":
        path = tmp_path / "model.txt"
        path.write_bytes(data)
    elif make_input == "missing_external_data":
        onnx.save_model(proto, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
        (tmp_path / "weights.bin").unlink()
    elif make_input == "future_opset":
        proto.opset_import[0].version = 42
        path.write_bytes(proto.SerializeToString())
    out = tmp_path / "out" / "pruned.onnx"
    done = pcc("compile", path, "--sparsity", "0.5", "--target", "onnx", "-o", out)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcc: error:"), done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5", "nan"])
def test_sparsity_outside_unit_interval_is_rejected(tmp_path, zoo_cache, sparsity):
    out = tmp_path / "o.onnx"
    done = pcc("compile", zoo_cache.path("mlp"), "--sparsity", sparsity, "-o", out)
    assert done.returncode == 2 and done.stderr.startswith("pcc: error:") and "[0, 1)" in done.stderr
    assert not out.exists()


def test_unknown_target_lists_valid_ones(zoo_cache):
    done = pcc("compile", zoo_cache.path("mlp"), "--sparsity", "0.5", "--target", "fpga")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "onnx" in done.stderr and "fpga" in done.stderr


def test_output_may_not_overwrite_input(tmp_path, zoo_cache):
    source = tmp_path / "m.onnx"
    source.write_bytes(zoo_cache.path("mlp").read_bytes())
    before = _digest(source)
    done = pcc("compile", source, "--sparsity", "0.5", "-o", source)
    assert done.returncode == 2 and "input" in done.stderr
    assert _digest(source) == before


def test_inspect_json_lists_groups_barriers_and_prunable_fraction(tmp_path, zoo_cache):
    done = pcc("inspect", zoo_cache.path("densenet"), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["ops"]["Concat"] == 4 and info["groups"] == len(info["group_details"]) >= 5
    assert info["barriers"] == [] and 0.9 < info["prunable_fraction"] <= 1.0


def test_inspect_lists_barriers(tmp_path, zoo_cache):
    """An op with no channel rule (here a custom-domain op) is a barrier, never treated as element-wise."""
    proto = zoo_cache.proto("vgg")
    graph = proto.graph
    relu = next(i for i, n in enumerate(graph.node) if n.op_type == "Relu")
    graph.node[relu].op_type, graph.node[relu].domain = "MysteryActivation", "com.example"
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "barrier.onnx"
    onnx.save(proto, path)
    done = pcc("inspect", path)
    assert done.returncode == 0, done.stderr
    assert "com.example::MysteryActivation" in done.stdout and "barriers   1" in done.stdout

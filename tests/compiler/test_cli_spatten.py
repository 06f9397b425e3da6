"""`pcc compile --target spatten`: the headline command, its options and its one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest

from pcc.backends.spatten import CSV_COLUMNS
from tests.compiler.test_cli import pcc
from tests.conftest import run_onnx


def test_writes_the_target_folder_with_the_requested_machine_and_quantization(tmp_path, encoder):
    out = tmp_path / "encoder.spatten"
    calib = tmp_path / "calib.npz"
    np.savez(calib, src=np.random.default_rng(0).standard_normal((6, 40, 32), dtype=np.float32))
    done = pcc("compile", encoder, "--sparsity", "0.5", "--target", "spatten", "-o", out, "--calib", calib,
               "--spatten-config", "eighth", "--key-bits", "6+2", "--tau", "0.2", "--head-share", "0.5")
    assert done.returncode == 0, done.stderr
    assert "(target spatten, SpAtten 1/8)" in done.stdout and "K 6+2 bits, tau 0.2" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"] == "SpAtten 1/8" and report["seq_len"] == 40 and report["samples"] == 6
    assert (report["msb_bits"], report["lsb_bits"], report["tau"]) == (6, 2, 0.2)
    assert report["cycles_pruned"] < report["cycles_dense"] and report["dram_bytes_pruned"] < report["dram_bytes_dense"]
    assert report["energy_pruned_j"] < report["energy_dense_j"]
    # half of the token x head work removed, a quarter of it (0.5 x 0.5) by heads
    assert report["attention_work_removed"] == pytest.approx(0.5, abs=0.05)
    assert "heads -25.0%" in report["sparsity_split"]
    with open(out / "program.csv", newline="") as rows:
        header = next(csv.reader(rows))
    assert header == list(CSV_COLUMNS)
    for plot in ("kept_per_layer.png", "cycles.png", "dram.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 33, 32), dtype=np.float32)
    hidden, *_ = run_onnx(out / "model.onnx", {onnx.load(str(encoder)).graph.input[0].name: x})
    assert hidden.shape[0] == 2 and hidden.shape[1] < 33


def test_sparsity_zero_keeps_every_token_and_head(tmp_path, encoder):
    out = tmp_path / "same.spatten"
    done = pcc("compile", encoder, "--sparsity", "0", "--target", "spatten", "-o", out, "--latency-length", "16")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["token_keep"] == [1.0] * 4 and report["head_kept"] == [4] * 4
    assert report["attention_work_removed"] == 0
    program = json.loads((out / "program.json").read_text())
    columns = program["columns"]
    requests = [dict(zip(columns, row)) for row in program["requests"]]
    assert len(requests) == 4 * 4  # every (layer, head)
    assert all(r["key_fetch_num"] == r["value_fetch_num"] == r["sentence_length_L"] == 16 for r in requests)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "spatten", "--allocator", "dp"], "--allocator do not apply to --target spatten"),
        (["--target", "spatten", "--prune", "heads"], "--prune do not apply to --target spatten"),
        (["--tau", "0.2"], "--tau applies to --target spatten only"),
        (["--tau", "0.2", "--head-share", "0.3"], "--tau, --head-share apply to --target spatten only"),
        (["--target", "spatten", "--tvm-target", "c"], "--tvm-target applies to --target tvm only"),
        (["--target", "spatten", "--key-bits", "8x"], "--key-bits: expected MSB+LSB bit counts"),
        (["--target", "spatten", "--key-bits", "8+0"], "lsb_bits >= 1"),
        (["--target", "spatten", "--head-share", "1.5"], "heads' share of the sparsity must be in [0, 1)"),
        (["--target", "spatten", "--sparsity", "0.95"], "out of reach on 4 attention layer(s)"),
    ],
)
def test_options_that_cannot_apply_are_one_line_errors(tmp_path, encoder, extra, message):
    out = tmp_path / "never"
    done = pcc("compile", encoder, "--sparsity", "0.5", "-o", out, *extra)
    assert done.returncode == 2 and not out.exists() and list(tmp_path.iterdir()) == []
    assert done.stderr.startswith("pcc: error:") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_model_without_attention_is_a_one_line_error(tmp_path, zoo_cache):
    out = tmp_path / "never.spatten"
    done = pcc("compile", zoo_cache.path("resnet_basic"), "--sparsity", "0.7", "--target", "spatten", "-o", out)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.startswith("pcc: error:") and "--target spatten" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

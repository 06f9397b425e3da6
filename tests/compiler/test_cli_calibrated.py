"""The data-driven command line: --calib with BatchNorm recalibration, the DP on a latency budget with its
report, and `pcc finetune`. Runs on the committed Fashion-MNIST CNN (BatchNorm kept) with synthetic data
files, so no dataset is needed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.compiler.test_cli import pcc
from tests.conftest import ROOT, run_onnx

CNN = ROOT / "examples" / "models" / "fashion_cnn.onnx"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Image-like inputs with labels the dense CNN itself assigns (learnable, unlike random labels)."""
    folder = tmp_path_factory.mktemp("data")
    images = np.random.default_rng(0).normal(size=(192, 1, 28, 28)).astype(np.float32)
    labels = np.argmax(run_onnx(CNN, {"image": images})[0], axis=1)
    np.savez(folder / "calib.npz", image=images[:128], labels=labels[:128])
    np.savez(folder / "unlabelled.npz", image=images[:128])
    np.savez(folder / "eval.npz", image=images[128:], labels=labels[128:])
    return folder


def test_calib_recalibrates_batchnorm_unless_told_not_to(tmp_path, data):
    recalibrated, stale = tmp_path / "recal.onnx", tmp_path / "stale.onnx"
    done = pcc("compile", CNN, "--sparsity", "0.4", "--calib", data / "calib.npz", "-o", recalibrated, "--repeats", "2")
    assert done.returncode == 0, done.stderr
    assert "BatchNorm statistics re-estimated" in done.stdout
    done = pcc(
        "compile", CNN, "--sparsity", "0.4", "--calib", data / "calib.npz", "-o", stale, "--repeats", "2",
        "--no-bn-recalibration",
    )
    assert done.returncode == 0, done.stderr
    assert "re-estimated" not in done.stdout
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(stale)).graph.initializer}
    changed = [
        i.name for i in onnx.load(str(recalibrated)).graph.initializer
        if not np.array_equal(onnx.numpy_helper.to_array(i), weights[i.name])
    ]
    assert changed and all("running" in name for name in changed), changed  # only the statistics differ


def test_zero_sparsity_with_calib_reproduces_the_model(tmp_path, data):
    out = tmp_path / "same.onnx"
    done = pcc("compile", CNN, "--sparsity", "0", "--calib", data / "calib.npz", "-o", out, "--repeats", "2")
    assert done.returncode == 0, done.stderr
    feeds = {"image": np.load(data / "eval.npz")["image"]}
    np.testing.assert_allclose(run_onnx(out, feeds)[0], run_onnx(CNN, feeds)[0], rtol=1e-5, atol=1e-5)


def test_dp_on_a_latency_budget_prints_its_checks_and_writes_the_report(tmp_path, data):
    model, out, report = tmp_path / "cnn.onnx", tmp_path / "dp.onnx", tmp_path / "report"
    model.write_bytes(CNN.read_bytes())  # the sensitivity cache is written beside the model
    done = pcc(
        "compile", model, "--sparsity", "0.5", "--allocator", "dp", "--budget", "latency", "--calib", data / "calib.npz",
        "--workers", "1", "--latency-batch", "8", "--repeats", "3", "-o", out, "--report", report,
    )
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(str(out), full_check=True)
    assert "predicted  latency" in done.stdout and "measured" in done.stdout
    assert "additivity sum of single-group distortions" in done.stdout
    assert "top-1 on the calibration data" in done.stdout
    assert (tmp_path / "cnn.onnx.pcc-sensitivity.npz").exists()
    markdown = (report / "report.md").read_text()
    for png in ("keep_ratios.png", "quality_vs_sparsity.png", "rd_curves.png"):
        assert f"![]({png})" in markdown
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_with_labels_and_a_teacher_writes_a_runnable_model(tmp_path, data):
    pruned, tuned = tmp_path / "pruned.onnx", tmp_path / "tuned.onnx"
    assert pcc("compile", CNN, "--sparsity", "0.5", "-o", pruned, "--repeats", "2").returncode == 0
    before = onnx.load(str(pruned))
    done = pcc(
        "finetune", pruned, "--data", data / "calib.npz", "--teacher", CNN, "--eval", data / "eval.npz",
        "--epochs", "2", "--batch-size", "32", "-o", tuned,
    )
    assert done.returncode == 0, done.stderr
    assert "fine-tune: 2 epoch(s), 8 steps" in done.stdout and "accuracy" in done.stdout
    onnx.checker.check_model(str(tuned), full_check=True)
    assert onnx.load(str(pruned)) == before  # the input is never modified
    after = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tuned)).graph.initializer}
    assert any(not np.array_equal(onnx.numpy_helper.to_array(i), after[i.name]) for i in before.graph.initializer)


def test_finetune_without_labels_or_teacher_is_a_one_line_error(tmp_path, data):
    out = tmp_path / "tuned.onnx"
    done = pcc("finetune", CNN, "--data", data / "unlabelled.npz", "-o", out)
    assert done.returncode == 2 and done.stderr.startswith("pcc: error:") and "labels" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_finetune_keeps_a_sparsified_model_sparse(tmp_path, data):
    """Masked fine-tuning: the zeros --sparsify wrote stay exactly zero, everything else trains."""
    sparse, tuned = tmp_path / "sparse.onnx", tmp_path / "tuned.onnx"
    done = pcc("compile", CNN, "--sparsity", "0.7", "--sparsify", "block:16x1", "--allocator", "lamp", "-o", sparse,
               "--repeats", "2")
    assert done.returncode == 0, done.stderr
    done = pcc("finetune", sparse, "--data", data / "calib.npz", "--epochs", "1", "--batch-size", "32", "-o", tuned)
    assert done.returncode == 0, done.stderr
    weights = lambda path: {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}  # noqa: E731
    before, after = weights(sparse), weights(tuned)
    matrices = [name for name, w in before.items() if w.ndim >= 2 and (w == 0).any()]
    assert matrices
    for name in matrices:
        np.testing.assert_array_equal(after[name] == 0, before[name] == 0)
    assert any(not np.array_equal(before[name], after[name]) for name in matrices)

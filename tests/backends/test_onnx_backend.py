"""The ONNX backend: checked atomic writes, output comparison and paired latency."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import pcc.backends.onnx.writer as writer
from pcc.backends.onnx import OnnxTarget, compare_outputs, paired_latency, random_inputs, session, write_checked
from pcc.compiler.pipeline import channel_pruning_pipeline


def test_failed_verification_leaves_no_file(tmp_path, zoo_cache):
    out = tmp_path / "model.onnx"

    def refuse(path):
        assert path.exists() and path != out
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError):
        write_checked(zoo_cache.model("mlp"), out, verify=refuse)
    assert list(tmp_path.iterdir()) == []


def test_invalid_model_is_never_written(tmp_path, zoo_cache):
    model = zoo_cache.model("mlp")
    next(iter(model.graph)).op_type = "NotAnOnnxOp"
    out = tmp_path / "model.onnx"
    with pytest.raises(onnx.checker.ValidationError):
        write_checked(model, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_large_models_get_external_data(tmp_path, zoo_cache, monkeypatch):
    monkeypatch.setattr(writer, "_EXTERNAL_THRESHOLD", 1000)
    out = tmp_path / "big.onnx"
    write_checked(zoo_cache.model("vgg"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    feeds = {"x": zoo_cache.example_input("vgg")}
    np.testing.assert_allclose(session(out).run(None, feeds)[0], session(zoo_cache.proto("vgg").SerializeToString()).run(None, feeds)[0], rtol=1e-6)


def test_target_reports_measured_numbers(tmp_path, zoo_cache):
    result = channel_pruning_pipeline(0.5).run(zoo_cache.model("resnet_basic"))
    target = OnnxTarget(repeats=5)
    report = target.emit(result, zoo_cache.path("resnet_basic"), tmp_path / "p.onnx", model_name="r", allocator="uniform", importance="l2")
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0 and report.latency_repeats == 5
    assert report.max_abs_output_diff > 0  # pruning changes outputs
    assert "onnx.checker (full)" in report.checks
    data = report.to_json()
    assert data["speedup"] == pytest.approx(report.latency_ms_before / report.latency_ms_after)


def test_random_inputs_and_comparison(zoo_cache):
    sess = session(zoo_cache.proto("mlp").SerializeToString())
    feeds = random_inputs(sess, seed=3)
    assert feeds["x"].shape == (4, 32) and feeds["x"].dtype == np.float32
    out = sess.run(None, feeds)
    assert compare_outputs(out, out).max_abs == 0.0
    assert compare_outputs(out, [o + 1 for o in out]).max_abs == pytest.approx(1.0)
    latency = paired_latency(sess, sess, feeds, repeats=3)
    assert latency.dense_ms > 0 and latency.speedup > 0


def _export(module, args, names, dynamic_axes, path):
    import torch

    torch.onnx.export(module.eval(), args, str(path), input_names=names, dynamic_axes=dynamic_axes, dynamo=False)
    return path


def test_state_axis_named_like_the_batch_takes_the_batch_size(tmp_path):
    """A recurrent state [layers, batch, hidden] next to x [batch, time, features]: the state's batch axis gets
    the batch size, not the sequence length, so the dense model runs."""
    import torch

    gru = torch.nn.GRU(8, 16, num_layers=2, batch_first=True)
    path = _export(gru, (torch.randn(1, 5, 8), torch.randn(2, 1, 16)), ["x", "h"],
                   {"x": {0: "batch", 1: "time"}, "h": {1: "batch"}}, tmp_path / "gru.onnx")
    sess = session(str(path))
    feeds = random_inputs(sess, symbolic=3, length=7)
    assert feeds["x"].shape == (3, 7, 8) and feeds["h"].shape == (2, 3, 16)
    assert sess.run(None, feeds)[0].shape == (3, 7, 16)


def test_dense_model_that_does_not_run_is_refused_with_the_sizes_tried(tmp_path):
    """A Linear over a symbolic axis runs only at its own width: the default length fails in onnxruntime and the
    target refuses with the sizes it tried and the --input-shape way out (exit 2, not a traceback)."""
    import torch

    from pcc.compiler.errors import InvalidRequestError

    path = _export(torch.nn.Linear(16, 4), (torch.randn(1, 16),), ["x"], {"x": {0: "batch", 1: "width"}},
                   tmp_path / "linear.onnx")
    with pytest.raises(InvalidRequestError, match=r"x=1,128.*--input-shape x=D0,D1"):
        OnnxTarget(repeats=1, length=128).emit(None, path, tmp_path / "p.onnx", model_name="l", allocator="uniform",
                                                importance="l2")
    assert not (tmp_path / "p.onnx").exists()

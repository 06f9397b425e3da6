"""Frontends: ONNX files (with external data), nn.Module, fx.GraphModule; errors users can act on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import zoo

from pcc.compiler.errors import ModelLoadError, PccError, UnsupportedModelError
from pcc.compiler.frontend import CANONICAL_OPSET, from_fx, from_torch, load_onnx
from tests.conftest import run_onnx

LIGHT = onnx.__path__[0] + "/backend/test/data/light"


def test_torch_export_keeps_parameter_names():
    module, example = zoo.build("resnet_basic")
    model = from_torch(module, (example,))
    names = set(model.graph.initializers)
    assert "stem.0.0.weight" in names and "fc.weight" in names


def test_fx_graph_module_imports_like_its_module():
    module, example = zoo.build("mlp")
    traced = torch.fx.symbolic_trace(module)
    model = from_fx(traced, (example,))
    feeds = {model.graph.inputs[0].name: example.numpy()}
    np.testing.assert_allclose(run_onnx(model, feeds)[0], module(example).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_restores_every_submodule_mode():
    """A training-mode wrapper around an eval-mode model must not come back with the model's dropout on."""
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
    wrapper = torch.nn.Sequential(inner)  # a new module starts in training mode
    from_torch(wrapper, (torch.randn(2, 4),))
    assert wrapper.training and not inner.training and not inner[1].training


def test_from_fx_rejects_plain_modules():
    module, example = zoo.build("mlp")
    with pytest.raises(PccError, match="GraphModule"):
        from_fx(module, (example,))


def test_external_data_is_loaded(tmp_path, zoo_cache):
    proto = zoo_cache.proto("vgg")
    path = tmp_path / "vgg.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location="vgg.onnx.data", size_threshold=0)
    model = load_onnx(path)
    weight = model.graph.initializers["features.0.0.weight"].const_value.numpy()
    assert weight.shape == (16, 3, 3, 3) and np.abs(weight).sum() > 0


def test_truncated_external_data_is_reported(tmp_path, zoo_cache):
    path = tmp_path / "vgg.onnx"
    onnx.save_model(zoo_cache.proto("vgg"), path, save_as_external_data=True, location="w.data", size_threshold=0)
    data = tmp_path / "w.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="external data"):
        load_onnx(path)


def test_old_opset_is_converted_and_initializer_inputs_dropped():
    model = load_onnx(f"{LIGHT}/light_squeezenet.onnx")
    assert model.opset_imports[""] == CANONICAL_OPSET
    assert [v.name for v in model.graph.inputs] == ["data_0"]


def test_unsupported_opset_is_rejected(tmp_path, zoo_cache):
    proto = zoo_cache.proto("mlp")
    proto.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(UnsupportedModelError, match="opset 99"):
        load_onnx(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not"),
    ],
)
def test_garbage_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_onnx(path)


def test_truncated_file_is_rejected(tmp_path, zoo_cache):
    data = zoo_cache.proto("resnet_basic").SerializeToString()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        path = tmp_path / "cut.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            load_onnx(path)


def test_wrong_extension_and_missing_file(tmp_path, zoo_cache):
    path = tmp_path / "model.pt"
    path.write_bytes(zoo_cache.proto("mlp").SerializeToString())
    with pytest.raises(ModelLoadError, match=".onnx"):
        load_onnx(path)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_onnx(tmp_path / "absent.onnx")

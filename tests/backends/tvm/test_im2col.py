"""Convolutions on the matmul kernels (im2col): strides, padding, dilation, 1x1 and non-square kernels match
onnxruntime; grouped convolutions stay on TVM's own conv2d."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pcc.backends.onnx.runtime import session
from pcc.compiler.frontend import from_torch

tvm = pytest.importorskip("tvm")


def test_convolutions_become_matmuls_that_match_onnxruntime(tmp_path):
    from pcc.backends.tvm.host import host_target
    from pcc.backends.tvm.lowering import lower

    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 20, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(20, 24, 3, stride=2, padding=(1, 0)),
        torch.nn.Conv2d(24, 16, 1),
        torch.nn.Conv2d(16, 8, 3, dilation=2, padding=2, groups=2),  # grouped: TVM's conv2d
        torch.nn.Conv2d(8, 12, (1, 3), bias=False),
    ).eval()
    image = torch.randn(2, 3, 15, 13)
    model = from_torch(network, (image,), optimize=False)
    name = model.graph.inputs[0].name
    lowered = lower(model, {name: [2, 3, 15, 13]}, host_target(), cost_cache=tmp_path / "costs.json")
    # rows are output pixels (N*OH*OW), columns the (c, kh, kw) taps
    assert [(layer.op, layer.m, layer.k, layer.n) for layer in lowered.layers] == [
        ("conv", 2 * 15 * 13, 27, 20), ("conv", 2 * 8 * 6, 180, 24), ("conv", 2 * 8 * 6, 24, 16), ("conv", 2 * 8 * 4, 24, 12),
    ]
    vm = tvm.relax.VirtualMachine(lowered.executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(image.numpy())).numpy()
    expected = session(ir.serde.serialize_model(model).SerializeToString()).run(None, {name: image.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

"""The batched activation matmul kernel against numpy, and a transformer encoder through the whole TVM build
(attention on the batched kernel, norms/softmax/GELU under the CPU schedules) against onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcc.backends.tvm.batch_matmul import batch_matmul_primfunc
from pcc.backends.tvm.host import host_target_spec
from pcc.backends.tvm.tuning import build_kernel
from pcc.compiler.frontend import from_torch
from tests.backends.tvm import compile_block_sparse

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize(("batch", "m", "k", "n"), [(3, 7, 5, 70), (2, 1, 3, 200), (4, 9, 16, 64), (1, 5, 2, 3)])
def test_batched_kernel_matches_numpy(batch, m, k, n):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    w = rng.standard_normal((batch, k, n)).astype(np.float32)
    kernel = build_kernel(batch_matmul_primfunc(batch, m, k, n), host_target_spec())
    out = tvm.runtime.tensor(np.full((batch, m, n), np.nan, np.float32))
    kernel(tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), a @ w, rtol=1e-4, atol=1e-5)


def test_an_encoder_compiles_with_attention_on_the_batched_kernel(tmp_path, capsys):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    library = tmp_path / "encoder.so"
    printed = compile_block_sparse(from_torch(encoder, (torch.randn(1, 24, 32),)), library, 0.8, capsys)
    # 2 layers x (Q x K^T, P x V); the compile step already checked the library against onnxruntime (1e-4)
    assert "4 activation x activation matmuls on the batched kernel" in printed
    assert len(json.loads(library.with_suffix(".json").read_text())["matmuls"]) == 2 * 4

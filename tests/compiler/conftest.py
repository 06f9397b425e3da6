"""Fixtures of the command-line tests: model files the `pcc` subprocesses read."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
import torch
import zoo

from pcc.compiler import from_torch


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """A 4-layer nn.TransformerEncoder with symbolic batch and sequence axes, as an ONNX file."""
    torch.manual_seed(0)
    model = from_torch(zoo.transformer_encoder(layers=4).eval(), (torch.randn(2, 7, 32),), dynamic_batch=True,
                       dynamic_sequence=True)
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    onnx.save(ir.serde.serialize_model(model), path)
    return path

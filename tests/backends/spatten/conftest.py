"""Transformers for the SpAtten lowering tests, exported once per session: the zoo's encoder with a symbolic
sequence length (token pruning needs one) and TinyGPT (causal mask; static length, so heads only)."""

from __future__ import annotations

import onnx_ir as ir
import pytest
import torch
import zoo

from pcc.compiler import from_torch

ENCODER_LAYERS = 4


class Exported:
    """A torch module and its export; `model()` hands out fresh IR copies (pipelines work in place)."""

    def __init__(self, module: torch.nn.Module, model: ir.Model) -> None:
        self.module = module
        self.proto = ir.serde.serialize_model(model)

    def model(self) -> ir.Model:
        return ir.serde.deserialize_model(self.proto)

    @property
    def bytes(self) -> bytes:
        return self.proto.SerializeToString()


@pytest.fixture(scope="session")
def encoder() -> Exported:
    torch.manual_seed(0)
    module = zoo.transformer_encoder(layers=ENCODER_LAYERS).eval()
    return Exported(module, from_torch(module, (torch.randn(2, 7, 32),), dynamic_batch=True, dynamic_sequence=True))


@pytest.fixture(scope="session")
def tiny_gpt() -> Exported:
    module, example = zoo.build("tiny_gpt")
    return Exported(module, from_torch(module, (example,), dynamic_batch=True))

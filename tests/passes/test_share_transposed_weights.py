"""ShareTransposedWeights and the parameter count: a tied embedding / LM head is written and counted once."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from pcc.backends.onnx.writer import write_checked
from pcc.compiler import from_torch
from pcc.passes.transforms.fold_constants import FoldConstants
from tests.conftest import run_onnx


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 600, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in Llama and GPT-2

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_a_tied_head_folded_into_its_own_copy_is_stored_once(tmp_path):
    torch.manual_seed(0)
    model = from_torch(TiedLM(), (torch.zeros(2, 5, dtype=torch.long),), input_names=["ids"])
    FoldConstants()(model)
    big = [v for v in model.graph.initializers.values() if v.const_value.size >= 600 * 128]
    assert len(big) == 2  # folding made the head's transpose a second copy

    ids = np.random.default_rng(0).integers(0, 600, (2, 5)).astype(np.int64)
    before = run_onnx(model, {"ids": ids})
    path = tmp_path / "tied.onnx"
    write_checked(model, path)
    written = onnx.load(path)
    sizes = [int(np.prod(t.dims)) for t in written.graph.initializer]
    assert sorted(sizes)[-1] == 600 * 128 and sorted(sizes)[-2] < 600 * 128
    assert any(node.op_type == "Transpose" for node in written.graph.node)
    np.testing.assert_allclose(run_onnx(written, {"ids": ids})[0], before[0], rtol=0, atol=0)


def test_the_parameter_count_counts_a_tied_weight_once():
    from pcc.passes.analysis.cost import count_params

    model = from_torch(TiedLM(), (torch.zeros(2, 5, dtype=torch.long),), input_names=["ids"])
    FoldConstants()(model)
    unique = sum(p.numel() for p in TiedLM().parameters())  # nn.Module.parameters() lists a tied one once
    assert count_params(model) == unique

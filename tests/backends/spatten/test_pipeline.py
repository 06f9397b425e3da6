"""The --target spatten pipeline: the sparsity split between tokens and heads, and both cascades on one model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from pcc.backends.spatten import HEAD_SHARE, AttentionSparsitySplit, spatten_pipeline, split_attention_sparsity
from pcc.compiler.errors import InvalidRequestError
from pcc.passes.transforms import CascadeHeadsReport, TokenPruneReport
from tests.conftest import max_relative_difference, run_onnx


@pytest.mark.parametrize(("layers", "sparsity"), [(2, 0.3), *((n, s) for n in (4, 6, 12) for s in (0.1, 0.3, 0.5, 0.7))])
def test_split_removes_the_requested_token_x_head_work(layers, sparsity):
    split = split_attention_sparsity(layers, sparsity)
    removed = np.mean(1 - np.asarray(split.token_keep) * np.asarray(split.head_keep))
    assert removed == pytest.approx(sparsity, abs=1e-9)
    assert split.head_sparsity == pytest.approx(HEAD_SHARE * sparsity)
    assert 1 - np.mean(split.head_keep) == pytest.approx(split.head_sparsity)
    assert 1 - np.mean(split.token_keep) == pytest.approx(split.token_sparsity)
    assert split.token_sparsity > split.head_sparsity  # tokens are the main lever, as in SpAtten


def test_split_edges():
    assert split_attention_sparsity(6, 0.0).token_keep == [1.0] * 6
    with pytest.raises(InvalidRequestError, match="out of reach on 2 attention layer"):
        split_attention_sparsity(2, 0.5)  # the last layer would have to keep no token
    with pytest.raises(InvalidRequestError, match=r"\[0, 1\)"):
        split_attention_sparsity(6, 1.0)


def test_both_cascades_run_on_one_model(encoder):
    x = np.random.default_rng(0).standard_normal((2, 40, 32), dtype=np.float32)
    feeds = {encoder.model().graph.inputs[0].name: x}
    dense = run_onnx(encoder.proto, feeds)
    same = spatten_pipeline(0.0).run(encoder.model())
    assert same.get(TokenPruneReport) is None and same.get(CascadeHeadsReport) is None
    assert max_relative_difference(run_onnx(same.model, feeds), dense) <= 1e-6
    result = spatten_pipeline(0.5).run(encoder.model())
    split = result.get(AttentionSparsitySplit)
    assert result.get(TokenPruneReport).keep == split.token_keep
    assert result.get(CascadeHeadsReport).kept == [max(1, int(np.floor(4 * k + 1e-9))) for k in split.head_keep]
    hidden = run_onnx(result.model, feeds)[0]
    assert hidden.shape == (2, int(np.floor(40 * np.float32(split.token_keep[-1]))), 32) and np.isfinite(hidden).all()
    assert "CascadeTokensAndHeads(sparsity=0.5" in repr(spatten_pipeline(0.5))


def test_model_without_attention_is_a_one_line_error(zoo_cache):
    with pytest.raises(InvalidRequestError, match="^--target spatten needs multi-head attention") as error:
        spatten_pipeline(0.5).run(zoo_cache.model("resnet_basic"))
    assert "\n" not in str(error.value)


def test_tokens_then_heads_pass_the_full_checker(encoder):
    result = spatten_pipeline(0.7).run(encoder.model())  # heads pruned in layer 2, tokens again in layer 3
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)

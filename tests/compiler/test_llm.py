"""Causal LM import (`compiler/llm.py`) on a tiny random Llama (2 layers, GQA 4 query / 2 key-value heads,
SwiGLU, RMSNorm, RoPE, hidden 64) saved as a Hugging Face folder with a word-level tokenizer: the export
equals the torch logits at any batch and length, attention is recognised with its projections, MatMul
weights are named initializers, and the tokenizer is written beside the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from tests.conftest import run_onnx  # noqa: E402

from pcc.compiler.errors import ModelLoadError  # noqa: E402
from pcc.compiler.llm import is_causal_lm_path, load_causal_lm, save_tokenizer  # noqa: E402
from pcc.passes.analysis.attention import find_attention_blocks  # noqa: E402

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
WORDS = ("the king is dead long live the queen and all her court shall sing of love war wine "
         "night day sword crown ghost fair foul").split()


def tiny_tokenizer():
    """A word-level fast tokenizer over `WORDS` (unknown words map to [UNK])."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")


def tiny_llama(vocab: int = 64, seed: int = 0):
    """A random `LlamaForCausalLM` (eval, eager attention) with random RMSNorm scales (all ones would make
    the norms test nothing)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, **TINY)
    config._attn_implementation = "eager"
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in llama.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return llama


def torch_logits(llama, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return llama(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(hf_folder):
    return load_causal_lm(hf_folder)


def test_export_equals_torch_logits_at_any_batch_and_length(imported):
    model, _ = imported
    (ids,), (logits,) = model.graph.inputs, model.graph.outputs
    assert ids.name == "input_ids" and logits.name == "logits"
    assert not any(isinstance(d, int) for d in ids.shape.dims)  # batch and sequence symbolic
    assert logits.shape[2] == 64
    llama = tiny_llama()
    for batch, length in ((1, 7), (3, 20)):
        input_ids = np.random.default_rng(batch).integers(0, 64, (batch, length)).astype(np.int64)
        got = run_onnx(model, {"input_ids": input_ids})[0]
        np.testing.assert_allclose(got, torch_logits(llama, input_ids), atol=1e-4, rtol=0)


def test_attention_recognised_with_projections_and_gqa(imported):
    model, _ = imported
    blocks = find_attention_blocks(model).blocks
    assert len(blocks) == 2
    for block in blocks:
        assert (block.heads, block.kv_heads, block.head_dim) == (4, 2, 16)
        assert None not in (block.query, block.key, block.value, block.output)


def test_matmul_weights_are_named_initializers(imported):
    model, _ = imported
    names = [node.inputs[1].name for node in model.graph if node.op_type == "MatMul" and node.inputs[1].is_initializer()]
    assert "model.layers.0.self_attn.q_proj.weight.T" in names
    assert "model.layers.1.mlp.down_proj.weight.T" in names
    assert len(names) == 2 * 7 + 1  # q k v o gate up down per layer, and the tied LM head


def test_tokenizer_saved_beside_the_model(imported, tmp_path):
    model, tokenizer = imported
    written = save_tokenizer(tokenizer, tmp_path / "out.onnx")
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer.json") in written
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again("the king is dead")["input_ids"] == tokenizer("the king is dead")["input_ids"] == [1, 2, 3, 4]


def test_paths_and_errors(hf_folder, tmp_path):
    assert is_causal_lm_path(hf_folder)
    assert not is_causal_lm_path(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"not gguf")
    assert is_causal_lm_path(tmp_path / "model.gguf")
    with pytest.raises(ModelLoadError, match="model.gguf"):
        load_causal_lm(tmp_path / "model.gguf")
    with pytest.raises(ModelLoadError, match="no such"):
        load_causal_lm(tmp_path / "missing")

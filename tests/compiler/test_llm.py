"""Causal LM import (`compiler/llm.py`), text calibration and perplexity on a tiny random Llama (2 layers, GQA 4 query / 2 key-value heads,
SwiGLU, RMSNorm, RoPE, hidden 64) saved as a Hugging Face folder with a word-level tokenizer: the export
equals the torch logits at any batch and length, attention is recognised with its projections, MatMul
weights are named initializers, the tokenizer is written beside the output; text calibration windows are
spread over the file and perplexity in onnxruntime equals torch's cross-entropy."""

from __future__ import annotations

import argparse
import json
import atexit
import functools
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from tests.conftest import run_onnx  # noqa: E402

from pcc.compiler import cli_llm  # noqa: E402
from pcc.compiler.calibration import load_calibration  # noqa: E402
from pcc.compiler.errors import InvalidRequestError, ModelLoadError  # noqa: E402
from pcc.compiler.llm import export_decoder_step, is_causal_lm_path, load_causal_lm, save_tokenizer  # noqa: E402
from pcc.passes.analysis.attention import find_attention_blocks  # noqa: E402
from pcc.passes.analysis.perplexity import text_perplexity  # noqa: E402
from tests.passes.tiny_llama import CONFIG, tiny_llama as shared_tiny_llama  # noqa: E402

VOCAB = 64
WORDS = ("the king is dead long live the queen and all her court shall sing of love war wine "
         "night day sword crown ghost fair foul").split()


def tiny_tokenizer():
    """A word-level fast tokenizer over `WORDS` (unknown words map to [UNK])."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")


def tiny_llama(vocab: int = VOCAB, seed: int = 0):
    """The shared tiny Llama with this file's vocabulary (its word tokenizer's) and a tied LM head."""
    return shared_tiny_llama(seed, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=True)


def torch_logits(llama, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return llama(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.numpy()


@functools.lru_cache(maxsize=1)
def tiny_import() -> tuple[Path, bytes, Any]:
    """`tiny_llama()` saved as a Hugging Face folder with `tiny_tokenizer()` and imported by `load_causal_lm`:
    (folder, the serialised model, the tokenizer), once per session (the export is the slow part)."""
    folder = Path(tempfile.mkdtemp(prefix="pcc_tiny_llama_"))
    atexit.register(shutil.rmtree, folder, True)
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, tokenizer = load_causal_lm(folder)
    return folder, ir.serde.serialize_model(model), tokenizer


@pytest.fixture(scope="module")
def hf_folder() -> Path:
    return tiny_import()[0]


@pytest.fixture(scope="module")
def imported() -> tuple[ir.Model, Any]:
    _, proto, tokenizer = tiny_import()
    return ir.serde.deserialize_model(proto), tokenizer


def test_export_equals_torch_logits_at_any_batch_and_length(imported):
    model, _ = imported
    (ids,), (logits,) = model.graph.inputs, model.graph.outputs
    assert ids.name == "input_ids" and logits.name == "logits"
    assert not any(isinstance(d, int) for d in ids.shape.dims)  # batch and sequence symbolic
    assert logits.shape[2] == VOCAB
    llama = tiny_llama()
    for batch, length in ((1, 7), (3, 20)):
        input_ids = np.random.default_rng(batch).integers(0, VOCAB, (batch, length)).astype(np.int64)
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


TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(0, 7 * 401, 7))  # 401 words, 401 tokens


def test_text_calibration_windows_spread_over_the_file(imported, tmp_path):
    model, tokenizer = imported
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    data = load_calibration(model, path, tokenizer=tokenizer, windows=5, length=40, batch_size=2)
    ids = data.inputs["input_ids"]
    tokens = np.asarray(tokenizer(TEXT)["input_ids"])
    assert ids.shape == (5, 40) and ids.dtype == np.int64 and not data.synthetic
    starts = [0, 90, 180, 271, 361]  # evenly from the first to the last whole window
    np.testing.assert_array_equal(ids, np.stack([tokens[s : s + 40] for s in starts]))
    assert [len(b["input_ids"]) for b in data] == [2, 2, 1]
    with pytest.raises(InvalidRequestError, match="language models"):
        load_calibration(model, path)
    with pytest.raises(InvalidRequestError, match="fewer than one window"):
        load_calibration(model, path, tokenizer=tokenizer, length=500)


def test_perplexity_in_onnxruntime_equals_torch(imported, tmp_path):
    model, tokenizer = imported
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    result = text_perplexity(model, path, tokenizer, length=50, batch_size=3)
    assert (result.windows, result.length, result.tokens) == (8, 50, 8 * 49)
    windows = np.asarray(tokenizer(TEXT)["input_ids"][:400]).reshape(8, 50)
    logits = torch.from_numpy(torch_logits(tiny_llama(), windows))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.from_numpy(windows[:, 1:]).reshape(-1))
    assert result.value == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_cli_finish_saves_the_tokenizer_and_reports_perplexity(imported, tmp_path):
    model, tokenizer = imported
    (tmp_path / "eval.txt").write_text(TEXT)
    parser = argparse.ArgumentParser()
    cli_llm.add_arguments(parser)
    args = parser.parse_args(["--eval", str(tmp_path / "eval.txt"), "--calib-length", "50", "--eval-windows", "4"])
    assert cli_llm.calibration_options(args, tokenizer) == {"tokenizer": tokenizer, "windows": 128, "length": 50}
    dense = cli_llm.dense_source(Path("unused"), model, tokenizer)
    output = tmp_path / "out" / "pruned.onnx"
    output.parent.mkdir()
    ir.save(model, str(output))
    report = types.SimpleNamespace()
    cli_llm.finish(args, report, dense, output, tokenizer)
    assert (output.parent / "tokenizer.json").is_file()
    assert report.perplexity_dense == report.perplexity_pruned > 1  # the same model twice
    assert report.perplexity_text.endswith("196 tokens in windows of 50")
    with pytest.raises(InvalidRequestError, match="language model"):
        cli_llm.calibration_options(args, None)


def test_decoder_step_with_kv_cache_continues_a_prefill_exactly():
    llama = tiny_llama()
    step = export_decoder_step(llama)
    assert [v.name for v in step.graph.outputs] == ["logits", "present_keys", "present_values"]
    tokens = np.random.default_rng(5).integers(0, VOCAB, (2, 11)).astype(np.int64)
    empty = np.zeros((CONFIG["num_hidden_layers"], 2, CONFIG["num_key_value_heads"], 0, 16), np.float32)
    logits, keys, values = run_onnx(step, {"input_ids": tokens[:, :8], "past_keys": empty, "past_values": empty})
    assert keys.shape == (2, 2, 2, 8, 16)
    decoded = []
    for i in range(8, 11):  # one token at a time, the cache growing
        out, keys, values = run_onnx(step, {"input_ids": tokens[:, i : i + 1], "past_keys": keys, "past_values": values})
        decoded.append(out[:, 0])
    full = torch_logits(llama, tokens)
    np.testing.assert_allclose(logits, full[:, :8], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.stack(decoded, axis=1), full[:, 8:], atol=1e-4, rtol=0)


def test_pcc_compile_on_a_hugging_face_folder(hf_folder, tmp_path):
    """The command line end to end: a folder in, text calibration, 2:4 by Wanda, perplexity dense -> pruned in
    the summary and report.json, the tokenizer beside the output, nothing on stderr."""
    from tests.compiler.test_cli import pcc

    text = " ".join(WORDS[i % len(WORDS)] for i in range(0, 3000, 7))
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(" ".join(reversed(text.split())))
    out, report = tmp_path / "llm.onnx", tmp_path / "report"
    done = pcc("compile", hf_folder, "--sparsity", "0.5", "--sparsify", "nm:2:4", "--importance", "wanda",
               "--calib", tmp_path / "calib.txt", "--calib-windows", "4", "--calib-length", "32",
               "--eval", tmp_path / "eval.txt", "--eval-windows", "2", "-o", out, "--repeats", "2", "--report", report)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "perplexity" in done.stdout and "nm:2:4 (fixed, wanda)" in done.stdout
    saved = json.loads((report / "report.json").read_text())
    assert saved["perplexity_dense"] > 1 and saved["perplexity_pruned"] > 1
    assert (tmp_path / "tokenizer.json").exists()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    projection = next(w for name, w in weights.items() if "mlp.up_proj" in name)
    groups = projection.T.reshape(projection.shape[1], -1, 4)  # N:M runs along each output's inputs
    assert ((groups != 0).sum(axis=-1) <= 2).all()


@pytest.mark.parametrize("teacher", [False, True])
def test_pcc_finetune_on_text_trains_norms_by_next_token_loss(tmp_path, teacher):
    """PERP on a language model as pcc compile writes it (the tokenizer beside it): only norms and biases
    trained on text windows by next-token cross-entropy (with a teacher, plus per-token distillation);
    perplexity on that text falls, and the tokenizer travels to the fine-tuned model's folder."""
    import re

    from tests.compiler.test_cli import pcc

    _, proto, tokenizer = tiny_import()
    model = tmp_path / "compiled" / "llm.onnx"
    model.parent.mkdir()
    onnx.save(proto, model)
    save_tokenizer(tokenizer, model)
    (tmp_path / "train.txt").write_text(" ".join(WORDS[i % len(WORDS)] for i in range(0, 3000, 7)))
    tuned = tmp_path / "tuned" / "llm.onnx"
    done = pcc("finetune", model, "--data", tmp_path / "train.txt", "--data-windows", "16", "--data-length", "32",
               "--params", "bn-bias", "--epochs", "5", "--lr", "0.1", "--batch-size", "4",
               "--eval", tmp_path / "train.txt", "-o", tuned, *(["--teacher", model] if teacher else []))
    assert done.returncode == 0, done.stderr
    loss = "distillation + next-token cross-entropy" if teacher else "next-token cross-entropy loss"
    assert "bn-bias" in done.stdout and loss in done.stdout
    before, after = map(float, re.search(r"perplexity\s+([\d.]+) -> ([\d.]+)", done.stdout).groups())
    assert after < 0.9 * before
    assert (tuned.parent / "tokenizer.json").exists()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    tuned_weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tuned)).graph.initializer}
    changed = [name for name, w in tuned_weights.items() if not np.array_equal(w, weights[name])]
    assert changed and all(tuned_weights[name].ndim == 1 for name in changed)  # norms and biases only


def test_pcc_finetune_on_text_needs_the_saved_tokenizer(tmp_path):
    from tests.compiler.test_cli import pcc

    _, proto, _ = tiny_import()
    onnx.save(proto, tmp_path / "llm.onnx")
    (tmp_path / "train.txt").write_text("the king is dead")
    done = pcc("finetune", tmp_path / "llm.onnx", "--data", tmp_path / "train.txt", "-o", tmp_path / "out.onnx")
    assert done.returncode == 2 and "tokenizer" in done.stderr and "Traceback" not in done.stderr

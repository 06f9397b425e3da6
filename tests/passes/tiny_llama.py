"""A tiny randomly initialised Llama (GQA, SwiGLU, RMSNorm, RoPE) from transformers, exported as pcc imports it
(`pcc.compiler.llm.export_causal_lm`: eager attention, dynamo exporter).

Shared by the structured-pruning tests of decoders (`test_llama_groups.py`, `test_flap.py`). The RMSNorm
scales are randomised too: at their initial value (all ones) the exporter's constants would be shared by
every layer and the norm would test nothing.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CONFIG = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}


def tiny_llama(seed: int = 0, **config_changes):
    """A random `LlamaForCausalLM` in eval mode (`CONFIG` with `config_changes`), with random RMSNorm scales
    (all ones would make tests of the norms test nothing)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**CONFIG, **config_changes})
    config._attn_implementation = "eager"  # as `load_hf_causal_lm` loads real models
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in llama.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return llama


@functools.cache
def exported() -> onnx.ModelProto:
    """`tiny_llama()` as `pcc.compiler.llm.export_causal_lm` exports it, once per test session (the dynamo
    export is most of these tests' time); deserialise a fresh IR from it for every pipeline."""
    import onnx_ir as ir

    from pcc.compiler.llm import export_causal_lm

    return ir.serde.serialize_model(export_causal_lm(tiny_llama()))


def token_batches(count: int, batch: int = 4, length: int = 12, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, CONFIG["vocab_size"], (batch, length)).astype(np.int64)} for _ in range(count)]


def torch_logits(llama, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return llama(input_ids=torch.from_numpy(input_ids), use_cache=False).logits.numpy()

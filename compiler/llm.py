"""Causal language models in: a `.gguf` file or a Hugging Face model folder becomes an `onnx_ir.Model`.

The model is loaded with `transformers` (GGUF weights dequantised to float32 by `transformers` + `gguf`;
optional extra `pcc[llm]`) and exported with `torch.onnx.export(dynamo=True)` as the function
`input_ids` [batch, seq] (int64, both axes symbolic) → `logits` [batch, seq, vocab], without a KV cache:
the prefill form, the one pruning analyses and calibration run. `export_decoder_step` exports the
generation form: the same model with the key/value cache in and out, stacked over the layers as
`past_keys`/`past_values` [layers, batch, kv_heads, past, head_dim] → `logits`, `present_keys`,
`present_values` [.., past + seq, ..] (a prefill is a step with an empty cache, past = 0).

Why these choices:
- Attention is exported from transformers' `eager` implementation, not `sdpa`: both run the same, but
  the eager graph keeps the Q and K projections visible to `find_attention_blocks` through RoPE and the
  grouped-query `repeat_kv` (query, key, value, output and `kv_heads` all recognised), while the SDPA
  decomposition hides Q and K and reports every head as its own key/value head.
- The exporter's optimiser stores each `nn.Linear` weight transposed, [in, out], as an anonymous
  constant (`val_123`) read by a MatMul; those constants are renamed after the parameter they came from
  (`model.layers.0.mlp.up_proj.weight.T`), so reports and later passes can say which layer they mean.
- The model is called with an all-ones attention mask (no padding: each row is one sequence), which
  keeps transformers' packed-sequence detection (a CumSum over positions and a token-by-token Equal) out
  of the graph: the causal mask is then a plain comparison of positions.
- The tokenizer is returned with the model and `save_tokenizer` writes it beside the output
  (`tokenizer.json`, `tokenizer_config.json`), so a pruned model is usable as it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError

__all__ = [
    "GGUF_SUFFIX",
    "is_causal_lm_path",
    "load_hf_causal_lm",
    "export_causal_lm",
    "export_decoder_step",
    "load_causal_lm",
    "load_saved_tokenizer",
    "save_tokenizer",
]

GGUF_SUFFIX = ".gguf"
_EXPORT_LENGTH = 16  # example sequence length for the export; both axes are symbolic in the result
_PREFIX = "lm."  # the wrapper's attribute name, stripped from initializer names


def is_causal_lm_path(path: str | os.PathLike[str]) -> bool:
    """A `.gguf` file, or a folder with a Hugging Face `config.json`: what `load_causal_lm` takes."""
    path = Path(path)
    return (path.is_file() and path.suffix.lower() == GGUF_SUFFIX) or (path.is_dir() and (path / "config.json").is_file())


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UnsupportedModelError(
            "language models need transformers, gguf and accelerate: pip install 'pcc[llm]'"
        ) from None
    return transformers


def load_hf_causal_lm(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(torch causal LM in eval mode, float32, eager attention; its tokenizer) from a `.gguf` file or an HF
    folder. Nothing is downloaded: files are read locally only."""
    import torch

    transformers = _require_transformers()
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ModelLoadError(f"{path}: a language model must be a .gguf file or a Hugging Face model folder")
        folder, extra = path.parent, {"gguf_file": path.name}
    else:
        folder, extra = path, {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        module = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager", **extra
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: transformers cannot load it as a causal LM ({str(exc).splitlines()[0][:200]})") from None
    return module.eval(), tokenizer


def export_causal_lm(module: Any) -> ir.Model:
    """Export a `transformers` causal LM (eager attention recommended) as `input_ids` → `logits`,
    batch and sequence symbolic, with its MatMul weights named after their parameters."""
    import torch

    from pcc.compiler.frontend import from_torch

    class _Logits(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # an explicit all-ones mask: without one, transformers derives packed-sequence boundaries from
            # the positions (CumSum, Equal over every pair of tokens), which a single unpadded sequence never has
            return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    vocab = int(module.config.vocab_size)
    example = torch.randint(0, vocab, (2, _EXPORT_LENGTH), generator=torch.Generator().manual_seed(0))
    model = from_torch(
        _Logits(module), (example,), input_names=["input_ids"], output_names=["logits"],
        dynamic_batch=True, dynamic_sequence=True,
    )
    _name_weights(model, module)
    return model


def export_decoder_step(module: Any) -> ir.Model:
    """Export a `transformers` causal LM's generation step with its KV cache as tensors (module docstring)."""
    import torch
    from transformers import DynamicCache

    from pcc.compiler.frontend import from_torch

    config = module.config
    layers = int(config.num_hidden_layers)

    class _Step(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
            cache = DynamicCache(config=config)
            for i in range(layers):
                cache.update(past_keys[i], past_values[i], i)
            past, (batch, length) = past_keys.shape[3], input_ids.shape
            positions = torch.arange(past, past + length).unsqueeze(0).expand(batch, -1)
            mask = torch.ones(batch, past + length, dtype=torch.int64)
            out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            kept = out.past_key_values.layers
            return out.logits, torch.stack([k.keys for k in kept]), torch.stack([k.values for k in kept])

    heads = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    generator = torch.Generator().manual_seed(0)
    example = (  # sizes > 1 everywhere: the exporter specialises axes of size 1
        torch.randint(0, int(config.vocab_size), (2, 3), generator=generator),
        torch.randn(layers, 2, heads, 5, head_dim, generator=generator),
        torch.randn(layers, 2, heads, 5, head_dim, generator=generator),
    )
    batch, length, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    model = from_torch(
        _Step(module), example, input_names=["input_ids", "past_keys", "past_values"],
        output_names=["logits", "present_keys", "present_values"],
        dynamic_shapes=({0: batch, 1: length}, {1: batch, 3: past}, {1: batch, 3: past}),
    )
    _name_weights(model, module)
    return model


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    return array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _name_weights(model: ir.Model, module: Any) -> None:
    """Initializers named after the parameters they hold (`.T` where stored transposed), prefix stripped."""
    parameters: dict[tuple, str] = {}
    for name, parameter in module.named_parameters():
        array = parameter.detach().numpy()
        if array.ndim == 2:
            parameters.setdefault(_digest(array.T), f"{name}.T")
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        new = name[len(_PREFIX):] if name.startswith(_PREFIX) else None
        if new is None and value.const_value is not None and len(value.const_value.shape) == 2:
            new = parameters.get(_digest(value.const_value.numpy()))
        if new is not None and new not in graph.initializers:
            value.name = new


def load_causal_lm(path: str | os.PathLike[str]) -> tuple[ir.Model, Any]:
    """(the IR of the causal LM at `path` — a `.gguf` file or an HF folder — and its tokenizer)."""
    module, tokenizer = load_hf_causal_lm(path)
    return export_causal_lm(module), tokenizer


def load_saved_tokenizer(model_path: str | os.PathLike[str]) -> Any:
    """The tokenizer `save_tokenizer` wrote beside a compiled language model (what text data for it needs)."""
    transformers = _require_transformers()
    folder = Path(model_path).resolve().parent
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError):
        raise InvalidRequestError(
            f"text data needs the language model's tokenizer: none in {folder} (pcc compile writes it beside its output)"
        ) from None


def save_tokenizer(tokenizer: Any, model_path: str | os.PathLike[str]) -> list[Path]:
    """Write the tokenizer's files into the folder of `model_path` (the written model); returns them."""
    folder = Path(model_path).parent
    return [Path(p) for p in tokenizer.save_pretrained(str(folder))]

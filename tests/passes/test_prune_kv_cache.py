"""PruneKVCache on a GPT-style decoder step: exact when nothing is dropped, caches bounded per layer,
and the same tokens dropped as an independent torch re-implementation of the policy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import zoo
from pcc.compiler.errors import InvalidRequestError
from pcc.passes.transforms.prune_kv_cache import PruneKVCache, kv_capacity_schedule

LAYERS, HEADS, HEAD_DIM = 3, 4, 8


@pytest.fixture(scope="module")
def decoder() -> zoo.TinyGPTDecoder:
    torch.manual_seed(0)
    return zoo.TinyGPTDecoder(zoo.TinyGPT(layers=LAYERS, context=64)).eval()


@pytest.fixture(scope="module")
def step_model(decoder) -> ir.Model:
    return zoo.export_decoder_step(decoder)


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _generate(session: ort.InferenceSession, prompt: np.ndarray, steps: int, with_scores: bool):
    """Greedy generation with onnxruntime: (logits per call, cache lengths per layer per call)."""
    names = [o.name for o in session.get_outputs()]
    state = {f"past_{k}_{i}": np.zeros((1, HEADS, 0, HEAD_DIM), np.float32) for i in range(LAYERS) for k in "kv"}
    if with_scores:
        state.update({f"past_scores_{i}": np.zeros((1, 0), np.float32) for i in range(LAYERS)})
    feeds = {"ids": prompt, "positions": np.arange(prompt.shape[1])[None]}
    logits, lengths = [], []
    for _ in range(steps):
        out = dict(zip(names, session.run(None, {**feeds, **state})))
        state = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
        logits.append(out["logits"][:, -1])
        lengths.append([state[f"past_k_{i}"].shape[2] for i in range(LAYERS)])
        feeds = {"ids": out["logits"][:, -1:].argmax(-1), "positions": feeds["positions"][:, -1:] + 1}
    return np.concatenate(logits), lengths


def _reference(decoder, prompt: np.ndarray, steps: int, capacity: list[int], recent: int) -> np.ndarray:
    """The policy in plain torch: per layer, scores += attention received (sum over heads and queries),
    the newest `recent` always kept, the top `capacity` kept in order."""
    attentions = [block.attention for block in decoder.gpt.blocks]
    cache = decoder.empty_cache()
    scores = [torch.zeros(1, 0) for _ in range(LAYERS)]
    ids, positions = torch.tensor(prompt), torch.arange(prompt.shape[1])[None]
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            for attention in attentions:
                attention.recorded = []
            out, *cache = decoder(ids, positions, *cache)
            for layer, attention in enumerate(attentions):
                received = attention.recorded[0].sum(dim=(1, 2))
                total = received.shape[1]
                layer_scores = torch.nn.functional.pad(scores[layer], (0, total - scores[layer].shape[1])) + received
                ranked = layer_scores.clone()
                ranked[:, max(0, total - recent):] += 1e9
                keep = ranked.topk(min(total, capacity[layer]), dim=1).indices.sort(dim=1).values[0]
                cache[2 * layer], cache[2 * layer + 1] = cache[2 * layer][:, :, keep], cache[2 * layer + 1][:, :, keep]
                scores[layer] = layer_scores[:, keep]
            logits.append(out[:, -1].numpy())
            ids, positions = out[:, -1:].argmax(-1), positions[:, -1:] + 1
    for attention in attentions:
        attention.recorded = None
    return np.concatenate(logits)


PROMPT = np.random.default_rng(0).integers(0, 64, (1, 6))


def test_capacity_above_the_generated_length_is_the_dense_decoder(step_model):
    dense_logits, dense_lengths = _generate(_session(step_model), PROMPT, 20, with_scores=False)
    model = _copy(step_model)
    PruneKVCache(capacity=(64, 64, 64), recent=4)(model)
    logits, lengths = _generate(_session(model), PROMPT, 20, with_scores=True)
    np.testing.assert_allclose(logits, dense_logits, atol=1e-5)
    assert lengths == dense_lengths == [[6 + i] * LAYERS for i in range(20)]


def test_caches_are_bounded_per_layer_and_match_the_reference_policy(step_model, decoder):
    model = _copy(step_model)
    capacity, recent = [16, 11, 8], 3
    PruneKVCache(capacity=tuple(capacity), recent=recent)(model)
    logits, lengths = _generate(_session(model), PROMPT, 30, with_scores=True)
    seen = [6 + i for i in range(30)]
    assert lengths == [[min(s, c) for c in capacity] for s in seen]  # the cache stops growing at its capacity
    np.testing.assert_allclose(logits, _reference(decoder, PROMPT, 30, capacity, recent), atol=1e-4)
    dense_logits, _ = _generate(_session(step_model), PROMPT, 30, with_scores=False)
    assert not np.allclose(logits[-5:], dense_logits[-5:], atol=1e-3)  # dropping tokens does change later steps


def test_sparsity_follows_the_cascade_schedule(step_model):
    model = _copy(step_model)
    prune = PruneKVCache(sparsity=0.5, context=60, recent=4)
    prune(model)
    assert prune.report.capacity == kv_capacity_schedule(LAYERS, 0.5, 60, 4)
    assert prune.report.capacity[0] == 60 and prune.report.capacity[-1] < prune.report.capacity[1] < 60
    assert np.mean(prune.report.capacity) == pytest.approx(30, abs=1)


def test_a_model_without_a_kv_cache_is_refused(zoo_cache):
    with pytest.raises(InvalidRequestError, match="decoder step graph"):
        PruneKVCache(capacity=(8, 8))(zoo_cache.model("tiny_gpt"))


def test_capacities_must_fit_the_layers(step_model):
    model = _copy(step_model)
    with pytest.raises(InvalidRequestError, match="one int above recent"):
        PruneKVCache(capacity=(8, 8), recent=4)(model)

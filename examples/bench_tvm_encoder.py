"""A BERT-shaped encoder end to end on TVM: block-sparse weights vs the dense model in onnxruntime.

MiniLM-L6's shape with random weights (6 layers, hidden 384, 12 heads, FFN 1536, GELU; a static batch of 1
and 128 tokens), exported once, then `pcc compile --sparsify block:16x1 --target tvm` at each sparsity: the
weight matmuls on BSR or dense kernels (chosen by measurement), attention's activation matmuls on the
batched kernel, the rest under pcc's CPU schedules. Each compile checks the library against onnxruntime on
the same sparsified ONNX and prints the interleaved latency against the dense model in onnxruntime.

`--model minilm` takes the real MiniLM-L6 instead (examples/movie_reviews.py's sentiment classifier, as
exported for pruning: token ids and attention mask in, symbolic batch and sequence axes, the mask built
with Range/Where by transformers), compiled at a batch of 1 and 128 tokens. Its weights are the
pretrained encoder's (the classifier head is untrained: latency does not depend on it; for accuracy at
these sparsities see README's masked fine-tuning).

    python examples/bench_tvm_encoder.py [--model random|minilm] [--sparsities 0 0.8 0.9] [--repeats 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import onnx_ir as ir
import torch

from pcc.compiler import from_torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # movie_reviews, for --model minilm

LAYERS, HIDDEN, HEADS, FFN, TOKENS = 6, 384, 12, 1536, 128


def export_minilm(path: Path) -> Path:
    import movie_reviews

    torch.manual_seed(0)
    ir.save(movie_reviews.export(movie_reviews.classifier().eval()), path)
    return path


def export(path: Path) -> Path:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=FFN, dropout=0.0, activation="gelu",
                                             batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
    ir.save(from_torch(encoder, (torch.randn(1, TOKENS, HIDDEN),), input_names=["hidden"], output_names=["out"]), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.8, 0.9])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("out/bench_tvm_encoder"))
    parser.add_argument("--model", choices=("random", "minilm"), default="random")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = export_minilm(args.out / "minilm.onnx") if args.model == "minilm" else export(args.out / "encoder.onnx")
    for sparsity in args.sparsities:
        done = subprocess.run(
            [sys.executable, "-m", "pcc.compiler", "compile", str(model), "--sparsity", str(sparsity), "--sparsify",
             "block:16x1", "--target", "tvm", "-o", str(args.out / f"{model.stem}_{sparsity:g}.so"), "--repeats",
             str(args.repeats), "--latency-length", str(TOKENS)], capture_output=True, text=True,
        )
        if done.returncode:
            raise SystemExit(done.stderr.strip().splitlines()[-1])
        shown = [line for line in done.stdout.splitlines() if line.lstrip().startswith(("latency", "sparsify", "checks"))]
        print(f"sparsity {sparsity:g}:\n" + "\n".join(shown), flush=True)


if __name__ == "__main__":
    main()

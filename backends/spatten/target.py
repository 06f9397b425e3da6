"""The `spatten` target: a folder holding what SpAtten would run and what it would cost.

No SpAtten chip exists here, so the target is the program for the architecture plus the simulator's
verdict on it, and a functional model that computes what the chip computes:
- `model.onnx`: the pruned model with SpAtten's attention arithmetic (EmulateProgressiveQuantization);
  it runs in onnxruntime, and its last output counts the rows that needed the key LSBs.
- `program.json` / `program.csv`: the lowered program (pcc's format; the RTL testbench's columns).
- `report.json`, `report.md` and PNG plots: cycles, DRAM bytes and energy of the program against the dense
  program on the same machine, per layer and component, and the measured re-quantization fraction.

The functional model runs on the calibration data (or, without any, on random inputs of `batch` x
`length`) before anything is written: the re-quantization fraction the simulator is fed is measured there,
per layer, and the sequence length of the simulated workload is the length those inputs had. With labels,
the report adds the dense and functional models' top-1 accuracy.

The folder is built next to its destination and renamed into place, so a failed run leaves nothing behind
and a successful one replaces an earlier folder of the same name whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pcc.backends.onnx.runtime import random_inputs, run_pruned_tokens, session
from pcc.backends.onnx.writer import write_checked
from pcc.backends.spatten.emulation import REQUANT_OUTPUT, EmulateProgressiveQuantization
from pcc.backends.spatten.hardware import EIGHTH, FULL, SpAttenConfig
from pcc.backends.spatten.lowering import attention_shape, attention_work_removed, lower_to_program
from pcc.backends.spatten.pipeline import AttentionSparsitySplit
from pcc.backends.spatten.report import PLOTS, SpAttenReport, write_report_files
from pcc.backends.spatten.schedule import dense_program
from pcc.backends.spatten.simulator import simulate
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import PipelineResult

__all__ = ["CONFIGS", "Measurement", "SpAttenTarget", "measure"]

CONFIGS: dict[str, SpAttenConfig] = {"full": FULL, "eighth": EIGHTH}


@dataclass(frozen=True)
class Measurement:
    """What running the functional model (and the dense one) on some inputs showed."""

    requant_fractions: list[float]  # per attention layer
    requant_fraction: float  # over every row of every layer
    seq_len: int  # tokens per sentence at the first layer, rows-weighted over batches
    samples: int
    accuracy_dense: float | None = None
    accuracy_functional: float | None = None
    top1_agreement: float | None = None  # where the first output is [batch, classes] in both models


def measure(functional: bytes | str | os.PathLike[str], dense: bytes | str | os.PathLike[str],
            batches: Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]]) -> Measurement:
    """Run the emulated model (with its `spatten_requant` output) on `batches` of (inputs, labels or None),
    samples along axis 0; where its first output is [batch, classes] like the dense model's, run that too and
    compare top-1 classes."""
    emulated, reference = session(functional), session(dense)
    names = [o.name for o in emulated.get_outputs()]
    if REQUANT_OUTPUT not in names:
        raise ValueError(f"the functional model has no {REQUANT_OUTPUT} output: run EmulateProgressiveQuantization on it")
    counts, first_rows, first_keys, samples = None, 0, 0, 0
    agree, correct_dense, correct_functional, labelled = 0, 0, 0, 0
    comparable = None  # decided on the first batch
    for feeds, labels in batches:
        outputs = run_pruned_tokens(emulated, feeds)
        batch_counts = outputs[names.index(REQUANT_OUTPUT)].astype(np.int64)
        counts = batch_counts if counts is None else counts + batch_counts
        first_rows += int(batch_counts[0, 1])
        first_keys += int(batch_counts[0, 1]) * int(batch_counts[0, 2])
        samples += len(next(iter(feeds.values())))
        if comparable is False:
            continue
        logits, dense_logits = outputs[0], reference.run(None, feeds)[0]
        comparable = logits.ndim == 2 and logits.shape == dense_logits.shape
        if comparable:
            predicted, expected = logits.argmax(1), dense_logits.argmax(1)
            agree += int((predicted == expected).sum())
            if labels is not None:
                labelled += len(labels)
                correct_functional += int((predicted == labels).sum())
                correct_dense += int((expected == labels).sum())
    if counts is None:
        raise InvalidRequestError("--target spatten needs at least one input batch to measure the functional model on")
    return Measurement(
        requant_fractions=(counts[:, 0] / np.maximum(counts[:, 1], 1)).tolist(),
        requant_fraction=float(counts[:, 0].sum() / max(counts[:, 1].sum(), 1)),
        seq_len=round(first_keys / max(first_rows, 1)),
        samples=samples,
        accuracy_dense=correct_dense / labelled if comparable and labelled else None,
        accuracy_functional=correct_functional / labelled if comparable and labelled else None,
        top1_agreement=agree / samples if comparable else None,
    )


@dataclass
class SpAttenTarget:
    """Lowers a cascade-pruned transformer to a SpAtten program, simulates it against the dense program and
    writes the functional model, the program and the report into a folder."""

    name = "spatten"
    preferred_round_to = 1  # no channel widths to align: SpAtten prunes tokens and heads at run time
    repeats: int = 20  # accepted like every target's; a simulation needs no repetitions
    progress: bool = False
    seed: int = 0
    batch: int = 1  # random inputs (no calibration data): batch size
    length: int = 128  # random inputs: the size of symbolic axes past the first, the sentence length
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # random inputs: these inputs' sizes
    config: str = "full"  # "full" (SpAtten) or "eighth" (SpAtten 1/8)
    msb_bits: int = 8  # key bits fetched first
    lsb_bits: int = 4  # key bits fetched when a row's largest probability is below tau
    tau: float = 0.1  # <= 0: progressive quantization off (keys at msb_bits only)
    calibration: CalibrationData | None = None  # inputs to measure on (labels: accuracy); None: random inputs

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise InvalidRequestError(f"unknown SpAtten config {self.config!r}; choose from {', '.join(CONFIGS)}")
        if self.tau > 0 and self.lsb_bits < 1:
            raise InvalidRequestError("progressive quantization (tau > 0) fetches at least one LSB bit: lsb_bits >= 1")
        EmulateProgressiveQuantization(self.msb_bits, self.lsb_bits, self.tau)  # checks the widths before any pruning

    def default_output(self, model_path: Path) -> Path:
        return Path.cwd() / f"{model_path.stem}.spatten"

    def check(self, model: ir.Model) -> None:
        """Nothing to check up front: `spatten_pipeline`'s FindAttentionBlocks rejects a model without
        attention before any pruning, with a one-line error naming --target spatten."""

    def emit(
        self,
        result: PipelineResult,
        dense_model: bytes | str | os.PathLike[str],
        output: Path,
        *,
        model_name: str,
        allocator: str,
        importance: str,
    ) -> SpAttenReport:
        """`allocator` and `importance` are accepted like every target's; cascade pruning uses neither."""
        _, heads, head_dim = attention_shape(result)
        if output.exists() and not output.is_dir():
            raise InvalidRequestError(f"--target spatten writes a folder, but {output} is a file")
        functional = ir.serde.deserialize_model(ir.serde.serialize_model(result.model))
        EmulateProgressiveQuantization(self.msb_bits, self.lsb_bits, self.tau)(functional)
        dense = dense_model if isinstance(dense_model, bytes) else str(dense_model)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would become the output folder's
        try:
            measured: list[Measurement] = []
            write_checked(functional, staging / "model.onnx",
                          verify=lambda staged: measured.append(measure(staged, dense, self._batches(staged))))
            found = measured[0]
            program = lower_to_program(result, found.seq_len, msb_bits=self.msb_bits, lsb_bits=self.lsb_bits,
                                       tau=self.tau, requant_fractions=found.requant_fractions, name=Path(model_name).stem)
            (staging / "program.json").write_text(program.to_json())
            (staging / "program.csv").write_text(program.to_csv())
            config = CONFIGS[self.config]
            pruned_run, dense_run = simulate(program, config), simulate(dense_program(program), config)
            split = result.get(AttentionSparsitySplit)
            report = SpAttenReport(
                model=model_name,
                output=str(output),
                config=config.name,
                sparsity_target=split.sparsity if split is not None else attention_work_removed(program),
                sparsity_split=split.summary() if split is not None else "explicit token and head schedules",
                attention_work_removed=attention_work_removed(program),
                token_keep=program.metadata["token_keep"],
                head_kept=program.metadata["head_kept"],
                heads=heads,
                head_dim=head_dim,
                seq_len=found.seq_len,
                msb_bits=self.msb_bits,
                lsb_bits=self.lsb_bits,
                tau=self.tau,
                samples=found.samples,
                requant_fraction=found.requant_fraction,
                requant_fraction_per_layer=found.requant_fractions,
                cycles_dense=dense_run.cycles,
                cycles_pruned=pruned_run.cycles,
                dram_bytes_dense=dense_run.dram_bytes,
                dram_bytes_pruned=pruned_run.dram_bytes,
                energy_dense_j=dense_run.energy_j,
                energy_pruned_j=pruned_run.energy_j,
                dense=dense_run,
                pruned=pruned_run,
                calibration=self._source(),
                accuracy_dense=found.accuracy_dense,
                accuracy_functional=found.accuracy_functional,
                top1_agreement=found.top1_agreement,
                files=["model.onnx", "program.json", "program.csv", "report.md", "report.json", *PLOTS],
                pass_seconds={t.name: t.seconds for t in result.timings},
            )
            write_report_files(report, staging)
            _replace_folder(staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return report

    def _batches(self, model: Path) -> Iterable[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        if self.calibration is not None:
            return self.calibration.batches(progress="spatten emulation" if self.progress else None)
        feeds = random_inputs(session(model), self.seed, symbolic=self.batch, length=self.length, shapes=self.input_shapes)
        return [(feeds, None)]

    def _source(self) -> str:
        if self.calibration is None:
            given = "".join(f", {name}={'x'.join(map(str, dims))}" for name, dims in self.input_shapes.items())
            return f"random inputs, batch {self.batch}, length {self.length}{given}"
        return f"{self.calibration.source} ({self.calibration.num_samples} samples)"


def _replace_folder(staged: Path, output: Path) -> None:
    """Rename `staged` to `output`; an existing `output` folder is moved aside first and removed after."""
    if not output.exists():
        os.replace(staged, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
    os.replace(output, old / output.name)
    os.replace(staged, output)
    shutil.rmtree(old, ignore_errors=True)

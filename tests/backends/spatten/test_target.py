"""The spatten target: the folder it writes, the report's numbers (pruned below dense, re-quantization
measured on the functional model), accuracy with labels, replacing a folder, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pcc.backends.onnx.runtime import random_inputs, session
from pcc.backends.spatten import REQUANT_OUTPUT, Program, SpAttenTarget, spatten_pipeline
from pcc.backends.spatten.lowering import NO_ATTENTION
from pcc.compiler import from_torch
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import analysis_pipeline

FILES = {"model.onnx", "program.json", "program.csv", "report.md", "report.json", "kept_per_layer.png", "cycles.png",
         "dram.png"}
REQUIRED = ("cycles_dense", "cycles_pruned", "dram_bytes_dense", "dram_bytes_pruned", "energy_dense_j", "energy_pruned_j")


def _emit(target: SpAttenTarget, exported, output, sparsity=0.5):
    result = spatten_pipeline(sparsity).run(exported.model())
    return target.emit(result, exported.bytes, output, model_name="encoder.onnx", allocator="uniform", importance="l2")


def test_writes_the_folder_with_simulated_and_measured_numbers(encoder, tmp_path):
    output = tmp_path / "encoder.spatten"
    report = _emit(SpAttenTarget(batch=2, length=32), encoder, output)
    assert {p.name for p in tmp_path.iterdir()} == {"encoder.spatten"}  # no staging folder left behind
    assert {p.name for p in output.iterdir()} == FILES
    data = json.loads((output / "report.json").read_text())
    assert all(data[key] > 0 for key in REQUIRED)
    assert data["cycles_pruned"] < data["cycles_dense"] and data["dram_bytes_pruned"] < data["dram_bytes_dense"]
    assert data["energy_pruned_j"] < data["energy_dense_j"] and data["speedup"] == pytest.approx(report.speedup)
    assert data["seq_len"] == 32 and data["samples"] == 2 and data["sparsity_target"] == 0.5
    # the fraction fed to the simulator is the one model.onnx measures on the same inputs
    functional = session(output / "model.onnx")
    counts = dict(zip([o.name for o in functional.get_outputs()],
                      functional.run(None, random_inputs(functional, 0, symbolic=2, length=32))))[REQUANT_OUTPUT]
    assert data["requant_fraction_per_layer"] == pytest.approx((counts[:, 0] / counts[:, 1]).tolist())
    program = Program.from_json((output / "program.json").read_text())
    assert {r.layer_id: r.requant_fraction for r in program.requests} == dict(enumerate(data["requant_fraction_per_layer"]))
    assert [sum(r.layer_id == layer for r in program.requests) for layer in range(4)] == data["head_kept"]
    assert (output / "program.csv").read_text() == program.to_csv()
    assert "cycles" in report.format() and "![](cycles.png)" in (output / "report.md").read_text()


class _Classifier(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(x)[:, 0])


def test_calibration_labels_give_accuracy_and_a_second_run_replaces_the_folder(encoder, tmp_path):
    torch.manual_seed(0)
    module = _Classifier(encoder.module).eval()
    model = from_torch(module, (torch.randn(2, 7, 32),), dynamic_batch=True, dynamic_sequence=True)
    x = np.random.default_rng(1).standard_normal((12, 24, 32), dtype=np.float32)
    with torch.no_grad():
        labels = module(torch.from_numpy(x)).argmax(1).numpy()
    calibration = CalibrationData.from_arrays(model, {"x": x}, labels, batch_size=5)
    exported = type(encoder)(module, model)
    output = tmp_path / "classifier.spatten"
    (output / "stale").mkdir(parents=True)
    report = _emit(SpAttenTarget(calibration=calibration, config="eighth"), exported, output)
    assert report.accuracy_dense == 1.0 and report.samples == 12 and report.seq_len == 24
    assert 0 <= report.accuracy_functional <= 1 and report.top1_agreement == report.accuracy_functional
    assert report.config == "SpAtten 1/8" and not (output / "stale").exists()
    full = _emit(SpAttenTarget(calibration=calibration), exported, output)
    assert full.cycles_pruned < report.cycles_pruned and full.dram_bytes_pruned == report.dram_bytes_pruned
    assert json.loads((output / "report.json").read_text())["config"] == "SpAtten"


def test_errors_are_one_line_and_leave_nothing(zoo_cache, encoder, tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown SpAtten config"):
        SpAttenTarget(config="half")
    with pytest.raises(InvalidRequestError, match="lsb_bits >= 1"):
        SpAttenTarget(lsb_bits=0)
    with pytest.raises(InvalidRequestError, match="widths of 2 to 24"):
        SpAttenTarget(msb_bits=1)
    no_attention = analysis_pipeline().run(zoo_cache.model("mlp"))
    dense = ir.serde.serialize_model(zoo_cache.model("mlp")).SerializeToString()
    with pytest.raises(InvalidRequestError) as error:
        SpAttenTarget().emit(no_attention, dense, tmp_path / "mlp.spatten", model_name="mlp", allocator="", importance="")
    assert str(error.value) == NO_ATTENTION
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidRequestError, match="writes a folder"):
        _emit(SpAttenTarget(), encoder, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

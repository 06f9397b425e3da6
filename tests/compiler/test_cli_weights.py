"""Commands and flags that rewrite weights rather than remove units: `--factorize lowrank`, `pcc soup`,
`pcc delta`. Runs on the committed Fashion-MNIST CNN."""

from __future__ import annotations

import numpy as np
import onnx

from tests.compiler.test_cli import pcc
from tests.conftest import ROOT, run_onnx

CNN = ROOT / "examples" / "models" / "fashion_cnn.onnx"
IMAGES = {"image": np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)}


def test_factorize_meets_the_params_budget_and_runs(tmp_path):
    out = tmp_path / "lowrank.onnx"
    done = pcc("compile", CNN, "--sparsity", "0.5", "--factorize", "lowrank", "--allocator", "energy", "-o", out, "--repeats", "2")
    assert done.returncode == 0, done.stderr
    budget = next(line for line in done.stdout.splitlines() if line.strip().startswith("budget"))
    removed = float(budget.split("-")[1].split("%")[0])
    assert 45.0 <= removed <= 55.0, budget
    assert "factorize  ranks (energy, params)" in done.stdout
    onnx.checker.check_model(str(out), full_check=True)
    dense, low = onnx.load(str(CNN)), onnx.load(str(out))
    assert sum(n.op_type == "Conv" for n in low.graph.node) > sum(n.op_type == "Conv" for n in dense.graph.node)
    assert run_onnx(out, IMAGES)[0].shape == run_onnx(CNN, IMAGES)[0].shape


def test_factorize_refuses_an_allocator_that_does_not_choose_ranks(tmp_path):
    done = pcc("compile", CNN, "--sparsity", "0.5", "--factorize", "lowrank", "--allocator", "lamp", "-o", tmp_path / "x.onnx")
    assert done.returncode == 2 and done.stderr.startswith("pcc: error:") and "does not choose ranks" in done.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_soup_of_a_model_with_itself_is_the_model(tmp_path):
    out = tmp_path / "soup.onnx"
    done = pcc("soup", CNN, CNN, "-o", out)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(run_onnx(out, IMAGES)[0], run_onnx(CNN, IMAGES)[0], rtol=1e-6, atol=1e-6)


def test_delta_at_drop_zero_is_the_finetuned_model_and_a_pruned_one_is_refused(tmp_path):
    tuned = tmp_path / "tuned.onnx"
    model = onnx.load(str(CNN))
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array * np.float32(1.01), tensor.name))
    onnx.save(model, str(tuned))
    out = tmp_path / "dare.onnx"
    done = pcc("delta", CNN, tuned, "--drop", "0", "-o", out)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(run_onnx(out, IMAGES)[0], run_onnx(tuned, IMAGES)[0], rtol=1e-5, atol=1e-5)
    pruned = tmp_path / "pruned.onnx"
    assert pcc("compile", CNN, "--sparsity", "0.5", "-o", pruned, "--repeats", "2").returncode == 0
    done = pcc("delta", CNN, pruned, "--drop", "0.5", "-o", tmp_path / "bad.onnx")
    assert done.returncode == 2 and "do not share a graph" in done.stderr and not (tmp_path / "bad.onnx").exists()

"""Calibration data: .npz, image folders, any iterable, random fallback; bad files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from pcc.compiler.calibration import CalibrationData, load_calibration
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.cli import main


def _input(model):
    spec = model.graph.inputs[0]
    return spec.name, [d if isinstance(d, int) else 1 for d in spec.shape]


def test_npz_round_trip_with_labels_and_batches(zoo_cache, tmp_path):
    model = zoo_cache.model("vgg")
    name, shape = _input(model)
    images = np.random.default_rng(0).standard_normal((10, *shape[1:])).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, **{name: images, "labels": np.arange(10)})
    data = load_calibration(model, path, batch_size=4)
    assert data.num_samples == 10 and not data.synthetic
    batches = list(data.batches())
    expected = [4, 4, 2] if data.model_batch is None else [data.model_batch] * 10  # a fixed batch axis wins
    assert [len(b[0][name]) for b in batches] == expected
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(10))


def test_iterable_of_dicts(zoo_cache):
    model = zoo_cache.model("vgg")
    name, shape = _input(model)
    samples = ({name: np.zeros((3, *shape[1:]), np.float32)} for _ in range(3))
    data = CalibrationData.from_iterable(model, samples, batch_size=5)
    assert data.num_samples == 9
    assert data.digest() != CalibrationData.random(model, samples=9).digest()


def test_random_fallback_is_marked_synthetic(zoo_cache):
    data = load_calibration(zoo_cache.model("vgg"), None)
    assert data.synthetic and data.num_samples > 0


def test_image_folder_is_resized_and_normalised(zoo_cache, tmp_path):
    image = pytest.importorskip("PIL.Image")
    model = zoo_cache.model("vgg")
    name, shape = _input(model)
    for i in range(3):
        image.fromarray(np.full((50, 70, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = load_calibration(model, tmp_path)
    assert data.inputs[name].shape == (3, *shape[1:])
    assert data.inputs[name][0].mean() < data.inputs[name][2].mean()


def _bad_files(model, tmp_path):
    name, shape = _input(model)
    good = np.zeros((4, *shape[1:]), np.float32)
    cases = {
        "wrong_name.npz": {"pixels": good},
        "wrong_shape.npz": {name: np.zeros((4, shape[1], 5, 5), np.float32)},
        "wrong_rank.npz": {name: good[0]},
        "wrong_dtype.npz": {name: good.astype(np.int32)},
        "bad_labels.npz": {name: good, "labels": np.zeros(3, np.int64)},
    }
    for file, arrays in cases.items():
        np.savez(tmp_path / file, **arrays)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "calib.txt").write_text("1 2 3")
    return [*cases, "garbage.npz", "calib.txt", "missing.npz"]


def test_bad_calibration_files_are_one_line_errors(zoo_cache, tmp_path):
    model = zoo_cache.model("vgg")
    for file in _bad_files(model, tmp_path):
        with pytest.raises(InvalidRequestError):
            load_calibration(model, tmp_path / file)


def test_cli_bad_calibration_exits_2_with_one_line_and_no_output(zoo_cache, tmp_path, capsys):
    model_path = zoo_cache.path("vgg")
    for file in _bad_files(zoo_cache.model("vgg"), tmp_path):
        output = tmp_path / "out.onnx"
        code = main(["compile", str(model_path), "--sparsity", "0.5", "--importance", "taylor",
                     "--calib", str(tmp_path / file), "-o", str(output), "--repeats", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("pcc: error:"), (file, err)
        assert not output.exists()

"""Soups and DARE deltas on a small exported CNN: exact averages that keep the shared mask, refusals that name
the first differing tensor, DARE's drop rate and its expectation (the mean of many drops is the delta),
the fine-tuned head kept as it is, merged deltas summed, and the `pcc soup`/`pcc delta` commands."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from pcc.backends.onnx.runtime import session
from pcc.compiler import cli_merge
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import from_torch
from pcc.passes.transforms.model_arithmetic import AverageWeights, DeltaReport, DropAndRescaleDelta, SoupReport, float_initializers
from pcc.passes.transforms.sparsify_weights import SparsifyWeights

EXAMPLE = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def _net(width: int = 8) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(width, 12, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 4),
    )


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


@pytest.fixture(scope="module")
def exports() -> dict[str, bytes]:
    """The CNN (with its Linear head), its body alone (the 'base' without a head), a narrower CNN, and the
    CNN with half of every weight zeroed (the pruned model soups start from)."""
    net = _net()
    full = from_torch(net, (EXAMPLE,), dynamic_batch=True)
    pruned = ir.serde.deserialize_model(onnx.load_from_string(_bytes(full)))
    SparsifyWeights("unstructured", 0.5)(pruned)
    return {
        "full": _bytes(full), "pruned": _bytes(pruned),
        "body": _bytes(from_torch(net[:6], (EXAMPLE,), dynamic_batch=True)),
        "narrow": _bytes(from_torch(_net(6), (EXAMPLE,), dynamic_batch=True)),
    }


def _load(exports: dict[str, bytes], name: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(exports[name]))


def _tuned(exports: dict[str, bytes], name: str, seed: int, scale: float = 0.05) -> ir.Model:
    """`name` with every float initializer moved by seeded noise where it is non-zero (a stand-in for a fine-tune
    that keeps the zeros)."""
    model = _load(exports, name)
    rng = np.random.default_rng(seed)
    for key, array in float_initializers(model).items():
        moved = np.where(array != 0, array + scale * rng.standard_normal(array.shape), 0).astype(array.dtype)
        model.graph.initializers[key].const_value = ir.tensor(moved, name=key)
    return model


def _run(model: ir.Model) -> np.ndarray:
    return session(_bytes(model)).run(None, {model.graph.inputs[0].name: EXAMPLE.numpy()})[0]


def test_soup_is_the_exact_average_and_keeps_the_mask(exports):
    ingredients = [_tuned(exports, "pruned", seed) for seed in range(3)]
    arrays = [float_initializers(m) for m in ingredients]
    soup = ingredients[0]
    AverageWeights(ingredients[1:])(soup)
    averaged = float_initializers(soup)
    for name, value in averaged.items():
        np.testing.assert_allclose(value, np.mean([a[name] for a in arrays], axis=0), rtol=0, atol=1e-7)
        np.testing.assert_array_equal(value == 0, arrays[1][name] == 0)
    report = soup.meta[SoupReport.META_KEY]
    assert (report.ingredients, report.tensors) == (3, 6)
    assert report.weight_zeros == pytest.approx(0.5, abs=0.01)
    # the soup runs in onnxruntime as the torch CNN with the averaged weights
    net = _net()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in averaged.items()})
    np.testing.assert_allclose(_run(soup), net(EXAMPLE).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_soup_refuses_a_different_mask_naming_the_tensor(exports):
    first, second = _tuned(exports, "pruned", 0), _tuned(exports, "pruned", 1)
    weight = second.graph.initializers["2.weight"]
    array = weight.const_value.numpy().copy()
    array.flat[np.flatnonzero(array)[:3]] = 0
    weight.const_value = ir.tensor(array, name="2.weight")
    with pytest.raises(InvalidRequestError, match=r"'2.weight' has a different zero pattern in B.onnx than in A.onnx \(3 entries\)"):
        AverageWeights([second], labels=["A.onnx", "B.onnx"])(first)


def test_soup_refuses_models_that_do_not_share_a_graph(exports):
    with pytest.raises(InvalidRequestError, match=r"'0.weight' is FLOAT\[8, 1, 3, 3\] in model 1 but FLOAT\[6, 1, 3, 3\] in model 2"):
        AverageWeights([_load(exports, "narrow")])(_load(exports, "full"))
    with pytest.raises(InvalidRequestError, match="'6.weight' is missing from model 2"):
        AverageWeights([_load(exports, "body")])(_load(exports, "full"))


def test_dare_drops_at_the_rate_and_keeps_the_delta_in_expectation(exports):
    base = _load(exports, "body")
    base_arrays = float_initializers(base)
    tuned = float_initializers(_tuned(exports, "full", 7))
    delta = {name: tuned[name].astype(np.float64) - base_arrays[name] for name in base_arrays}

    exact = _tuned(exports, "full", 7)
    DropAndRescaleDelta(base, drop=0.0)(exact)
    for name, value in float_initializers(exact).items():
        np.testing.assert_allclose(value, tuned[name], rtol=0, atol=1e-6)

    draws = 300
    total = {name: np.zeros_like(d) for name, d in delta.items()}
    kept = changed = 0
    for seed in range(draws):
        model = _tuned(exports, "full", 7)
        DropAndRescaleDelta(base, drop=0.9, seed=seed)(model)
        report: DeltaReport = model.meta[DeltaReport.META_KEY]
        kept, changed = kept + report.kept, changed + report.changed
        result = float_initializers(model)
        for name in delta:
            moved = result[name] - base_arrays[name]
            survivors = moved != 0
            # a survivor is its delta scaled by 1/(1 - p) = 10; the head is the fine-tuned model's own
            np.testing.assert_allclose(moved[survivors], 10 * delta[name][survivors], rtol=1e-4, atol=1e-5)
            total[name] += moved
        np.testing.assert_array_equal(result["6.weight"], tuned["6.weight"])
        assert report.own == ["6.weight", "6.bias"] and report.tensors == 4
    assert kept / changed == pytest.approx(0.1, abs=0.01)
    # each entry's mean over draws has standard deviation |delta| * sqrt(p / (1 - p) / draws) = 0.17 |delta|
    flat_delta = np.concatenate([d.ravel() for d in delta.values()])
    flat_mean = np.concatenate([(total[n] / draws).ravel() for n in delta])
    relative = np.linalg.norm(flat_mean - flat_delta) / np.linalg.norm(flat_delta)
    assert relative < 0.25
    assert abs(flat_mean.sum() / flat_delta.sum() - 1) < 0.1


def test_merged_deltas_are_summed(exports):
    base = _load(exports, "full")
    first, second = _tuned(exports, "full", 1), _tuned(exports, "full", 2)
    a, b, start = float_initializers(first), float_initializers(second), float_initializers(base)
    DropAndRescaleDelta(base, drop=0.0, others=[second])(first)
    for name, value in float_initializers(first).items():
        np.testing.assert_allclose(value, a[name] + b[name] - start[name], rtol=0, atol=1e-6)
    assert first.meta[DeltaReport.META_KEY].models == 2
    with pytest.raises(InvalidRequestError, match="'6.weight' is missing from fine-tuned model 2"):
        DropAndRescaleDelta(base, drop=0.5, others=[_load(exports, "body")])(_tuned(exports, "full", 1))


def _command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_merge.add_commands(parser.add_subparsers(dest="command"))
    return cli_merge.run(parser.parse_args(argv))


def test_soup_and_delta_commands(exports, tmp_path, capsys):
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"tuned{seed}.onnx")
        paths[-1].write_bytes(_bytes(_tuned(exports, "pruned", seed)))
    labels = np.asarray([int(i) for i in _run(_load(exports, "full")).argmax(1)])
    np.savez(tmp_path / "eval.npz", **{_load(exports, "full").graph.inputs[0].name: EXAMPLE.numpy(), "labels": labels})
    assert _command(["soup", *map(str, paths), "-o", str(tmp_path / "soup.onnx"), "--eval", str(tmp_path / "eval.npz")]) == 0
    printed = capsys.readouterr().out
    assert "soup of 2 models: 6 tensors" in printed and printed.count("% top-1") == 3
    soup = float_initializers(ir.load(str(tmp_path / "soup.onnx")))
    ingredients = [float_initializers(ir.load(str(p))) for p in paths]
    np.testing.assert_allclose(soup["2.weight"], (ingredients[0]["2.weight"] + ingredients[1]["2.weight"]) / 2, atol=1e-7)

    (tmp_path / "base.onnx").write_bytes(exports["body"])
    assert _command(["delta", str(tmp_path / "base.onnx"), str(paths[0]), "--drop", "0.5", "-o", str(tmp_path / "dare.onnx")]) == 0
    assert "drop 0.5" in capsys.readouterr().out and (tmp_path / "dare.onnx").exists()
    with pytest.raises(InvalidRequestError, match="never overwrites its input"):
        _command(["delta", str(tmp_path / "base.onnx"), str(paths[0]), "--drop", "0.5", "-o", str(paths[0])])
    with pytest.raises(InvalidRequestError, match=r"--drop is a probability in \[0, 1\)"):
        _command(["delta", str(tmp_path / "base.onnx"), str(paths[0]), "--drop", "1"])

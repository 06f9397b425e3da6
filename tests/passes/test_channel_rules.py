"""The channel rule table, op by op, on small hand-built graphs.

Each case builds a graph around one op, prunes it at 0.5 and checks that the result passes the full
checker and equals the dense graph with the removed channels' consumer weights zeroed; or, where the
op must block pruning, that the channels through it stay.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from pcc.compiler.frontend import from_proto
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.allocation import Allocation, AllocateUniform
from pcc.passes.analysis import BuildDependencyGroups, DependencyGroups, ScoreImportance
from pcc.passes.analysis.channel_rules import reshape_factors
from pcc.passes.transforms import MaskChannels, PruneChannels
from tests.conftest import max_relative_difference, run_onnx

RNG = np.random.default_rng(0)


def weight(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def model(nodes, inputs: dict[str, list[int]], outputs: list[str] | dict[str, list[int]], weights: dict[str, np.ndarray], opset: int = 18, custom=()):
    """A model around `nodes`; output shapes come from onnx shape inference (the checker needs them)."""
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [],
        [onnx.numpy_helper.from_array(np.asarray(v), name=k) for k, v in weights.items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(domain, 1) for domain in custom]
    proto = helper.make_model(graph, opset_imports=opsets)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    for name in outputs:
        shape = outputs[name] if isinstance(outputs, dict) else None
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) if shape else inferred[name])
    return proto


def conv(x: str, w: str, y: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], **attrs)


def analyse(proto: onnx.ModelProto, sparsity: float = 0.5) -> ir.Model:
    m = from_proto(proto)
    Pipeline([*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), AllocateUniform(sparsity)]).run(m)
    return m


def prune_matches_mask(proto: onnx.ModelProto, sparsity: float = 0.5) -> DependencyGroups:
    """Prune one copy, mask another with the same allocation, and compare them on random inputs."""
    pruned = analyse(proto, sparsity)
    groups, allocation = pruned.meta[DependencyGroups.META_KEY], pruned.meta[Allocation.META_KEY]
    assert allocation.removed.any(), "nothing was pruned"
    masked = from_proto(proto)
    Pipeline(preparation_passes()).run(masked)
    masked.meta[DependencyGroups.META_KEY], masked.meta[Allocation.META_KEY] = groups, allocation
    Pipeline([MaskChannels()]).run(masked)
    Pipeline([PruneChannels()]).run(pruned)
    onnx.checker.check_model(ir.serde.serialize_model(pruned), full_check=True)
    feeds = {i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in proto.graph.input}
    got, want = run_onnx(pruned, feeds), run_onnx(masked, feeds)
    assert max_relative_difference(got, want) <= 1e-5
    assert max_relative_difference(got, run_onnx(proto, feeds)) > 1e-4
    return groups


def group_sizes(proto: onnx.ModelProto) -> list[int]:
    m = from_proto(proto)
    Pipeline([*preparation_passes(), BuildDependencyGroups()]).run(m)
    return sorted(g.num_units for g in m.meta[DependencyGroups.META_KEY].groups if g.prunable)


# ---------------------------------------------------------------------------------------------


def test_slice_on_channels_rewrites_bounds():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("Slice", ["a", "s", "e", "ax"], ["b"]), conv("b", "w2", "y")],
        {"x": [1, 3, 6, 6]}, ["y"],
        {"w1": weight(16, 3, 1, 1), "w2": weight(4, 8, 1, 1), "s": np.array([4]), "e": np.array([12]), "ax": np.array([1])},
    )
    prune_matches_mask(proto)


def test_gather_with_constant_indices_is_a_permutation():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("Gather", ["a", "idx"], ["b"], axis=1), conv("b", "w2", "y")],
        {"x": [1, 3, 5, 5]}, ["y"],
        {"w1": weight(8, 3, 3, 3), "w2": weight(4, 8, 1, 1), "idx": np.array([7, 2, 5, 0, 1, 6, 3, 4])},
    )
    prune_matches_mask(proto)


def test_split_with_num_outputs_gets_explicit_sizes():
    proto = model(
        [
            conv("x", "w1", "a"),
            helper.make_node("Split", ["a"], ["p", "q"], axis=1, num_outputs=2),
            conv("p", "wp", "yp"),
            conv("q", "wq", "yq"),
            helper.make_node("Add", ["yp", "yq"], ["y"]),
        ],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(16, 3, 1, 1), "wp": weight(4, 8, 1, 1), "wq": weight(4, 8, 1, 1)},
    )
    prune_matches_mask(proto)


def test_concat_offsets_keep_branches_apart():
    proto = model(
        [conv("x", "wa", "a"), conv("x", "wb", "b"), helper.make_node("Concat", ["a", "b"], ["c"], axis=1), conv("c", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"wa": weight(6, 3, 1, 1), "wb": weight(10, 3, 1, 1), "w2": weight(2, 16, 1, 1)},
    )
    assert group_sizes(proto) == [6, 10]
    prune_matches_mask(proto)


def test_grouped_conv_prunes_whole_groups_and_rewrites_group():
    proto = model(
        [conv("x", "w1", "a"), conv("a", "wg", "b", group=4), conv("b", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(16, 3, 1, 1), "wg": weight(16, 4, 3, 3), "w2": weight(2, 16, 1, 1)},
    )
    groups = prune_matches_mask(proto)
    assert [(g.num_units, g.channels_per_unit) for g in groups.groups] == [(4, 4)]


def test_depthwise_conv_with_channel_multiplier():
    proto = model(
        [conv("x", "w1", "a"), conv("a", "wd", "b", group=8), conv("b", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(8, 3, 1, 1), "wd": weight(16, 1, 3, 3), "w2": weight(2, 16, 1, 1)},
    )
    groups = prune_matches_mask(proto)
    assert groups.groups[0].num_units == 8


def test_grouped_conv_transpose():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("ConvTranspose", ["a", "wt"], ["b"], group=2, strides=[2, 2], kernel_shape=[2, 2]), conv("b", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(8, 3, 1, 1), "wt": weight(8, 3, 2, 2), "w2": weight(2, 6, 1, 1)},
    )
    prune_matches_mask(proto)


def test_group_normalization_prunes_whole_groups():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("GroupNormalization", ["a", "g", "b"], ["n"], num_groups=4), conv("n", "w2", "y")],
        {"x": [1, 3, 4, 4]}, {"y": [1, 2, 4, 4]},
        {"w1": weight(16, 3, 1, 1), "g": weight(16) + 2, "b": weight(16), "w2": weight(2, 16, 1, 1)},
        opset=21,
    )
    groups = prune_matches_mask(proto)
    assert groups.groups[0].channels_per_unit == 4


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_maps_channel_blocks(mode):
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("DepthToSpace", ["a"], ["b"], blocksize=2, mode=mode), conv("b", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(32, 3, 1, 1), "w2": weight(2, 8, 1, 1)},
    )
    groups = prune_matches_mask(proto)
    assert groups.groups[0].num_units == 8


def test_space_to_depth():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("SpaceToDepth", ["a"], ["b"], blocksize=2), conv("b", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(8, 3, 1, 1), "w2": weight(2, 32, 1, 1)},
    )
    prune_matches_mask(proto)


def test_matmul_mlp_with_bias_and_gemm_without_transpose():
    proto = model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["z"]),
            helper.make_node("Reshape", ["z", "flat"], ["z2"]),
            helper.make_node("Gemm", ["z2", "w3"], ["y"]),
        ],
        {"x": [2, 5, 8]}, ["y"],
        {"w1": weight(8, 32), "b1": weight(32), "w2": weight(32, 16), "flat": np.array([10, 16]), "w3": weight(16, 4)},
    )
    assert group_sizes(proto) == [16, 32]
    prune_matches_mask(proto)


def test_flatten_into_linear_prunes_channel_blocks():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("Flatten", ["a"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)],
        {"x": [1, 3, 3, 3]}, ["y"],
        {"w1": weight(6, 3, 3, 3), "w2": weight(4, 6 * 1 * 1)},
    )
    prune_matches_mask(proto)
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("Flatten", ["a"], ["f"]), helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)],
        {"x": [1, 3, 4, 4]}, ["y"],
        {"w1": weight(6, 3, 1, 1), "w2": weight(4, 6 * 16)},
    )
    prune_matches_mask(proto)


def test_expand_resize_and_gating_broadcasts():
    proto = model(
        [
            conv("x", "w1", "a"),
            helper.make_node("GlobalAveragePool", ["a"], ["g"]),
            helper.make_node("Sigmoid", ["g"], ["s"]),
            helper.make_node("Expand", ["s", "shape"], ["e"]),
            helper.make_node("Mul", ["a", "e"], ["m"]),
            helper.make_node("Resize", ["m", "", "", "sizes"], ["r"], mode="nearest"),
            helper.make_node("PRelu", ["r", "slope"], ["p"]),
            conv("p", "w2", "y"),
        ],
        {"x": [1, 3, 4, 4]}, ["y"],
        {
            "w1": weight(8, 3, 1, 1), "shape": np.array([1, 8, 4, 4]), "sizes": np.array([1, 8, 8, 8]),
            "slope": weight(8, 1, 1), "w2": weight(2, 8, 1, 1),
        },
    )
    prune_matches_mask(proto)


def test_spatial_pad_reduce_squeeze_unsqueeze_transpose():
    proto = model(
        [
            conv("x", "w1", "a"),
            helper.make_node("Pad", ["a", "pads"], ["p"]),
            helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
            helper.make_node("Squeeze", ["m", "sq"], ["s"]),
            helper.make_node("Unsqueeze", ["s", "uq"], ["u"]),
            helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["t", "w2"], ["y"]),
        ],
        {"x": [1, 3, 4, 4]}, ["y"],
        {
            "w1": weight(8, 3, 1, 1), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "axes": np.array([2, 3]),
            "sq": np.array([2, 3]), "uq": np.array([2]), "w2": weight(8, 5),
        },
    )
    prune_matches_mask(proto)


@pytest.mark.parametrize(
    "blocker, extra",
    [
        (helper.make_node("Softmax", ["a"], ["b"], axis=1), {}),
        (helper.make_node("LRN", ["a"], ["b"], size=3), {}),
        (helper.make_node("Pad", ["a", "pads"], ["b"]), {"pads": np.array([0, 1, 0, 0, 0, 1, 0, 0])}),
        (helper.make_node("ReduceSum", ["a", "axes"], ["b"], keepdims=1), {"axes": np.array([1])}),
        (helper.make_node("Einsum", ["a"], ["b"], equation="nchw->nchw"), {}),
    ],
    ids=["softmax-over-channels", "lrn", "channel-pad", "reduce-over-channels", "no-rule"],
)
def test_ops_that_mix_or_hide_channels_freeze_them(blocker, extra):
    nodes = [conv("x", "w1", "a"), blocker, conv("b", "w2", "y")]
    inputs = {"x": [1, 3, 4, 4]}
    weights = {"w1": weight(8, 3, 1, 1), **extra}
    out_channels = 10 if "pads" in extra else (1 if "axes" in extra else 8)
    weights["w2"] = weight(2, out_channels, 1, 1)
    proto = model(nodes, inputs, ["y"], weights)
    assert group_sizes(proto) == []


def test_maxpool_indices_in_use_freeze_channels():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("MaxPool", ["a"], ["p", "i"], kernel_shape=[2, 2]),
         helper.make_node("Cast", ["i"], ["ic"], to=TensorProto.FLOAT), conv("p", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y", "ic"],
        {"w1": weight(8, 3, 1, 1), "w2": weight(2, 8, 1, 1)},
    )
    assert group_sizes(proto) == []


def test_model_outputs_are_never_pruned():
    proto = model(
        [conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "w2", "y")],
        {"x": [1, 3, 4, 4]}, ["y", "a"],
        {"w1": weight(8, 3, 1, 1), "w2": weight(2, 8, 1, 1)},
    )
    assert group_sizes(proto) == []


def test_value_of_unknown_rank_makes_its_readers_barriers():
    """A layer fed by a tensor whose rank nothing infers cannot be mapped: it is a listed barrier, not a refusal."""
    proto = model(
        [helper.make_node("Mystery", ["x"], ["m"], domain="com.example"), conv("m", "w1", "y")],
        {"x": [1, 3, 4, 4]}, {"y": [1, 8, 4, 4]}, {"w1": weight(8, 3, 1, 1)}, custom=["com.example"],
    )
    result = Pipeline([*preparation_passes(), BuildDependencyGroups()]).run(from_proto(proto))
    groups = result.get(DependencyGroups)
    assert [b.op for b in groups.barriers] == ["com.example::Mystery", "Conv"] and groups.groups == []


def test_reshape_factors():
    assert reshape_factors((1, 8, 2, 2), (1, 32)) == [([0], [0]), ([1, 2, 3], [1])]
    assert reshape_factors((2, 5, 12), (2, 5, 3, 4)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert reshape_factors((None, 6), (None, 2, 3)) == [([0], [0]), ([1], [1, 2])]
    assert reshape_factors((4, 6), (5, 5)) is None
    assert reshape_factors((None, 6), (3, None)) is None
    # merging symbolic batch and token dims in front of the channels (attention's [L, N, H, d] -> [L*N, E])
    assert reshape_factors((None, None, 4, 8), (None, 32)) == [([0, 1], [0]), ([2, 3], [1])]
    assert reshape_factors((None, None, 4, 8), (None, 31)) is None

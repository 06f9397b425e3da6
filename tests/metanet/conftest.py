"""Shared helpers of the metanetwork tests: a model's channel graph, and torch kept to one thread.

The metanetwork and the networks it rewrites here are tiny: their tensors gain nothing from intra-op threads,
and on a busy 2-core runner torch's spinning worker threads make every small op two orders of magnitude slower.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest
import torch

from pcc.compiler.pipeline import analysis_pipeline
from pcc.metanet.graph import ChannelGraph, build_channel_graph
from pcc.passes.analysis import DependencyGroups


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def analyse(model: ir.Model) -> tuple[ir.Model, DependencyGroups, ChannelGraph]:
    """`model` after the analysis pipeline (in place), its dependency groups and its channel graph."""
    result = analysis_pipeline().run(model)
    groups = result.get(DependencyGroups)
    return result.model, groups, build_channel_graph(result.model, groups)

"""Using a metanetwork: the shipped weights, and the pass that rewrites a model's weights with it.

`load_metanetwork()` loads the metanetwork shipped in the package (`weights/metanet_fashion.pt`, meta-trained
by examples/metanet_fashion.py), so nobody meta-trains to use it. `MetanetTransform` runs it on the
model's channel graph (after `BuildDependencyGroups`) and writes the new weights into the initializers,
leaving the graph as it is: the transformed network computes (nearly) the same function with group norms
that are sparse, so the ordinary group-L2 ranking and any allocator then cut less that matters.
`--allocator metanet` runs it and lets the transformed norms set every group's keep ratio (`AllocateMetanet`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from pcc.compiler.errors import InvalidRequestError
from pcc.metanet.graph import build_channel_graph
from pcc.metanet.model import Metanetwork, MetanetworkConfig
from pcc.passes.allocation.global_ranking import AllocateGlobal
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.results import fetch, invalidate, store

__all__ = ["SHIPPED_WEIGHTS", "AllocateMetanet", "MetanetReport", "MetanetTransform", "load_metanetwork", "save_metanetwork"]

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "metanet_fashion.pt"


def save_metanetwork(metanet: Metanetwork, path: Path, **provenance) -> None:
    """Config, weights and where they came from (data models, steps, alpha...), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".tmp")
    torch.save({"config": metanet.config.to_dict(), "state_dict": metanet.state_dict(), "provenance": provenance}, staged)
    staged.replace(path)


def load_metanetwork(path: Path | None = None) -> Metanetwork:
    """The metanetwork saved at `path` (default: the shipped one), in eval mode."""
    path = path or SHIPPED_WEIGHTS
    if not path.exists():
        raise InvalidRequestError(f"no metanetwork weights at {path}; meta-train one with examples/metanet_fashion.py")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    metanet = Metanetwork(MetanetworkConfig(**saved["config"]))
    metanet.load_state_dict(saved["state_dict"])
    return metanet.eval()


@dataclass
class MetanetReport:
    """What the transform changed: how far the weights moved and how much the group norms shrank."""

    META_KEY = "pcc.metanet"
    PRODUCED_BY = "MetanetTransform"

    parameters: int  # tensors rewritten
    untouched: list[str]
    relative_change: float  # ||new - old|| / ||old|| over the rewritten tensors
    group_norm_ratio: float  # sum of prunable units' group norms, after / before

    def summary(self) -> str:
        return (f"metanet: {self.parameters} weight tensors rewritten ({100 * self.relative_change:.1f}% change), "
                f"prunable group norms x{self.group_norm_ratio:.2f}")


@dataclass
class MetanetTransform(ir.passes.InPlacePass):
    """Transform: rewrite the model's weights with a metanetwork (default: the shipped one)."""

    weights: Path | None = None
    report: MetanetReport | None = field(default=None, init=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        graph = build_channel_graph(model, groups)
        metanet = load_metanetwork(self.weights)
        with torch.no_grad():
            values = metanet(graph.data)
        before, after = graph.to_weights(graph.data.weight_values), graph.to_weights(values)
        for name, tensor in after.items():
            value = model.graph.initializers[name]
            value.const_value = ir.tensor(tensor.numpy().astype(value.const_value.numpy().dtype), name=name)
        change = sum(float(((after[n] - before[n]) ** 2).sum()) for n in after)
        scale = sum(float((before[n] ** 2).sum()) for n in after)
        prunable = graph.prunable_node_ids(groups)
        norms_before = graph.node_norms(graph.data.weight_values)[prunable].sum()
        norms_after = graph.node_norms(values)[prunable].sum()
        self.report = MetanetReport(
            parameters=len(after), untouched=graph.untouched, relative_change=float(np.sqrt(change / max(scale, 1e-30))),
            group_norm_ratio=float(norms_after / norms_before) if norms_before > 0 else 1.0,
        )
        invalidate(model, Importance)  # scores of the old weights
        store(model, self.report)
        return ir.passes.PassResult(model, modified=bool(after))


@dataclass
class AllocateMetanet(AllocateGlobal):
    """`--allocator metanet`: one global ranking of the units after `MetanetTransform`.

    The metanetwork was trained to drive the group norms of what can go towards zero, so a group whose
    transformed norms are spread (a few strong units, many near zero) loses many units and one whose norms
    stay even loses few: the transformed norms, normalised by their group's mean as in `AllocateGlobal`,
    set the per-group keep ratios directly. Refuses to run on weights the metanetwork has not seen.
    """

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        fetch(model, MetanetReport)

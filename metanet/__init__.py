"""The graph metanetwork that makes networks easier to prune (Meta Pruning via Graph Metanetworks, Liu et al.).

`graph` turns any model pcc can group into a graph of channels (nodes) and weights (edges) and back,
exactly; `model` is the GNN that maps such a graph to new weights (the identity when untrained); `train`
meta-trains it on a set of trained data models; `transform` loads the shipped metanetwork and applies it
as a pass (`MetanetTransform`), with `AllocateMetanet` behind `--allocator metanet`.

    from pcc.metanet import MetanetTransform
    Pipeline([*preparation_passes(), BuildDependencyGroups(), MetanetTransform()]).run(model)
"""

from pcc.metanet.graph import ChannelGraph, build_channel_graph
from pcc.metanet.model import Metanetwork, MetanetworkConfig
from pcc.metanet.train import DataModel, MetaTrainLog, group_norm_sparsity, meta_train, prepare
from pcc.metanet.transform import (
    SHIPPED_WEIGHTS, AllocateMetanet, MetanetReport, MetanetTransform, load_metanetwork, save_metanetwork,
)

__all__ = [
    "SHIPPED_WEIGHTS", "AllocateMetanet", "ChannelGraph", "DataModel", "MetaTrainLog", "MetanetReport",
    "MetanetTransform", "Metanetwork", "MetanetworkConfig", "build_channel_graph", "group_norm_sparsity",
    "load_metanetwork", "meta_train", "prepare", "save_metanetwork",
]

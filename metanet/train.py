"""Meta-training: teach the metanetwork to turn trained networks into ones that are easy to prune.

Over a set of trained "data models", each step takes one model's channel graph, runs the metanetwork to
get new weights, runs the network with them (its `IRModule`, so any graph pcc can import) on a batch of
that model's task data, and minimises

    task loss (cross-entropy) + alpha x group sparsity

where group sparsity is DepGraph's sparse-learning loss in relative form: the sum over prunable channel
nodes of their group norm (`ChannelGraph.node_norms`), each weighted up the weaker it is within its group,
divided by the plain sum for the input weights, so models of any size and scale weigh alike. A plain group
lasso only shrank every unit alike here (group-norm sparsity barely moved in 300 steps, accuracy fell);
the importance-dependent weights let the weak units go first. Gradients flow through the network's forward into the metanetwork. The
network's BatchNorm runs in inference mode: the transformed network must work with the statistics it has.

`group_norm_sparsity` measures the outcome: per prunable dependency group, the Hoyer sparsity of its units'
group norms (0 when all are equal, 1 when one unit holds all the norm), averaged over groups.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcc.compiler.pipeline import analysis_pipeline
from pcc.compiler.torch_module import IRModule
from pcc.metanet.graph import ChannelGraph, build_channel_graph
from pcc.metanet.model import Metanetwork
from pcc.passes.analysis.dependency_groups import DependencyGroups

__all__ = ["DataModel", "MetaTrainLog", "group_norm_sparsity", "meta_train", "prepare"]

Batch = tuple[dict[str, np.ndarray], np.ndarray]  # (feeds, labels)
STRENGTH = 4.0  # DepGraph's importance-dependent penalty: the weakest unit of a group weighs 2^4 the strongest
PRUNE_RATIOS = (0.2, 0.6)  # the prune-aware loss's pruned copy loses a fraction drawn from this range per step


@dataclass
class DataModel:
    """A trained network ready for meta-training: its IR, dependency groups, channel graph and torch copy."""

    name: str
    model: ir.Model
    groups: DependencyGroups
    graph: ChannelGraph
    module: IRModule
    prunable_nodes: torch.Tensor = field(init=False)  # channel nodes that are prunable units
    group_of_node: torch.Tensor = field(init=False)  # for each of those, its dependency group (dense index)
    input_norm_sum: torch.Tensor = field(init=False)  # their group norms summed, for the input weights
    group_members: list[torch.Tensor] = field(init=False)  # per group, its positions in `prunable_nodes`

    def __post_init__(self) -> None:
        self.prunable_nodes = torch.from_numpy(self.graph.prunable_node_ids(self.groups))
        if not len(self.prunable_nodes):
            raise ValueError(f"data model {self.name} has no prunable channels: nothing for meta-training to sparsify")
        owner = self.groups.unit_group()[self.graph.unit_of_node[self.prunable_nodes.numpy()]]
        self.group_of_node = torch.from_numpy(np.unique(owner, return_inverse=True)[1].reshape(-1))
        self.input_norm_sum = self.graph.node_norms(self.graph.data.weight_values)[self.prunable_nodes].sum()
        self.group_members = [torch.nonzero(self.group_of_node == g).flatten() for g in range(int(self.group_of_node.max()) + 1)]
        self.module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def group_lasso(self, values: torch.Tensor, strength: float = STRENGTH) -> torch.Tensor:
        """DepGraph's sparsity loss in relative form: sum over prunable units of w_u x group norm_u, over the
        same sum of the input weights' norms (unweighted). w_u = 2^(strength x (1 - r_u)), r_u the unit's
        norm placed in [0, 1] between its group's smallest and largest (detached): weak units are pushed
        harder, so the group norms spread instead of all shrinking alike."""
        norms = self.graph.node_norms(values)[self.prunable_nodes]
        count = int(self.group_of_node.max()) + 1
        current = norms.detach()
        low = torch.full((count,), float("inf"), dtype=norms.dtype).scatter_reduce(0, self.group_of_node, current, "amin")
        high = torch.zeros(count, dtype=norms.dtype).scatter_reduce(0, self.group_of_node, current, "amax")
        rank = (current - low[self.group_of_node]) / (high - low).clamp_min(1e-12)[self.group_of_node]
        weight = 2.0 ** (strength * (1 - rank))
        return (weight * norms).sum() / self.input_norm_sum

    def without_weakest(self, values: torch.Tensor, ratio: float) -> torch.Tensor:
        """`values` with every edge leaving the `ratio` weakest units of each prunable group (by group norm,
        detached) zeroed: no later layer reads those channels, which is what group-L2 pruning with a uniform
        allocator would do to the network. Differentiable in the values that stay."""
        norms = self.graph.node_norms(values)[self.prunable_nodes].detach()
        drop = torch.zeros(len(norms), dtype=torch.bool)
        for members in self.group_members:
            drop[members[norms[members].argsort()[: int(ratio * len(members))]]] = True
        reads_dropped = torch.isin(self.graph.data.edge_index[0], self.prunable_nodes[drop])
        return values * (~reads_dropped).unsqueeze(1)

    def logits(self, values: torch.Tensor, feeds: dict[str, np.ndarray]) -> torch.Tensor:
        return self.module(feeds, weights=self.graph.to_weights(values))[0]


def prepare(model: ir.Model, name: str = "") -> DataModel:
    """Analyse `model` (a copy: the caller's stays as it is) and build what meta-training needs."""
    result = analysis_pipeline().run(ir.serde.deserialize_model(ir.serde.serialize_model(model)))
    groups = result.get(DependencyGroups)
    return DataModel(name or model.graph.name or "model", result.model, groups, build_channel_graph(result.model, groups),
                     IRModule(result.model))


@dataclass
class MetaTrainLog:
    steps: int
    alpha: float
    seconds: float
    task_loss: list[float]  # per step
    sparsity_loss: list[float]  # per step, the weighted relative group lasso
    pruned_task_loss: list[float] = field(default_factory=list)  # per step, with `prune_aware`

    def window(self, losses: Sequence[float], last: bool) -> float:
        """Mean over the first or last tenth of the steps."""
        count = max(1, len(losses) // 10)
        return float(np.mean(losses[-count:] if last else losses[:count]))

    def summary(self) -> str:
        task, sparse, pruned = self.task_loss, self.sparsity_loss, self.pruned_task_loss
        text = (f"meta-training: {self.steps} steps, alpha {self.alpha:g}, task loss {self.window(task, False):.4f} -> "
                f"{self.window(task, True):.4f}, sparsity loss {self.window(sparse, False):.3f} -> "
                f"{self.window(sparse, True):.3f}")
        if pruned:
            text += f", pruned-copy task loss {self.window(pruned, False):.4f} -> {self.window(pruned, True):.4f}"
        return text + f" ({self.seconds:.0f} s)"


def meta_train(
    metanet: Metanetwork,
    data_models: Sequence[DataModel],
    batches: Callable[[DataModel, np.random.Generator], Batch],
    *,
    steps: int = 500,
    alpha: float = 1.0,
    lr: float = 1e-3,
    distill: bool = False,
    prune_aware: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> MetaTrainLog:
    """Train `metanet` in place for `steps` steps, each on one data model (round robin in a shuffled order)
    and one batch from `batches(data_model, rng)`. Adam with a cosine-decayed learning rate. `distill`: the
    task loss is the KL divergence from the input network's own outputs instead of cross-entropy on the
    labels, which asks the transform to keep the function rather than merely the task. `prune_aware` > 0
    adds that weight times the task loss of a pruned copy (`DataModel.without_weakest`, a fraction drawn
    from `PRUNE_RATIOS`): the sparsity loss only makes the weak units weak, this asks the strong ones to
    carry the task without them, the state the network is pruned and fine-tuned from."""
    if not data_models:
        raise ValueError("meta-training needs at least one data model")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(metanet.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    task_losses, sparsity_losses, pruned_task_losses = [], [], []
    start = time.perf_counter()
    order = []
    metanet.train()
    for _ in tqdm(range(steps), desc="meta-training", disable=not progress, unit="step"):
        if not order:
            order = list(rng.permutation(len(data_models)))
        data_model = data_models[order.pop()]
        feeds, labels = batches(data_model, rng)
        values = metanet(data_model.graph.data)
        reference = None
        if distill:
            with torch.no_grad():
                reference = F.log_softmax(data_model.logits(data_model.graph.data.weight_values, feeds), 1)
        task = _task_loss(data_model.logits(values, feeds), labels, reference)
        sparsity = data_model.group_lasso(values)
        loss = task + alpha * sparsity
        if prune_aware:
            pruned_values = data_model.without_weakest(values, rng.uniform(*PRUNE_RATIOS))
            pruned = _task_loss(data_model.logits(pruned_values, feeds), labels, reference)
            loss = loss + prune_aware * pruned
            pruned_task_losses.append(pruned.item())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(metanet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        task_losses.append(task.item())
        sparsity_losses.append(sparsity.item())
    metanet.eval()
    return MetaTrainLog(steps, alpha, time.perf_counter() - start, task_losses, sparsity_losses, pruned_task_losses)


def _task_loss(logits: torch.Tensor, labels: np.ndarray, reference: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy on the labels, or the KL divergence from `reference` (the input network's log-probabilities)."""
    if reference is not None:
        return F.kl_div(F.log_softmax(logits, 1), reference, log_target=True, reduction="batchmean")
    return F.cross_entropy(logits, torch.from_numpy(labels))


def group_norm_sparsity(graph: ChannelGraph, groups: DependencyGroups, values: torch.Tensor) -> float:
    """Mean over prunable groups of the Hoyer sparsity of its units' group norms (see the module docstring)."""
    norms = graph.node_norms(values).detach().numpy()
    node_of_unit = np.full(groups.num_units, -1, np.int64)
    present = graph.unit_of_node >= 0
    node_of_unit[graph.unit_of_node[present]] = np.flatnonzero(present)
    measures = []
    for group in groups.groups:
        nodes = node_of_unit[group.units]
        if not group.prunable or group.num_units < 2 or (nodes < 0).any():
            continue
        unit_norms = norms[nodes]
        l1, l2, n = unit_norms.sum(), np.sqrt((unit_norms**2).sum()), group.num_units
        measures.append((np.sqrt(n) - l1 / l2) / (np.sqrt(n) - 1) if l2 > 0 else 0.0)
    return float(np.mean(measures)) if measures else 0.0

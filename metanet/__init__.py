"""The GNN metanetwork that makes networks easier to prune (Meta Pruning via Graph Metanetworks).

Not built yet: it stands on the allocators and the differentiable copy of the IR (see the issues).
"""

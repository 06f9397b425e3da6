"""Transform passes: they rewrite the model."""

from pcc.passes.transforms.channel_shuffle import ChannelShuffleToGather
from pcc.passes.transforms.fold_constants import FoldConstants
from pcc.passes.transforms.mask_channels import MaskChannels
from pcc.passes.transforms.prune_channels import PruneChannels, PruneReport

__all__ = ["ChannelShuffleToGather", "FoldConstants", "MaskChannels", "PruneChannels", "PruneReport"]

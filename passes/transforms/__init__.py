"""Transform passes: they rewrite the model."""

from pcc.passes.transforms.canonical_attention import CanonicalAttentionLayout
from pcc.passes.transforms.cascade_heads import CascadeHeads, CascadeHeadsReport
from pcc.passes.transforms.channel_shuffle import ChannelShuffleToGather
from pcc.passes.transforms.finetune import FineTune, FineTuneReport
from pcc.passes.transforms.fold_constants import FoldConstants
from pcc.passes.transforms.mask_channels import MaskChannels
from pcc.passes.transforms.prune_blocks import BlockPruneReport, PruneBlocks
from pcc.passes.transforms.prune_kv_cache import KVCacheReport, PruneKVCache
from pcc.passes.transforms.prune_channels import PruneChannels, PruneReport
from pcc.passes.transforms.prune_tokens import PruneTokens, TokenPruneReport, token_keep_schedule
from pcc.passes.transforms.recalibrate_batchnorm import RecalibrateBatchNorm
from pcc.passes.transforms.relax_sequence_axis import RelaxSequenceAxis
from pcc.passes.transforms.resolve_symbolic_shapes import ResolveSymbolicShapes
from pcc.passes.transforms.static_reshape_targets import StaticReshapeTargets

__all__ = [
    "BlockPruneReport",
    "CanonicalAttentionLayout",
    "CascadeHeads",
    "CascadeHeadsReport",
    "ChannelShuffleToGather",
    "FineTune",
    "FineTuneReport",
    "FoldConstants",
    "KVCacheReport",
    "MaskChannels",
    "PruneBlocks",
    "PruneChannels",
    "PruneKVCache",
    "PruneReport",
    "PruneTokens",
    "RecalibrateBatchNorm",
    "RelaxSequenceAxis",
    "ResolveSymbolicShapes",
    "StaticReshapeTargets",
    "TokenPruneReport",
    "token_keep_schedule",
]

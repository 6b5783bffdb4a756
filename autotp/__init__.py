"""autotp: automatic tensor parallelism for PyTorch models.

    sharded = autotp.shard(model, world_size=4, example_inputs=(ids,))
    print(autotp.plan(model, world_size=4, example_inputs=(ids,)).summary())
"""
from . import checkpoint  # noqa: F401  (autotp.checkpoint.save / load)
from .api import ShardConfig, ShardedModule, plan, shard
from .capture import CaptureError, capture
from .loss import vocab_parallel_cross_entropy
from .placements import Partial, Replicate, Shard
from .plan import Plan

__all__ = ["shard", "plan", "Plan", "ShardConfig", "ShardedModule", "capture", "CaptureError",
           "Replicate", "Shard", "Partial", "vocab_parallel_cross_entropy"]
__version__ = "0.1.0"

"""autotp: automatic tensor parallelism for PyTorch models.

    sharded = autotp.shard(model, world_size=4, example_inputs=(ids,))
    print(autotp.plan(model, world_size=4, example_inputs=(ids,)).summary())
    lm = autotp.shard_for_generation(hf_causal_lm, world_size=4); lm.generate(...)
"""
from . import checkpoint  # noqa: F401  (autotp.checkpoint.save / load)
from .api import ShardConfig, ShardedModule, plan, shard
from .capture import CaptureError, capture
from .generation import plan_generation, shard_for_generation
from .pretrained import from_pretrained
from .interactive import Parallelized, parallelize
from .launch import WorkerError
from .loss import vocab_parallel_cross_entropy
from .placements import Partial, Replicate, Shard
from .plan import Plan

__all__ = ["shard", "plan", "Plan", "ShardConfig", "ShardedModule", "capture", "CaptureError",
           "Replicate", "Shard", "Partial", "vocab_parallel_cross_entropy",
           "shard_for_generation", "plan_generation", "from_pretrained", "parallelize", "Parallelized", "WorkerError"]
__version__ = "0.1.0"

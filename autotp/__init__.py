"""autotp: automatic tensor parallelism for PyTorch models.

    sharded = autotp.shard(model, world_size=4, example_inputs=(ids,))
    print(autotp.plan(model, world_size=4, example_inputs=(ids,)).summary())
    lm = autotp.shard_for_generation(hf_causal_lm, world_size=4); lm.generate(...)

The stages and their order live in ``autotp.pipeline``.
"""
from . import checkpoint, kernels  # noqa: F401  (autotp.checkpoint.save / load; autotp.kernels.available())
from .api import ShardedModule, plan, shard
from .capture import CaptureError, capture
from .config import ShardConfig
from .generation import plan_generation, shard_for_generation
from .interactive import Parallelized, parallelize
from .launch import WorkerError
from .loss import vocab_parallel_cross_entropy
from .placements import Partial, Replicate, Shard
from .plan import Collective, ParamPlan, Plan
from .pretrained import from_pretrained
from .runtime import CollectiveError
from .version import __version__

__all__ = ["shard", "plan", "Plan", "ParamPlan", "Collective", "ShardConfig", "ShardedModule", "capture",
           "CaptureError", "Replicate", "Shard", "Partial", "vocab_parallel_cross_entropy", "shard_for_generation",
           "plan_generation", "from_pretrained", "parallelize", "Parallelized", "WorkerError", "CollectiveError", "__version__"]

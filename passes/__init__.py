"""autotp's lowering passes, one pattern per file (installed as ``autotp.passes``).

Each pass is a function ``(graph_module, LoweringContext) -> PassResult`` that applies
one part of the ``Plan`` to one rank's graph and changes nothing when its pattern does
not match.  ``autotp.pipeline.LOWERING`` lists them in the order they run.

Why this package sits at the top of the repository, beside ``autotp/``, rather than
inside it: the project was specified with that layout (``passes/`` as a first-class
directory a contributor opens to add a rewrite), and ``setup.py``'s ``package_dir``
installs it as ``autotp.passes`` so nothing generic lands in site-packages.  The seed
finders are part of the analysis (``autotp/analyze.py``), not passes.
"""
from .base import LoweringContext, PassError, PassResult, run_passes
from .checkpoint_blocks import checkpoint_blocks
from .drop_metadata_asserts import drop_metadata_asserts
from .fuse_allreduce_norm import fuse_allreduce_norm
from .fuse_column_backward import fuse_column_backward
from .fuse_kernels import fuse_kernels
from .insert_redistributions import insert_redistributions
from .localize_shapes import localize_shapes
from .lower_dropout import lower_dropout
from .lower_vocab_cross_entropy import lower_vocab_cross_entropy
from .lower_vocab_embedding import lower_vocab_embedding
from .retarget_device import retarget_device
from .scale_partial_means import scale_partial_means
from .shard_parameters import shard_parameters

__all__ = [
    "LoweringContext", "PassError", "PassResult", "run_passes", "drop_metadata_asserts", "insert_redistributions",
    "localize_shapes", "lower_vocab_embedding", "lower_vocab_cross_entropy", "lower_dropout",
    "checkpoint_blocks", "fuse_allreduce_norm", "fuse_column_backward", "fuse_kernels", "shard_parameters", "retarget_device",
    "scale_partial_means",
]

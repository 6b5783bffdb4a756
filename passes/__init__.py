"""Graph passes of autotp, one pattern per file (installed as ``autotp.passes``).

Seed passes find the patterns the analysis starts from; lowering passes turn an
analyzed graph into one rank's graph.  Each is a function from graph to graph
returning ``PassResult(graph_module, modified)`` and changes nothing when its
pattern does not match.
"""
from .base import PassResult, run_passes
from .find_linear_seeds import find_linear_seeds
from .fuse_column_backward import fuse_column_backward
from .find_vocab_embeddings import find_vocab_embeddings
from .checkpoint_blocks import checkpoint_blocks
from .drop_metadata_asserts import drop_metadata_asserts
from .insert_redistributions import insert_redistributions
from .localize_shapes import localize_shapes
from .lower_dropout import lower_dropout
from .lower_row_bias import lower_row_bias
from .lower_vocab_cross_entropy import lower_vocab_cross_entropy
from .lower_vocab_embedding import lower_vocab_embedding
from .shard_parameters import shard_parameters

__all__ = [
    "PassResult", "run_passes", "find_linear_seeds", "find_vocab_embeddings", "drop_metadata_asserts",
    "insert_redistributions", "localize_shapes", "lower_row_bias", "lower_vocab_embedding",
    "lower_vocab_cross_entropy", "lower_dropout", "checkpoint_blocks",
    "fuse_column_backward", "shard_parameters",
]

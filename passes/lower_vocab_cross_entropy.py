"""lower_vocab_cross_entropy: the loss from vocab-sharded logits.

    loss = cross_entropy_loss(logits_S, y, None, red, ignore, eps)
 -> loss = VocabParallelCrossEntropy[V, red, ignore, eps](logits_S, y)   # replicated, 2 all-reduces of [N]

With ``ctx.kernels`` (and the kernels compiled) the module runs the fused ``csrc/`` kernels.
"""
from __future__ import annotations

from torch.fx import GraphModule

from autotp.loss import VocabParallelCrossEntropy

from .base import LoweringContext, PassResult, nodes_with_role, replace_with_module

# aten.cross_entropy_loss(self, target, weight=None, reduction=Mean, ignore_index=-100, label_smoothing=0.0)
_DEFAULTS = {"reduction": 1, "ignore_index": -100, "label_smoothing": 0.0}


def lower_vocab_cross_entropy(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    modified = False
    for i, node in nodes_with_role(gm, ctx.plan, "vocab_ce"):
        logits, target = node.args[:2]
        opts = dict(_DEFAULTS)
        for k, v in zip(("reduction", "ignore_index", "label_smoothing"), node.args[3:]):
            opts[k] = v
        opts.update({k: v for k, v in node.kwargs.items() if k in opts})
        name = f"autotp_vocab_cross_entropy_{i}"
        vocab = int(logits.meta["val"].shape[1])
        fused = ctx.kernel_for("vocab_cross_entropy", node, "ce_stats + ce_grad: one read of the logits, no softmax kept")
        replace_with_module(gm, node, name, VocabParallelCrossEntropy(vocab, opts["reduction"], opts["ignore_index"],
                                                         opts["label_smoothing"] or 0.0, comm=ctx.comm,
                                                         fused=fused),
                            (logits, target))
        modified = True
    return PassResult(gm, modified)

"""Graph patterns: what a parameter use, a linear, an embedding lookup and a graph's outputs look like.

One module answers these questions for the whole compiler -- the rules, the seed
finders, the plan and the lowering passes all ask here, so a new spelling of a
linear (another aten op, another weight layout) is one table entry below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import re

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

aten = torch.ops.aten

__all__ = ["is_tensor_node", "tensor_inputs", "param_of", "get_attr", "LinearSig", "LINEAR_OPS", "LEFT_LINEAR_OPS", "linear_weight",
           "PARAM_ELEMENTWISE", "param_view_keeps_zero",
           "GROUPED_OPS", "op_name", "grouped_weight",
           "linear_bias", "embedding_table", "from_user_input", "output_node", "output_leaves", "block_of", "size_hint", "op_arg"]


def is_tensor_node(x: Any) -> bool:
    return isinstance(x, Node) and isinstance(x.meta.get("val"), torch.Tensor)


def tensor_inputs(node: Node) -> list[Node]:
    """The node's distinct inputs that carry a tensor (or a tuple of them: a split's result)."""
    seen: list[Node] = []
    for x in node.all_input_nodes:
        if x not in seen and (is_tensor_node(x) or isinstance(x.meta.get("val"), (list, tuple))):
            seen.append(x)
    return seen


def size_hint(s) -> int:
    """A size as an int: a dynamic dim (``SymInt``) reads its example value without guarding on
    it, so analysing a dynamically captured graph never specializes its shapes."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else int(s)
    return int(s)


def op_arg(node: Node, name: str, default=None):
    """The argument ``name`` of an aten op call, positional or keyword, found through the op's
    schema (``norm``'s ``dim`` follows its ``ord``; ``clamp``'s bounds may be either)."""
    if name in node.kwargs:
        return node.kwargs[name]
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            return node.args[i] if i < len(node.args) else default
    return default


def get_attr(mod: nn.Module, target: str):
    """The attribute at dotted path ``target`` (what a ``get_attr`` node reads)."""
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


# Matches ops that only reorder a parameter's dims (a weight read as W^T).
_PERMUTING = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)
# Matches ops that insert or remove size-1 dims (``A[None, :, None]``, a conv weight's ``squeeze(1)``).
_UNIT_DIMS = (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
# Matches elementwise ops of one tensor (numbers as the other operands): on a slice of a
# parameter they compute exactly the slice of the result -- Mamba's ``A = -exp(A_log.float())``,
# a bias cast with ``.float()``.  Shape-changing views (expand, view) are not here: their size
# arguments would name the global shape.
PARAM_ELEMENTWISE = {
    aten.to, aten._to_copy, aten.type_as, aten.alias, aten.clone, aten.contiguous, aten.detach, aten.lift_fresh_copy,
    aten.exp, aten.neg, aten.log, aten.log1p, aten.expm1, aten.abs, aten.sqrt, aten.rsqrt, aten.reciprocal,
    aten.sigmoid, aten.tanh, aten.softplus, aten.square, aten.pow, aten.mul, aten.div, aten.add, aten.sub,
    aten.clamp, aten.silu, aten.relu, aten.gelu,
}


def _elementwise_of_one(x: Node) -> Node | None:
    """The one tensor operand of an elementwise op whose other operands are numbers (and dtypes)."""
    if getattr(x.target, "overloadpacket", None) not in PARAM_ELEMENTWISE or not x.args:
        return None
    first = x.args[0]
    if not isinstance(first, Node) or any(isinstance(a, Node) for a in list(x.args[1:]) + list(x.kwargs.values())):
        return None
    return first


def param_of(x: Any, *, computed: bool = True) -> tuple[Node, tuple[int | None, ...]] | None:
    """If ``x`` is a parameter (``get_attr``), possibly through ``t``/``transpose``/``permute``, size-1
    dims inserted or removed, and elementwise ops of it alone (``-exp(A.float())``), return
    ``(get_attr node, perm)`` where ``perm`` maps x's dims to the parameter's dims (``None`` for
    an inserted size-1 dim), and through one contiguous ``slice`` (a part of a fused weight:
    ``param_slice``).  Such a value is computed from a parameter alone, so a rank holding a
    slice of the parameter computes the matching slice of it: it is placed where it is read.
    ``computed=False``: through the dim permutations only (what a linear's weight is read through:
    a cast weight, ``linear(x, W.float())``, is not seeded -- hyper-connection mixers read so are
    tiny, and sharding them would split their streams)."""
    if not isinstance(x, Node):
        return None
    if x.op == "get_attr":
        val = x.meta.get("val")
        nd = val.dim() if isinstance(val, torch.Tensor) else 0
        return x, tuple(range(nd))
    if x.op != "call_function" or not isinstance(x.args[0] if x.args else None, Node):
        return None
    if x.target == aten.slice.Tensor and param_slice(x) is not None:
        return param_of(x.args[0], computed=computed)
    if x.target in _UNIT_DIMS and computed:
        inner = param_of(x.args[0])
        if inner is None:
            return None
        base, perm = inner
        nd = len(perm)
        if x.target == aten.unsqueeze.default:
            u = x.args[1] % (nd + 1)
            return base, perm[:u] + (None,) + perm[u:]
        shape = tuple(x.args[0].meta["val"].shape)
        dims = range(nd) if len(x.args) < 2 else [x.args[1]] if isinstance(x.args[1], int) else x.args[1]
        gone = {d % nd for d in dims if shape[d % nd] == 1}
        return base, tuple(p for d, p in enumerate(perm) if d not in gone)
    if x.target in _PERMUTING:
        inner = param_of(x.args[0], computed=computed)
        if inner is None:
            return None
        base, perm = inner
        nd = len(perm)
        if x.target in (aten.t.default, aten.numpy_T.default):  # W.t(), W.T
            order = list(reversed(range(nd)))
        elif x.target == aten.transpose.int:
            d0, d1 = (d % nd for d in x.args[1:3])
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
        else:
            order = [d % nd for d in x.args[1]]
        return base, tuple(perm[o] for o in order)
    one = _elementwise_of_one(x) if computed else None
    inner = param_of(one) if one is not None else None
    # (shapes read only once the operand is known to be a parameter's: static, never guarded on)
    val, src = x.meta.get("val"), one.meta.get("val") if inner is not None else None
    if inner is None or not isinstance(val, torch.Tensor) or not isinstance(src, torch.Tensor) or val.shape != src.shape:
        return None
    return inner


def param_view_keeps_zero(x: Node) -> bool:
    """Does the parameter view ``x`` map a zero parameter entry to zero (so the zero padding of an
    unevenly sharded parameter stays zero through it)?  Dims moved, casts, ``neg``: yes; ``exp``: no."""
    while x.op == "call_function":
        if x.target not in _UNIT_DIMS and x.target not in _PERMUTING:
            op = x.target.overloadpacket
            if op in (aten.mul, aten.div) and isinstance(x.args[1] if len(x.args) > 1 else None, (int, float)):
                if op == aten.div and x.args[1] == 0:
                    return False
            elif op not in _ZERO_TO_ZERO:
                return False
        x = x.args[0]
    return True


# Matches elementwise ops with f(0) = 0 (of one tensor: casts, copies, sign flips).
_ZERO_TO_ZERO = {aten.to, aten._to_copy, aten.type_as, aten.alias, aten.clone, aten.contiguous, aten.detach,
                 aten.lift_fresh_copy, aten.neg, aten.abs, aten.tanh, aten.square, aten.silu, aten.relu, aten.gelu}


def param_slice(x: Any) -> tuple[Node, int, int, int] | None:
    """``(get_attr node, param dim, start, stop)`` if ``x`` is ``slice(W, d, start, stop)`` of a parameter
    (step 1, bounds within the dim), possibly read through ``t``/``transpose``/``permute`` after it."""
    if not isinstance(x, Node) or x.op != "call_function":
        return None
    if x.target in _PERMUTING:
        return param_slice(x.args[0])
    if x.target != aten.slice.Tensor or not (isinstance(x.args[0], Node) and x.args[0].op == "get_attr"):
        return None
    w = x.args[0]
    val = w.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    d, start, stop, step = (list(x.args[1:]) + [0, None, None, 1][len(x.args) - 1:])[:4]
    if step != 1 or not all(isinstance(v, int) or v is None for v in (d, start, stop)) or d is None:
        return None  # bounds computed at run time (a causal mask's sym sizes) are not a fixed part
    n = val.shape[d % val.dim()]
    start = 0 if start is None else start
    stop = n if stop is None else min(stop, n) if isinstance(n, int) else stop
    if not isinstance(n, int) or not 0 <= start < stop <= n:
        return None
    return w, d % val.dim(), start, stop


@dataclass(frozen=True)
class LinearSig:
    """Where a linear op keeps its operands: argument positions, and which weight dim is the output."""

    x: int
    w: int
    bias: int | None
    w_out_dim: int  # the output-features dim of the weight as the op sees it
    left: bool = False  # ``y = W @ x``: features run along x's and y's second-to-last dim, not the last


# Matches the ops that multiply an activation by a 2-D parameter (possibly through t()).
LINEAR_OPS = {
    aten.linear.default: LinearSig(x=0, w=1, bias=2, w_out_dim=0),   # nn.Linear: W is (out, in)
    aten.addmm.default: LinearSig(x=1, w=2, bias=0, w_out_dim=1),    # HF Conv1D: b + x @ W, W is (in, out)
    aten.mm.default: LinearSig(x=0, w=1, bias=None, w_out_dim=1),
    aten.matmul.default: LinearSig(x=0, w=1, bias=None, w_out_dim=1),
}
# Matches the ops that multiply a 2-D parameter by an activation from the left, ``y = W @ x`` with
# x (.., in, L): Mamba's time-step projection ``dt_proj.weight @ dt.transpose(1, 2)``.
LEFT_LINEAR_OPS = {
    aten.mm.default: LinearSig(x=1, w=0, bias=None, w_out_dim=0, left=True),
    aten.matmul.default: LinearSig(x=1, w=0, bias=None, w_out_dim=0, left=True),
}


def linear_weight(node: Node) -> tuple[LinearSig, Node, int, int] | None:
    """``(sig, weight get_attr, param out dim, param in dim)`` if ``node`` is a linear with a 2-D weight."""
    if node.op != "call_function":
        return None
    for sig in (LINEAR_OPS.get(node.target), LEFT_LINEAR_OPS.get(node.target)):
        if sig is None or len(node.args) <= max(sig.x, sig.w):
            continue
        if sig.left and (param_of(node.args[sig.x]) is not None or not is_tensor_node(node.args[sig.x])
                         or node.args[sig.x].meta["val"].dim() < 2):
            continue
        found = param_of(node.args[sig.w], computed=False)
        if found is None:
            continue
        w, perm = found
        if len(perm) != 2 or None in perm:
            continue
        out_dim = perm[sig.w_out_dim]
        return sig, w, out_dim, 1 - out_dim
    return None


def op_name(node: Node) -> str | None:
    """The qualified name of the op ``node`` calls (``aten::linear``), or ``None``."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema.name if schema is not None else None


# Matches grouped (per-expert) matmuls: the rows of group e times W[e], W as the op sees it
# (groups, in, out); the groups' row offsets come as a third operand.  Mixture-of-experts layers
# written with transformers' experts integration run their 3-D expert weights through these.
GROUPED_OPS = {
    "transformers::grouped_mm_fallback": LinearSig(x=0, w=1, bias=None, w_out_dim=2),
    "aten::_grouped_mm": LinearSig(x=0, w=1, bias=None, w_out_dim=2),
}


def grouped_weight(node: Node) -> tuple[LinearSig, Node, int, int] | None:
    """``(sig, weight get_attr, param out dim, param in dim)`` if ``node`` is a grouped matmul with
    a 3-D parameter weight (possibly through ``transpose``)."""
    sig = GROUPED_OPS.get(op_name(node))
    if sig is None or len(node.args) <= sig.w:
        return None
    found = param_of(node.args[sig.w], computed=False)
    if found is None or len(found[1]) != 3:
        return None
    w, perm = found
    if None in perm:
        return None
    return sig, w, perm[2], perm[1]


def linear_bias(node: Node, sig: LinearSig) -> Node | None:
    if sig.bias is None:
        return None
    b = node.args[sig.bias] if len(node.args) > sig.bias else node.kwargs.get("bias")
    return b if isinstance(b, Node) else None


def embedding_table(node: Node) -> Node | None:
    """The table (a ``get_attr``) if ``node`` is an embedding lookup in a parameter."""
    if node.op != "call_function" or node.target != aten.embedding.default:
        return None
    w = node.args[0]
    return w if isinstance(w, Node) and w.op == "get_attr" else None


# Matches ops through which ids stay "the user's ids".
_ID_PASSTHROUGH = {aten.view.default, aten.reshape.default, aten.to.dtype, aten.to.dtype_layout,
                   aten._to_copy.default, aten.contiguous.default, aten.clone.default, aten.alias.default}


def from_user_input(x: Any) -> bool:
    """Does ``x`` come from a graph input through views and casts only (not computed, e.g. ``arange``)?"""
    while isinstance(x, Node):
        if x.op == "placeholder":
            return True
        if x.op == "call_function" and x.target in _ID_PASSTHROUGH:
            x = x.args[0]
            continue
        return False
    return False


def output_node(gm: GraphModule) -> Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def output_leaves(gm: GraphModule) -> list:
    """The graph's outputs, flattened in order (what ``local_outputs`` positions index)."""
    return pytree.tree_leaves(output_node(gm).args[0])


_LIST_ELEMENT = re.compile(r"\.\d+$")


def block_of(node: Node) -> str | None:
    """The element of a module list (``transformer.h.3``, ``model.layers.3``) whose forward
    produced ``node`` -- a transformer block -- or ``None``."""
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if _LIST_ELEMENT.search(path):
            return path
    return None


def mutated_args(node: Node) -> list[Node]:
    """The graph values ``node`` writes in place (``index_copy_``'s ``self``, ``add_``'s), from its schema."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, Node):
                out.append(v)
    return out


def _view_base(n: Node) -> Node | None:
    """The tensor ``n`` is a view of (its op returns an alias of its first argument), else ``None``."""
    schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
    if schema is None or not schema.returns or schema.returns[0].alias_info is None or not n.args:
        return None
    return n.args[0] if isinstance(n.args[0], Node) else None


def write_visible(x: Node, writer: Node) -> bool:
    """Would a write into ``x`` by ``writer`` be seen by anything but ``writer``'s own result?

    Yes when ``x`` is (a view of) a graph input -- the caller sees the write, as a static KV
    cache's update -- or when ``x``, the tensor it is a view of, or another view of that tensor
    is read after ``writer``.  A redistribution of such an ``x`` would make the write land in a
    copy: a wrong answer."""
    root = x
    while (base := _view_base(root)) is not None:
        root = base
    if root.op == "placeholder":
        return True
    order = {n: i for i, n in enumerate(writer.graph.nodes)}
    aliases, todo = {root}, [root]
    while todo:  # every view of the written tensor
        for u in todo.pop().users:
            if u is not writer and u not in aliases and _view_base(u) in aliases:
                aliases.add(u)
                todo.append(u)
    return any(order[u] > order[writer] for n in aliases for u in n.users if u is not writer and u not in aliases)

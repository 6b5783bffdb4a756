"""Stitching: a model's graph traced with its blocks opaque, each ``block_call`` replaced by the
nodes of its block's own export -- the second half of ``autotp.regions``.

    glue:     ... -> block_call[j](h, mask) -> getitem 0 -> ...
    block:    placeholder x0, x1 -> get_attr block.q.weight -> linear -> ... -> output
    stitched: ... -> get_attr layers.j.q.weight -> linear -> ... -> ...

Every node is renamed in graph order from its base name (``linear``, ``linear_1``, ...) and every
parameter, buffer and tensor constant is read in the order ``torch.export`` lifts them, so the
result is the graph a whole trace makes, names included.
"""
from __future__ import annotations

import operator
import re

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

__all__ = ["RegionsUnsupported", "stitched", "assign", "is_persistent", "has_tensor"]


class RegionsUnsupported(Exception):
    """Regional capture does not apply here; the caller captures the model whole."""


_SUFFIX = re.compile(r"_\d+$")


def _base(node) -> str:
    """The name ``torch.export`` starts from for an op node (``linear_3`` -> ``linear``)."""
    return _SUFFIX.sub("", node.name) if node.op in ("call_function", "call_method") else node.name


def _block_nodes(call, block_gm: GraphModule) -> list:
    """``block_gm``'s nodes to copy, each with its module stack below the block: ``(node, [(path, class)])``."""
    out = []
    for n in block_gm.graph.nodes:
        if n.op == "call_module":  # the block's own input guards (the model's graph has the model's)
            if n.users:
                raise RegionsUnsupported(f"{call.fqn}: a submodule call {n.target} is used")
            continue
        if n.op == "get_attr" and not n.target.startswith("block."):
            raise RegionsUnsupported(f"{call.fqn}: reads {n.target}, not one of its own tensors")
        stack = []
        for path, kind in (n.meta.get("nn_module_stack") or {}).values():
            if path in ("", "block"):
                continue
            if not path.startswith("block."):
                raise RegionsUnsupported(f"{call.fqn}: a node of module {path}")
            stack.append((path[len("block."):], kind))
        out.append((n, stack))
    return out


def is_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner)
    return leaf in mod._parameters or leaf not in mod._non_persistent_buffers_set


def has_tensor(root: nn.Module, fqn: str) -> bool:
    owner, _, leaf = fqn.rpartition(".")
    try:
        mod = root.get_submodule(owner)
    except AttributeError:
        return False
    return leaf in mod._parameters or leaf in mod._buffers


def assign(root: nn.Module, fqn: str, value: torch.Tensor, *, kind: str) -> None:
    """``root.<fqn> = value``, making the modules on the way as ``.module()`` does; ``kind``:
    ``"buffer"``, ``"non-persistent buffer"``, ``"constant"`` (a plain attribute) or a parameter otherwise."""
    *path, leaf = fqn.split(".")
    mod = root
    for p in path:
        if p not in mod._modules:
            mod.add_module(p, nn.Module())
        mod = mod._modules[p]
    if isinstance(value, nn.Parameter):
        mod.register_parameter(leaf, value)
    elif kind == "constant":
        setattr(mod, leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=kind == "buffer")


_LIFTED = re.compile(r"^lifted_tensor_\d+$")


def _attr(root: nn.Module, target: str):
    for part in target.split("."):
        root = getattr(root, part)
    return root


def stitched(glue: GraphModule, sites: dict, order: list[str]) -> GraphModule:
    """``glue`` with each node of ``sites`` (a ``block_call`` -> ``(its call record, the block's exported
    graph)``) replaced by the block's nodes, reading that block's own tensors; ``order``: the model's
    parameters and buffers as export lifts them.  Op nodes are renamed in order from their base names
    (``linear``, ``linear_1``, ...) as ``torch.export`` names the nodes of a graph it traces whole."""
    new = torch.fx.Graph()
    new._codegen = glue.graph._codegen
    attrs: dict[str, torch.fx.Node] = {}
    env: dict = {}
    templates: dict[int, list] = {}
    results: dict = {}

    def copy(n, args, kwargs, meta):
        # arguments set after creation: create_node's own walk over them costs more than this whole copy
        node = new.create_node(n.op, n.target, (), {}, name=_base(n), type_expr=n.type)
        node.args, node.kwargs = args, kwargs
        node.meta = meta
        return node

    def mapped(x):
        if isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target is operator.getitem and x.args[0] in results:
            return results[x.args[0]][x.args[1]]
        return env[x]

    # Tensor constants (``lifted_tensor_<k>``: a tensor made inside forward) are numbered by
    # export in the order the trace meets them, the glue's and the blocks' alike: number them so.
    known = set(order)
    constants: dict = {}  # (site or None, node) -> its target in the whole graph
    for n in glue.graph.nodes:
        for x in ([] if n.op == "get_attr" else n.all_input_nodes):
            if x.op == "get_attr" and x.target not in known and (None, x) not in constants:
                constants[(None, x)] = x.target
        if n in sites:
            call, block_gm = sites[n]
            for b in block_gm.graph.nodes:
                if b.op == "get_attr" and f"{call.fqn}.{b.target[len('block.'):]}" not in known:
                    constants[(n, b)] = f"{call.fqn}.{b.target[len('block.'):]}"
    for k, (where, target) in enumerate(constants.items()):
        owner, _, leaf = target.rpartition(".")
        name = f"{owner}.{_LIFTED.sub(f'lifted_tensor_{k}', leaf)}" if owner else _LIFTED.sub(f"lifted_tensor_{k}", leaf)
        site, node = where
        value = _attr(glue if site is None else sites[site][1], node.target)
        if site is not None and _LIFTED.match(leaf):
            value = value.clone()  # made in forward: each block its own, as a whole trace makes them
        assign(glue, name, value, kind="constant")
        constants[where] = name
    for target in order:  # every parameter and buffer first, in the whole model's order (as export lifts them)
        attrs[target] = new.create_node("get_attr", target)  # named as .module() names it
    for where, target in constants.items():
        attrs[where] = new.create_node("get_attr", target)
        attrs[where].meta = dict(where[1].meta)

    for n in glue.graph.nodes:
        if n.op == "get_attr":
            if n.target in known:
                env[n] = attrs[n.target]
                env[n].meta = n.meta
            else:
                env[n] = attrs[(None, n)]
            continue
        if n in sites:
            call, block_gm = sites[n]
            nodes = templates.get(id(block_gm))
            if nodes is None:
                nodes = templates[id(block_gm)] = _block_nodes(call, block_gm)
            outer = n.meta.get("nn_module_stack") or {}
            inputs = [mapped(x) for x in n.args[0]]
            local: dict = {}
            stacks: dict = {}  # this block's nodes in one submodule share their module stack
            placeholders = iter(inputs)
            for b, stack in nodes:
                if b.op == "placeholder":
                    local[b] = next(placeholders, None)
                    if local[b] is None:
                        raise RegionsUnsupported(f"{call.fqn}: more graph inputs than tensors")
                elif b.op == "get_attr":
                    target = f"{call.fqn}.{b.target[len('block.'):]}"
                    local[b] = attrs[target] if target in known else attrs[(n, b)]
                    if not local[b].meta:  # a block's tensor: its value's metadata, as the block's trace saw it
                        local[b].meta = dict(b.meta)
                elif b.op == "output":
                    results[n] = [local[o] for o in pytree.tree_leaves(b.args[0])]
                else:
                    meta = dict(b.meta)
                    if "nn_module_stack" in b.meta:
                        key = tuple(stack)
                        if key not in stacks:
                            stacks[key] = {**outer, **{f"L__self___{call.fqn}.{p}".replace(".", "_"): (f"{call.fqn}.{p}", kind)
                                                       for p, kind in stack}}
                        meta["nn_module_stack"] = stacks[key]
                    local[b] = copy(b, map_arg(b.args, local.__getitem__), map_arg(b.kwargs, local.__getitem__), meta)
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in sites:
            continue  # an output of a block call: its readers read the block's node
        env[n] = copy(n, map_arg(n.args, mapped), map_arg(n.kwargs, mapped), n.meta)
    for node in attrs.values():
        if not node.users:  # (as the caller's clean-up would, before the one recompile)
            new.erase_node(node)
    guards = next((x for x in new.nodes if x.op == "call_module"), None)
    first = next((x for x in new.nodes if x.op == "call_function"), None)
    if guards is not None and first is not None and "nn_module_stack" in guards.meta:
        # export gives its input guards the module stack of the first op it traced
        guards.meta = {**guards.meta, "nn_module_stack": first.meta.get("nn_module_stack")}
    glue.graph = new
    return glue

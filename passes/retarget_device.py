"""retarget_device: run the rank's graph on ``ctx.device``, wherever the model was captured.

    arange = aten.arange.start(0, 8, device=cpu)        ->  aten.arange.start(0, 8, device=cuda:1)
    x = aten._to_copy(t, dtype=f32, device=cpu)         ->  aten._to_copy(t, dtype=f32, device=cuda:1)
    self.rotary.inv_freq   (a cpu buffer)               ->  the same values on cuda:1

A graph captured on CPU (or on ``meta``, weights coming from a loader) holds the capture
device in its constants.  Every argument the op's schema types ``Device`` -- keyword or
positional, which a match on ``device=`` keywords alone would miss -- is set to the run
device, and every tensor the graph reads that is not there yet (buffers, constants) is
moved.  Parameters are already there: ``shard_parameters`` copies each local shard
straight to ``ctx.device``.  Does nothing when ``ctx.device`` is ``None``.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from .base import LoweringContext, PassResult


def _device_positions(target) -> list[tuple[int, str]]:
    """``(position, name)`` of every ``Device``-typed argument of an ATen overload's schema."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return []
    return [(i, a.name) for i, a in enumerate(schema.arguments) if "Device" in str(a.type)]


def retarget_device(gm: GraphModule, ctx: LoweringContext) -> PassResult:
    device = ctx.device
    if device is None:
        return PassResult(gm, False)
    modified = False
    for sub in gm.modules():  # the graph and the subgraphs of its higher-order ops (autocast, no_grad regions)
        if isinstance(sub, GraphModule) and sub is not gm:
            if _retarget_constants(sub, device):
                sub.recompile()
                modified = True
    return PassResult(gm, _retarget_constants(gm, device) or modified)


def _retarget_constants(gm: GraphModule, device: torch.device) -> bool:
    modified = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        changed = False
        for i, name in _device_positions(node.target):
            if i < len(args) and isinstance(args[i], torch.device) and args[i] != device:
                args[i], changed = device, True
            elif isinstance(kwargs.get(name), torch.device) and kwargs[name] != device:
                kwargs[name], changed = device, True
        if changed:
            node.args, node.kwargs = tuple(args), kwargs
            modified = True
    for node in gm.graph.nodes:  # buffers and constants the graph reads; parameters are moved already
        if node.op != "get_attr":
            continue
        *path, leaf = node.target.split(".")
        owner = gm
        for p in path:
            owner = getattr(owner, p)
        t = getattr(owner, leaf)
        if not isinstance(t, torch.Tensor) or t.device == device:
            continue
        moved = t.to(device)
        if isinstance(t, torch.nn.Parameter):
            owner._parameters[leaf] = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = moved
        else:
            setattr(owner, leaf, moved)
        modified = True
    return modified

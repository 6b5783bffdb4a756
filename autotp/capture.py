"""capture: a model and example inputs -> an ATen-level fx graph with parameter names.

``torch.export.export(..., strict=False)`` traces the model in Python (so
Hugging Face models work as they are) into a graph of ATen ops; its
``.module()`` is an fx ``GraphModule`` whose ``get_attr`` nodes carry the
original parameter names and whose calls keep the model's input and output
structure (an HF ``ModelOutput`` stays one).
"""
from __future__ import annotations

import logging
import re
import traceback

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .patterns import get_attr
from .regions import capture_regions

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


def _dynamic_shapes(args: tuple, kwargs: dict):
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(min(x.dim(), 2))}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    return spec(args), spec(kwargs)


def capture(model: nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None, *,
            dynamic: bool = False, regions: bool = True, progress=None) -> GraphModule:
    """Capture ``model`` called as ``model(*example_inputs, **example_kwargs)``.

    Args:
        model: any ``nn.Module``; its parameters may live on the ``meta`` device.
        example_inputs / example_kwargs: one call's inputs. Under torchrun every rank must pass
            the same values (seed before making random ones).
        dynamic: let the first two dims of every tensor input (batch, sequence) vary.
        regions: trace each distinct repeated block once and reuse it for the identical ones
            (``autotp.regions``; static shapes only). Falls back to one whole trace.
        progress: ``progress(blocks, traced)`` is told how many blocks were reused.

    Returns:
        The ATen-level ``GraphModule`` (parameters shared with ``model``, not copied).

    Raises:
        CaptureError naming the failing op / source line and what to try.
    """
    example_kwargs = dict(example_kwargs or {})
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if not example_inputs and not example_kwargs:
        raise CaptureError("autotp needs example_inputs (and/or example_kwargs) to capture the model")
    dyn = _signature_dynamic_shapes(model, *_dynamic_shapes(example_inputs, example_kwargs)) if dynamic else None

    def hint(e: Exception) -> str:
        if "cache" in str(e).lower() or "Cache" in type(e).__name__:
            return "try example_kwargs={'use_cache': False} (Hugging Face caches are not graph inputs)"
        return ("check that the example inputs are the ones the model is called with; pass keyword arguments "
                "through example_kwargs (e.g. {'use_cache': False} for Hugging Face models)")

    if regions and not dynamic:
        try:
            gm = capture_regions(model, example_inputs, example_kwargs, progress=progress,
                                 export=lambda m, a, k, what: _export(m, a, k, dynamic_shapes=None, what=what, hint=hint))
        except Exception as e:  # captured whole below (exact, only slower; a real failure raises there)
            logger.debug("autotp: capturing %s whole: %s: %s", type(model).__name__, type(e).__name__, e)
        else:
            _canonicalize_attributes(gm)
            return gm
    return export_graph(model, example_inputs, example_kwargs, dynamic_shapes=dyn, what=type(model).__name__,
                        hint=hint)


def export_graph(module: nn.Module, args: tuple, kwargs: dict | None = None, *, dynamic_shapes=None, what: str,
                 hint) -> GraphModule:
    """The one place autotp calls ``torch.export``: non-strict export, then one name per tensor.

    A dim the model constrains (GPT-Neo's sequence must lie in [2, max_position_embeddings))
    is retried as ``Dim.AUTO``, which takes the model's own range.  A failure becomes a
    ``CaptureError`` naming ``what``, the innermost user frame and ``hint(error)``.
    """
    gm = _export(module, args, kwargs, dynamic_shapes=dynamic_shapes, what=what, hint=hint)
    _canonicalize_attributes(gm)
    return gm


def _export(module: nn.Module, args: tuple, kwargs: dict | None, *, dynamic_shapes, what: str, hint) -> GraphModule:
    """``torch.export`` (non-strict) and ``.module()``: the graph as traced, every attribute still read."""
    try:
        try:
            ep = torch.export.export(module, args, kwargs=kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        except Exception as e:
            found = re.search(r"Constraints violated \(([^)]*)\)", str(e))
            if found is None or dynamic_shapes is None:
                raise
            names = {n.strip() for n in found.group(1).split(",")}
            relaxed = pytree.tree_map(lambda d: Dim.AUTO if getattr(d, "__name__", None) in names else d,
                                      dynamic_shapes, is_leaf=lambda d: not isinstance(d, (dict, tuple, list)))
            ep = torch.export.export(module, args, kwargs=kwargs, strict=False, dynamic_shapes=relaxed)
    except Exception as e:
        raise CaptureError(
            f"could not capture {what} with torch.export (non-strict): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{_user_frame(e)}\n"
            f"  what to try: {hint(e)}"
        ) from e
    gm = ep.module()
    del ep
    return gm


def _canonicalize_attributes(gm: GraphModule) -> None:
    """Point every ``get_attr`` of one tensor (tied weights) at one name, and drop unused ones.

    Export may read a tied weight under either name (GPT-2 reads ``lm_head.weight`` for both
    the token embedding and the LM head); one name per tensor lets the analysis give a tied
    weight one placement, and dropping unused attributes keeps no full copy of a sharded one.
    """
    canonical: dict[int, torch.fx.Node] = {}
    changed = _drop_dead_values(gm)
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        if not node.users:
            gm.graph.erase_node(node)
            changed = True
            continue
        t = get_attr(gm, node.target)
        if not isinstance(t, torch.Tensor):
            continue
        first = canonical.setdefault(id(t), node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            changed = True
    drop_unused_attributes(gm)
    if changed:  # (its code is the graph's already otherwise: recompiling 80 layers costs a tenth of a second)
        gm.recompile()


def _drop_dead_values(gm: GraphModule) -> bool:
    """Erase pure ops whose tensor result no one reads (Mamba's ``A = -exp(A_log)`` computed for a
    training-only kernel): a dead read of a parameter would ask for it whole.  Ops that write, assert
    or call modules (export's input guards) stay."""
    changed = False
    for node in reversed(list(gm.graph.nodes)):
        if (node.op == "call_function" and not node.users and isinstance(node.meta.get("val"), torch.Tensor)
                and isinstance(node.target, torch._ops.OpOverload) and not node.is_impure()
                and not node.target._schema.name.startswith("aten::_assert")):
            gm.graph.erase_node(node)
            changed = True
    return changed


def drop_unused_attributes(gm: GraphModule) -> None:
    """Delete parameters and buffers no ``get_attr`` node reads (so nothing unused stays resident)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used:
            continue
        *path, leaf = name.split(".")
        owner = gm
        for p in path:
            owner = getattr(owner, p)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)


def _signature_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    out = {}
    for name, spec in zip(params, args):
        out[name] = spec
    out.update(kwargs)
    return out


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch, as ' (at file:line: code)'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}: {f.line})"

"""Capture repeated blocks once: trace the model with every block opaque, prove which blocks
compute the same thing, export one block per distinct computation, and inline it everywhere.

An 80-layer model costs ``torch.export`` 80 traces of the same layer.  Regional capture
replaces them with one trace per distinct block, as regional compilation does for
``torch.compile``::

    export(model, blocks opaque):   embed -> block_call[0](h, mask, cos, sin) -> ... -> block_call[79] -> norm -> head
    per block call, on ``meta``:    the block's ATen ops as run (op, constants, dataflow) -> a structural key
    per distinct key:               export(block) once
    inline:                         block_call[j] -> the exported block's nodes, its get_attrs renamed to block j's

The glue between blocks is traced for real, so what the parent passes each block (which mask,
which carried state) is what the model does.  Two blocks share an export only when their keys
are equal: the same module class, the same parameter names, shapes and dtypes, the same inputs'
shapes, dtypes and constants, and the same sequence of ATen ops with the same constant
arguments reading the same inputs, parameters and earlier results -- what the block *computes*,
never its name or a config.  A block whose run on ``meta`` fails (a data-dependent op), or a
model where anything here does not apply, is captured whole, as before.

Nodes are renamed in graph order as ``torch.export`` names them, so the stitched graph and the
whole-model graph are the same graph, names included (``tests/test_regions.py`` compares them,
and the plans made from them, on models small enough to capture both ways).
"""
from __future__ import annotations

import gc
import hashlib
import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .stitch import RegionsUnsupported, assign, has_tensor, is_persistent, stitched

__all__ = ["block_runs", "capture_regions", "RegionsUnsupported"]

MIN_REPEATS = 2  # a class of blocks is made opaque when at least this many children share a signature


# ---------------------------------------------------------------------------------------------------------------
# which modules are blocks


def _signature(module: nn.Module) -> tuple:
    """A candidate's cheap signature (its classes and tensors' names, shapes, dtypes): only a
    filter -- identity is decided by ``_Call.key`` from what the block computes."""
    tensors = tuple((n, tuple(t.shape), t.dtype, t.requires_grad)
                    for n, t in [*module.named_parameters(remove_duplicate=False),
                                 *module.named_buffers(remove_duplicate=False)])
    return (tuple(type(m) for m in module.modules()), tensors)


def block_runs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every element of a ``ModuleList`` / ``Sequential`` that at least
    ``MIN_REPEATS`` siblings match by signature; outermost such lists only."""
    found: list[tuple[str, nn.Module]] = []
    taken: set[str] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or any(name.startswith(t + ".") for t in taken):
            continue
        groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
        for child_name, child in mod.named_children():
            if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                continue
            groups.setdefault(_signature(child), []).append((f"{name}.{child_name}" if name else child_name, child))
        for members in groups.values():
            if len(members) >= MIN_REPEATS:
                found.extend(members)
                taken.update(fqn for fqn, _ in members)
    return found


# ---------------------------------------------------------------------------------------------------------------
# the opaque call and its structural key


_lock = threading.Lock()
_calls: dict[int, "_Call"] = {}
_next_key = [0]


@torch.library.custom_op("autotp::block_call", mutates_args=())
def _block_call(xs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """A repeated block, opaque while the model around it is traced (never run)."""
    raise RuntimeError("autotp::block_call is a tracing placeholder and never runs")


@_block_call.register_fake
def _block_call_fake(xs, key):
    return _calls[key].run(xs)


class _Recorder(TorchDispatchMode):
    """Records each ATen op with its constant arguments and which earlier value each tensor
    argument is (an input, a parameter by its name in the block, or an earlier result)."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names  # id(tensor) -> its token
        self.keep: list = []  # the tensors named (so no id is reused while recording)
        self.ops: list = []

    def token(self, x):
        if isinstance(x, torch.Tensor):
            name = self.names.get(id(x))
            if name is None:  # a tensor from outside (a plain attribute): equal only to itself
                name = f"ext{id(x)}:{tuple(x.shape)}:{x.dtype}"
                self.names[id(x)] = name
                self.keep.append(x)
            return name
        if isinstance(x, (list, tuple)):
            return type(x).__name__, tuple(self.token(v) for v in x)
        if isinstance(x, dict):
            return tuple(sorted((k, self.token(v)) for k, v in x.items()))
        if isinstance(x, float) and x != x:
            return "nan"
        return repr(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:  # writing an input or a parameter: the trace around the block would not see it
            for arg, value in zip(func._schema.arguments, [*args, *(kwargs.get(a.name) for a in
                                                                     func._schema.arguments[len(args):])]):
                if (arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor)
                        and self.names.get(id(value), "").startswith(("in", "p:"))):
                    raise RegionsUnsupported(f"{func} writes into {self.names[id(value)]}")
        out = func(*args, **kwargs)
        k = len(self.ops)
        outs = pytree.tree_leaves(out)
        for i, t in enumerate(outs):
            if isinstance(t, torch.Tensor) and id(t) not in self.names:
                self.names[id(t)] = f"v{k}.{i}"
                self.keep.append(t)
        self.ops.append((str(func), self.token(args), self.token(kwargs),
                         tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in outs)))
        return out


def _state(block: nn.Module) -> list:
    """What each module of ``block`` holds besides its tensors and submodules (by identity)."""
    skip = ("_parameters", "_buffers", "_modules")
    return [sorted((k, id(v)) for k, v in vars(m).items() if k not in skip) for m in block.modules()]


def _hooked(block: nn.Module) -> bool:
    """Hooks that run inside the block (its own run around the opaque call) or on every module."""
    from torch.nn.modules import module as M

    inner = [m for m in block.modules() if m is not block]
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, k, None) for m in inner for k in kinds) or any(
        getattr(M, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                                      "_global_backward_pre_hooks"))


def _meta_like(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """An empty ``meta`` twin of ``t``; ``grad``: requiring grad (which changes what some ops run,
    e.g. the attention kernel ``scaled_dot_product_attention`` picks)."""
    m = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
    return m.requires_grad_(grad) if grad and (m.is_floating_point() or m.is_complex()) else m


@dataclass
class _Call:
    """One call of a block while the model is traced: its inputs' structure, its outputs', its key."""

    fqn: str
    block: nn.Module
    forward: object  # the block's own forward (the instance attribute is the stub meanwhile)
    spec: object = None  # (args, kwargs) tree with the tensor leaves taken out
    consts: list = field(default_factory=list)  # the non-tensor leaves, in order (None at tensor positions)
    out_spec: object = None
    out_consts: list = field(default_factory=list)
    key: str = ""
    example: tuple = ()  # the tensor inputs as meta tensors (for the block's own export)
    devices: tuple = ()
    shapes: dict = field(default_factory=dict)  # (a block's own record) shared by one capture: look-alikes' output shapes
    returned: list = field(default_factory=list)  # (shape, stride, dtype) of the outputs given to the trace
    signature: tuple = ()  # (a block's own record) its cheap signature
    grads: tuple = ()  # which tensor inputs require grad
    hidden: list = field(default_factory=list)  # (module, its parameters, its buffers) while hidden from the trace
    owner: "_Call | None" = None  # the block's own record (one per block; one of these per call of it)

    def hide(self) -> None:
        """Take the block's tensors out of its modules: the trace of the model then lifts only the
        glue's (``_stitched`` adds the blocks' back in the whole model's order)."""
        self.hidden = [(m, m._parameters, m._buffers) for m in self.block.modules()]
        for m, _, _ in self.hidden:
            m._parameters, m._buffers = {}, {}

    def show(self) -> None:
        for m, params, buffers in self.hidden:
            m._parameters, m._buffers = params, buffers
        self.hidden = []

    def rebuild(self, xs):
        it = iter(xs)
        leaves = [next(it) if c is _TENSOR else c for c in self.consts]
        return pytree.tree_unflatten(leaves, self.spec)

    def record(self, metas: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the block on ``meta`` tensors under the recorder; set its key; return its tensor outputs."""
        params = {n: _meta_like(t, t.requires_grad) for n, t in [*self.block.named_parameters(remove_duplicate=False),
                                                *self.block.named_buffers(remove_duplicate=False)]}
        names = {id(m): f"in{i}" for i, m in enumerate(metas)}
        names.update({id(t): f"p:{n}" for n, t in params.items()})
        rec = _Recorder(names)
        args, kwargs = self.rebuild(metas)
        given = pytree.tree_leaves((args, kwargs))
        state = _state(self.block)
        try:
            with torch.nn.utils.stateless._reparametrize_module(self.block, params), rec:
                out = self.forward(*args, **kwargs)
        except Exception as e:
            raise RegionsUnsupported(f"{self.fqn} does not run on meta ({type(e).__name__}: {e})") from e
        # Side effects the trace around an opaque block would miss: into a list or dict it was
        # given (a caller collecting extra outputs), or on its modules' attributes.
        after, spec = pytree.tree_flatten((args, kwargs))
        if str(spec) != str(self.spec) or any(a is not b for a, b in zip(after, given)):
            raise RegionsUnsupported(f"{self.fqn} changes a list or dict it was given")
        if _state(self.block) != state:
            raise RegionsUnsupported(f"{self.fqn} sets attributes of its modules when called")
        leaves, out_spec = pytree.tree_flatten(out)
        if any(isinstance(x, torch.Tensor) and rec.names.get(id(x), "").startswith("p:") for x in leaves):
            raise RegionsUnsupported(f"{self.fqn} returns one of its parameters as it is")
        if any(isinstance(x, torch.Tensor) and x._is_view() and rec.names.get(id(x._base), "").startswith(("in", "p:"))
               for x in leaves):  # (the trace around the block takes its outputs for new tensors)
            raise RegionsUnsupported(f"{self.fqn} returns a view of an input or parameter")
        # an input handed back as it is (T5's position bias) stays that input; the op returns the rest
        out_consts = [(_Input(int(rec.names[id(x)][2:])) if rec.names.get(id(x), "").startswith("in") else _TENSOR)
                      if isinstance(x, torch.Tensor) else x for x in leaves]
        if self.out_spec is not None and (out_spec != self.out_spec or rec.token(out_consts) != rec.token(self.out_consts)):
            raise RegionsUnsupported(f"{self.fqn} returns a different structure than traced")
        self.out_spec, self.out_consts = out_spec, out_consts
        outs = [x for x, c in zip(leaves, out_consts) if c is _TENSOR]
        described = (type(self.block).__module__, type(self.block).__qualname__,
                     tuple((n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in params.items()),
                     tuple((tuple(m.shape), tuple(m.stride()), m.dtype, m.requires_grad) for m in metas),
                     rec.token(self.consts), str(self.spec), str(out_spec), rec.token(out_consts),
                     tuple(rec.token(x) for x in outs), tuple(rec.ops), tuple(str(d) for d in self.devices),
                     torch.is_grad_enabled(), self.block.training)
        self.key = hashlib.sha256(repr(described).encode()).hexdigest()
        return outs

    def run(self, xs):
        """The fake implementation, while the model is traced: the block's outputs' shapes.

        A call whose block, inputs and constants look like an earlier call's (``_signature``)
        reuses that call's outputs' shapes here; ``capture_regions`` records every call after
        the trace and checks that its outputs are the ones returned."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            self.example = tuple(_meta_like(x, g) for x, g in zip(xs, self.grads))
            self.devices = tuple(x.device for x in xs)
            owner = self.owner  # (the block's own record: its signature, the capture's shapes, its hiding)
            guess = (owner.signature, tuple((tuple(m.shape), tuple(m.stride()), m.dtype, m.requires_grad)
                                           for m in self.example),
                     self.devices, repr([c for c in self.consts if c is not _TENSOR]), str(self.spec))
            seen = owner.shapes.get(guess)
            if seen is None:
                hidden = bool(owner.hidden)
                owner.show()
                try:
                    outs = self.record(list(self.example))
                finally:
                    if hidden:
                        owner.hide()
                seen = owner.shapes[guess] = (self.out_spec, self.out_consts,
                                             [(tuple(o.shape), tuple(o.stride()), o.dtype) for o in outs])
            else:
                self.out_spec, self.out_consts = seen[0], seen[1]
            self.returned = seen[2]
        return [torch.empty_strided(shape, stride, dtype=dtype, device=xs[0].device) for shape, stride, dtype in seen[2]]


_TENSOR = object()  # marks a tensor leaf among a call's constants


@dataclass(frozen=True)
class _Input:
    """Marks an output leaf that is the block's tensor input ``index``, returned as it is."""

    index: int


def _stub(block: _Call, calls: dict):
    """The block's forward while the model is traced: one ``block_call`` op, a record per call."""
    def forward(*args, **kwargs):
        with _lock:
            key = _next_key[0]
            _next_key[0] += 1
            call = calls[key] = _calls[key] = _Call(block.fqn, block.block, block.forward, owner=block)
        leaves, call.spec = pytree.tree_flatten((args, kwargs))
        call.consts = [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        call.grads = tuple(x.requires_grad for x in tensors)  # (the op's fake implementation sees none)
        outs = iter(torch.ops.autotp.block_call(tensors, key))
        return pytree.tree_unflatten([next(outs) if c is _TENSOR else tensors[c.index] if isinstance(c, _Input) else c
                                      for c in call.out_consts], call.out_spec)

    return forward


class _Flat(nn.Module):
    """A block called with its tensor inputs only, returning its tensor outputs: what is exported."""

    def __init__(self, call: _Call):
        super().__init__()
        self.block = call.block
        self.call = [call]  # not a submodule

    def forward(self, *xs):
        call = self.call[0]
        args, kwargs = call.rebuild(xs)
        leaves = pytree.tree_leaves(call.forward(*args, **kwargs))
        return [x for x, c in zip(leaves, call.out_consts) if c is _TENSOR]


# ---------------------------------------------------------------------------------------------------------------
# capture


def capture_regions(model: nn.Module, args: tuple, kwargs: dict, *, export, progress=None) -> GraphModule:
    """The model's graph, its repeated blocks exported once each.

    ``export(module, args, kwargs, what)`` is the caller's ``torch.export`` (returning the raw
    unlifted ``GraphModule``).  Raises ``RegionsUnsupported`` when there is nothing to reuse or
    this path does not apply (the caller then captures the model whole)."""
    blocks = block_runs(model)
    if not blocks:
        raise RegionsUnsupported("no repeated blocks")
    enabled = gc.isenabled()
    gc.disable()  # the collector's passes over the traces' many small objects cost more than the stitching
    try:
        return _capture(model, blocks, args, kwargs, export=export, progress=progress)
    finally:
        if enabled:
            gc.enable()


def _capture(model, blocks, args, kwargs, *, export, progress) -> GraphModule:
    mine = [id(m) for _, block in blocks for m in block.modules()]
    inside = set(mine)
    if len(inside) != len(mine) or any(id(m) in inside for m in _outside(model, {f for f, _ in blocks})):
        raise RegionsUnsupported("a module is shared between blocks, or between a block and the rest")
    for fqn, block in blocks:
        if "forward" in vars(block):
            raise RegionsUnsupported(f"{fqn}.forward is an instance attribute")
        if _hooked(block):
            raise RegionsUnsupported(f"{fqn} has module hooks inside (an opaque trace would not run them)")
    shapes: dict = {}
    owners = [_Call(fqn, block, block.forward, shapes=shapes, signature=_signature(block)) for fqn, block in blocks]
    calls: dict[int, _Call] = {}  # one per call of a block (a block may be called more than once)
    try:
        order = [n for n, _ in model.named_parameters(remove_duplicate=False)] + \
                [n for n, _ in model.named_buffers(remove_duplicate=False)]
        tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
        persistent = {n for n in tensors if is_persistent(model, n)}
        try:
            for owner in owners:
                owner.block.forward = _stub(owner, calls)
                owner.hide()
            glue = export(model, args, kwargs, type(model).__name__)
        finally:
            for owner in owners:
                if "forward" in vars(owner.block):
                    del owner.block.forward
                owner.show()
        sites = [n for n in glue.graph.nodes if n.op == "call_function" and n.target is torch.ops.autotp.block_call.default]
        if not sites:
            raise RegionsUnsupported("no block was called")
        if any(n.op == "call_module" and n.target != "_guards_fn" for n in glue.graph.nodes):
            raise RegionsUnsupported("the graph calls submodules")
        if any(_calls_blocks(m) for m in glue.modules() if isinstance(m, GraphModule) and m is not glue):
            raise RegionsUnsupported("a block is called inside a nested graph (a no_grad or autocast region)")
        exported: dict[str, GraphModule] = {}
        for site in sites:
            call = calls[site.args[1]]
            outs = call.record(list(call.example))  # here, not inside the trace: every key alike
            if [(tuple(o.shape), tuple(o.stride()), o.dtype) for o in outs] != call.returned:
                raise RegionsUnsupported(f"{call.fqn} returns other shapes than the call it looked like")
            if call.key not in exported:
                example = call.example if call.devices[0].type == "meta" else tuple(
                    torch.zeros(x.shape, dtype=x.dtype, device=d).as_strided(x.shape, x.stride()).requires_grad_(x.requires_grad)
                    for x, d in zip(call.example, call.devices))
                exported[call.key] = export(_Flat(call), example, {}, call.fqn)
        for name in order:  # the blocks' tensors, into the graph module beside the glue's
            if not has_tensor(glue, name):
                assign(glue, name, tensors[name], kind="buffer" if name in persistent else "non-persistent buffer")
        gm = stitched(glue, {site: (calls[site.args[1]], exported[calls[site.args[1]].key]) for site in sites}, order)
        if any(_calls_blocks(m) for m in gm.modules() if isinstance(m, GraphModule)):
            raise RegionsUnsupported("a block call was left in the stitched graph")
        if progress is not None:
            progress(len(sites), len(exported))
        return gm
    finally:
        with _lock:
            for key in list(calls):
                _calls.pop(key, None)


def _outside(model: nn.Module, fqns: set[str]):
    """The model's modules that are not inside one of the blocks ``fqns``."""
    for name, m in model.named_modules(remove_duplicate=False):
        if name not in fqns and not any(name.startswith(f + ".") for f in fqns):
            yield m


def _calls_blocks(gm: GraphModule) -> bool:
    return any(n.op == "call_function" and n.target is torch.ops.autotp.block_call.default for n in gm.graph.nodes)

"""Same-host collectives: all-reduce, all-gather and reduce-scatter through one shared file mapping.

Tensor-parallel inference on CPU ranks issues a few small collectives per layer
per token (``[batch, 1, hidden]``).  gloo sends each through the TCP stack; on
this project's 2-core machine that costs about 1.1-1.4 ms per all-reduce
whatever the size, which is a third of a decode step of a 100M-parameter model.
When every rank runs on one host they can instead meet in memory::

    rank r:  copy x into slot[r]; written[r] = seq       # publish
             wait until written[*] >= seq                # everyone published
             y = slot[0] + slot[1] + ... (rank order)    # every rank sums the same way
             read[r] = seq                               # done reading

Two sets of slots alternate (``seq % 2``), and a rank writes a set only after
every rank has finished reading it two collectives ago, so one barrier per
collective suffices.  Every rank adds the slots in the same order, so all ranks
get bitwise-identical results (as generation needs: identical logits, identical
tokens).  The mapping is a file in the temporary directory, unlinked as soon as
every rank has mapped it: nothing is left behind, and ``/dev/shm`` (docker's
64 MB default) is not used.

Two implementations speak this protocol over the same mapping:

* the compiled transport ``autotp._samehost`` (``csrc/samehost.cpp``, used when it was
  built): flags are 64-bit atomics with release stores and acquire loads, so it is correct
  on any architecture; the GIL is released while a rank copies, sums or waits; a
  message larger than a slot goes through the slots in pieces (one collective each,
  pipelined over the two sets); it has the reduce-scatter of sequence parallelism (each rank
  reads only its own rows from every slot) and the fused all-reduce + residual add +
  RMSNorm/LayerNorm (``add_norm``);
* the Python/numpy fallback: data is published before its flag with plain stores, which
  x86-64 keeps in order, so it is used on x86-64 only; messages larger than a slot, and
  reduce-scatters, go through the process group.

Both sum in rank order; bfloat16 and float16 are summed in float32 and rounded once per
element, so the two give bitwise-identical results.

A rank that never arrives (it died) makes the others raise after ``timeout_s``
instead of spinning forever.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import tempfile
import time

import torch
import torch.distributed as dist

from .kernels import extension as kernel_extension
from .runtime import CollectiveError

__all__ = ["SameHostComm", "AllReduceAddNorm", "enable_same_host_collectives"]

_HALF = (torch.bfloat16, torch.float16)


def _dtype_code(ext, dtype: torch.dtype) -> int | None:
    """The compiled transport's code for ``dtype`` (``None``: it does not sum that dtype)."""
    return {torch.float32: ext.F32, torch.float64: ext.F64, torch.bfloat16: ext.BF16, torch.float16: ext.F16,
            torch.int32: ext.I32, torch.int64: ext.I64}.get(dtype)


def _around(x: torch.Tensor, dim: int) -> tuple[int, int]:
    """``(outer, inner)``: the element counts of ``x``'s dims before and after ``dim``."""
    return math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])


def _x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class SameHostComm:
    """Shared-memory all-reduce (sum) and all-gather for the ranks of ``group`` on one host."""

    def __init__(self, group=None, *, slot_bytes: int = 4 << 20, timeout_s: float = 60.0, directory: str | None = None,
                 compiled: bool | None = None):
        """``compiled``: use the C++ transport (``True``: it must be built), the Python one
        (``False``), or the C++ one where it was built (``None``).  Collective over ``group``."""
        if slot_bytes < 64 or slot_bytes % 64:
            raise ValueError(f"SameHostComm: slot_bytes={slot_bytes} must be a positive multiple of 64")
        ext = kernel_extension("samehost") if compiled is not False else None
        if compiled and ext is None:
            raise ValueError("SameHostComm(compiled=True): autotp._samehost is not built; run "
                             "'python setup.py build_ext --inplace' (a C++ compiler is needed)")
        if ext is None and not _x86():
            raise ValueError(f"SameHostComm: the Python transport relies on x86-64 store ordering and this CPU is "
                             f"{platform.machine()}; build autotp._samehost ('python setup.py build_ext --inplace')")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self.counts = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0, "fallback": 0}
        header = 2 * self.world * 8
        total = header + 2 * self.world * slot_bytes
        path = [None]
        if self.rank == 0:
            fd, path[0] = tempfile.mkstemp(prefix="autotp-comm-", dir=directory)
            os.ftruncate(fd, total)
            os.close(fd)
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        try:
            buf = torch.from_file(path[0], shared=True, size=total, dtype=torch.uint8)
        finally:
            dist.barrier(group=group)
            if self.rank == 0:
                os.unlink(path[0])  # every rank has it mapped; the mapping outlives the name
        self._buf = buf
        self._flags = buf[:header].view(torch.int64).numpy().reshape(2, self.world)  # [written; read]
        self._slots = buf[header:].view(2, self.world, slot_bytes)
        self._seq = 0
        # the C++ transport keeps its own sequence number; the ranks must agree on which one speaks
        self._ext = ext
        self._cpp = None if ext is None else ext.Transport(buf.data_ptr(), total, self.world, self.rank, slot_bytes,
                                                           float(timeout_s))

    @property
    def compiled(self) -> bool:
        """Whether the C++ transport (acquire/release atomics) carries the collectives."""
        return self._cpp is not None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._ext.Timeout as e:
            raise CollectiveError(str(e)) from None

    def _wait(self, row: int, target: int) -> None:
        flags = self._flags[row]
        spins = 0
        start = None
        while flags.min() < target:
            spins += 1
            if spins > 100:
                os.sched_yield()  # ranks may outnumber cores: let the one we wait for run
                if spins % 2000 == 0:
                    start = start or time.monotonic()
                    if time.monotonic() - start > self.timeout_s:
                        late = [r for r in range(self.world) if flags[r] < target]
                        raise CollectiveError(
                            f"autotp same-host collective #{target} on rank {self.rank} of {self.world}: rank(s) "
                            f"{late} did not arrive within {self.timeout_s:g} s (did a rank die, stall, or take "
                            "another code path?)")

    def _exchange(self, x: torch.Tensor):
        """Publish ``x`` and return the ``world`` slots (views) once every rank has published."""
        self._seq += 1
        seq, b = self._seq, self._seq % 2
        self._wait(1, seq - 2)  # nobody still reads this set of slots
        n = x.numel() * x.element_size()
        self._slots[b, self.rank, :n].copy_(x.contiguous().view(-1).view(torch.uint8))
        self._flags[0, self.rank] = seq
        self._wait(0, seq)
        return [self._slots[b, r, :n].view(x.dtype).view(x.shape) for r in range(self.world)], seq

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.slot_bytes

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place.  The C++ transport sends a message larger than a slot
        through the slots in pieces; the Python one, and any dtype other than float32/64, bfloat16,
        float16, int32, int64 on the C++ one, goes through the process group (``counts["fallback"]``)."""
        if self._cpp is not None and x.device.type == "cpu" and (code := _dtype_code(self._ext, x.dtype)) is not None:
            # any size: the C++ transport sends a message larger than a slot in pieces
            out = x if x.is_contiguous() else x.contiguous()
            self._call(self._cpp.all_reduce, out.data_ptr(), out.numel(), code)
            self.counts["all_reduce"] += 1
            if out is not x:
                x.copy_(out)
            return x
        if not self.fits(x) or self._cpp is not None:
            self.counts["fallback"] += 1
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
            return x
        parts, seq = self._exchange(x)
        # summed straight into x (its value is in the slots now), in rank order on every rank
        out = x if x.is_contiguous() else torch.empty_like(x)
        if x.dtype in _HALF:  # in float32, rounded once (as the C++ transport does)
            acc = parts[0].float()
            for p in parts[1:]:
                acc += p
            out.copy_(acc)
        else:
            torch.add(parts[0], parts[1], out=out)
            for p in parts[2:]:
                out += p
        self._flags[1, self.rank] = seq
        self.counts["all_reduce"] += 1
        if out is not x:
            x.copy_(out)
        return x

    def gather_into(self, x: torch.Tensor, dim: int, chunks: int, global_size: int) -> torch.Tensor | None:
        """The rank-ordered all-gather of ``Shard(dim, chunks)`` pieces written straight into the global
        layout (padding trimmed): one copy out of the shared slots, no list of parts and no ``cat``.
        The C++ transport sends a piece larger than a slot in whole rows (one row along ``dim`` must
        fit a slot); ``None`` where a piece does not fit (the caller gathers through the process group)."""
        dim = dim % x.dim()
        outer, inner = _around(x, dim)
        if x.device.type != "cpu" or (self._cpp is None and not self.fits(x)) or inner * x.element_size() > self.slot_bytes:
            return None
        shape = list(x.shape)
        shape[dim] = global_size
        out = x.new_empty(shape)
        if self._cpp is not None:
            xc = x.contiguous()
            self._call(self._cpp.gather, out.data_ptr(), xc.data_ptr(), outer, x.shape[dim], inner * x.element_size(),
                       chunks, global_size)
            self.counts["all_gather"] += 1
            return out
        parts, seq = self._exchange(x)
        n = x.shape[dim]
        if chunks == 1:
            for r, p in enumerate(parts):
                take = max(0, min(n, global_size - r * n))
                if take:
                    out.narrow(dim, r * n, take).copy_(p.narrow(dim, 0, take))
        else:  # each part is [chunk0 block, chunk1 block, ...]; the global layout is chunk-major
            block = n // chunks
            for r, p in enumerate(parts):
                for c in range(chunks):
                    out.narrow(dim, (c * self.world + r) * block, block).copy_(p.narrow(dim, c * block, block))
        self._flags[1, self.rank] = seq
        self.counts["all_gather"] += 1
        return out

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        """The sum over the ranks of ``x`` (``world * n`` rows along ``dim``, padding included), keeping
        this rank's ``n`` rows ``[rank * n, (rank + 1) * n)``, summed in rank order.  C++ transport only,
        any size (in pieces of whole rows; ``world`` rows must fit a slot); ``None`` where it does not
        apply (the caller reduce-scatters through the process group)."""
        dim = dim % x.dim()
        code = _dtype_code(self._ext, x.dtype) if self._cpp is not None else None
        outer, inner = _around(x, dim)
        if code is None or x.device.type != "cpu" or self.world * inner * x.element_size() > self.slot_bytes:
            return None
        if x.shape[dim] % self.world:
            raise ValueError(f"SameHostComm.reduce_scatter: {x.shape[dim]} rows along dim {dim} do not split over "
                             f"{self.world} ranks (pad them first)")
        n = x.shape[dim] // self.world
        xc = x.contiguous()
        out = x.new_empty((*x.shape[:dim], n, *x.shape[dim + 1:]))
        self._call(self._cpp.reduce_scatter, out.data_ptr(), xc.data_ptr(), outer, n, inner, code)
        self.counts["reduce_scatter"] += 1
        return out

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x``, in rank order (copies)."""
        if not self.fits(x):
            self.counts["fallback"] += 1
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            return parts
        if self._cpp is not None:
            out = x.new_empty((self.world, *x.shape))
            self._call(self._cpp.gather, out.data_ptr(), x.contiguous().data_ptr(), 1, 1, x.numel() * x.element_size(),
                       1, self.world)
            self.counts["all_gather"] += 1
            return list(out.unbind(0))
        parts, seq = self._exchange(x)
        parts = [p.clone() for p in parts]
        self._flags[1, self.rank] = seq
        self.counts["all_gather"] += 1
        return parts

    def add_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool, *,
                 residual: torch.Tensor | None = None, join: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused all-reduce + residual add + norm over the last dim, in one pass over the shared
        slots (C++ transport only)::

            s = sum over ranks of (x + residual where this rank adds it, + 0.0 on the others when join)
            y = weight * s / sqrt(mean(s^2) + eps)                   if rms   (RMSNorm)
            y = (s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias)  else    (LayerNorm)

        Returns ``(s, y)``: ``s`` is bitwise what ``AllReduce(x + OneRankShare(residual))`` gives
        (the residual joins rank 0's partial sum), ``y`` the norm to a few ulps.  ``None`` when the
        fused op does not apply (no C++ transport, a dtype other than float32/64, bfloat16, float16,
        mixed dtypes, a row larger than a slot): the caller runs the composite.  Every rank gets
        the same answer from that test (it reads only shapes, dtypes and this transport)."""
        cols = x.shape[-1] if x.dim() else 0
        others = [t for t in (residual, weight, bias) if t is not None]
        if (self._cpp is None or x.dtype not in (torch.float32, torch.float64, *_HALF) or x.device.type != "cpu"
                or cols == 0 or cols * x.element_size() > self.slot_bytes
                or any(t.dtype != x.dtype or t.device != x.device for t in others)
                or (residual is not None and residual.shape != x.shape)
                or weight.shape != (cols,) or (bias is not None and bias.shape != (cols,))):
            return None
        xc = x.contiguous()
        r = residual.contiguous() if residual is not None else None
        w, b = weight.contiguous(), bias.contiguous() if bias is not None else None
        s, y = torch.empty_like(xc), torch.empty_like(xc)
        self._call(self._cpp.add_norm, xc.data_ptr(), 0 if r is None else r.data_ptr(), bool(join), w.data_ptr(),
                   0 if b is None else b.data_ptr(), s.data_ptr(), y.data_ptr(), xc.numel() // cols, cols,
                   _dtype_code(self._ext, x.dtype), float(eps), bool(rms))
        self.counts["all_reduce"] += 1
        return s, y


class AllReduceAddNorm(torch.nn.Module):
    """The lowered graph's ``AllReduce(x [+ OneRankShare(r)])`` followed by a LayerNorm or RMSNorm,
    as one module (``passes/fuse_allreduce_norm.py`` swaps the pattern for it): returns ``(s, y)``,
    the all-reduced sum (the next residual) and its norm (the next block's input).

    Runs the fused C++ op (``SameHostComm.add_norm``) when it can: the C++ same-host transport is
    in use, no autograd is needed (grad disabled or nothing requires grad), and not under
    ``torch.compile``.  Otherwise it runs ``composite``: the matched nodes themselves, moved into a
    small graph, so the fallback (and its backward) is exactly the graph that was replaced.
    """

    def __init__(self, comm, composite: torch.fx.GraphModule, *, rms: bool, eps: float, join: bool):
        super().__init__()
        self.comm = comm
        self.composite = composite
        self.rms, self.eps, self.join = rms, eps, join
        self.fused_calls = 0  # how often the fused op ran (the composite ran the other times)

    def forward(self, x, r, w, b):
        if torch.compiler.is_compiling():  # traced: the composite's ops (its AllReduce has a traceable twin)
            return self.composite(x, r, w, b)
        same_host = self.comm.same_host
        if (same_host is None or not same_host.compiled
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, r, w, b)))):
            return self.composite(x, r, w, b)
        out = same_host.add_norm(x, w, b, self.eps, self.rms, residual=r if self.join and self.comm.rank == 0 else None,
                                 join=self.join)
        if out is None:
            return self.composite(x, r, w, b)
        self.fused_calls += 1
        return out

    def extra_repr(self) -> str:
        return f"{'rms_norm' if self.rms else 'layer_norm'}, eps={self.eps:g}, residual={self.join}"


def enable_same_host_collectives(group=None, **kwargs) -> SameHostComm | None:
    """A same-host communicator for ``group``, where one applies; the caller owns it.

    Call on every rank (collective).  Returns ``None`` when it does not apply: world size 1,
    ranks on different hosts, a backend other than gloo (NCCL has its own fast paths), or a
    non-x86-64 CPU without the compiled transport.  The C++ transport is used when every rank
    has it built, else every rank uses the Python one.  ``autotp.shard(..., same_host_collectives=True)`` makes one per sharded
    model and hands it to that model's collectives (``runtime.Communicator``).
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    hosts = [None] * dist.get_world_size(group)
    mine = (_host_id(), platform.machine(), dist.get_backend(group),
            kwargs.get("compiled") is not False and kernel_extension("samehost") is not None)
    dist.all_gather_object(hosts, mine, group=group)
    compiled = all(c for *_, c in hosts)
    if len({h for h, *_ in hosts}) != 1 or any(be != "gloo" for _, _, be, _ in hosts):
        return None
    if not compiled and any(m not in ("x86_64", "AMD64") for _, m, _, _ in hosts):
        return None
    return SameHostComm(group, **{**kwargs, "compiled": compiled})

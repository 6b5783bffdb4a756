"""The Python side of the ``csrc/`` kernels: fake implementations, autograd, composite twins.

``torch.ops.autotp_kernels.*`` are defined in C++ (``csrc/kernels.cpp``, CPU; ``csrc/kernels.cu``,
CUDA).  This module registers what the dispatcher needs from Python once the extension is
loaded (``register()``, called by ``autotp.kernels``): a fake (meta) implementation of every op,
so that they trace, export and compile, and the autograd formulas of the three differentiable
ones (``bias_gelu``, ``silu_mul``, ``masked_embedding``), each calling its backward kernel.

``bias_gelu`` / ``silu_mul`` / ``masked_embedding`` here are the entry points the runtime calls:
the kernel where one is compiled for the tensor's device (``supports``), the composite twin
otherwise -- and under ``torch.compile``, where Inductor fuses the composite itself.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .kernels import extension

__all__ = ["supports", "bias_gelu", "silu_mul", "masked_embedding", "bias_gelu_composite", "silu_mul_composite",
           "masked_embedding_composite"]

_registered = False


def supports(device: torch.device | str | None) -> bool:
    """Whether the kernels are compiled for tensors on ``device`` (``None``: the CPU)."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind not in ("cpu", "cuda") or extension("cpu") is None:  # the CPU extension defines the ops
        return False
    return kind == "cpu" or extension("cuda") is not None


def _use_kernel(x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and supports(x.device)


# ----------------------------------------------------------------------------------------------
# composite twins: what each kernel computes, in ATen ops

def bias_gelu_composite(x, bias, approximate: str = "none"):
    # the bias in x's dtype, as the kernel takes it (and as the linear it came from added it under autocast)
    return F.gelu(x + bias.to(x.dtype) if bias is not None else x, approximate=approximate)


def silu_mul_composite(gate, up):
    return F.silu(gate) * up


def masked_embedding_composite(weight, ids, start: int, padding_idx: int = -1):
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = torch.ops.aten.embedding(weight, local.masked_fill(outside, 0), padding_idx)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------
# entry points

def bias_gelu(x, bias, approximate: str = "none"):
    """``gelu(x + bias)`` (``approximate`` "none" or "tanh"); one pass where compiled."""
    if _use_kernel(x):
        return torch.ops.autotp_kernels.bias_gelu(x, bias, approximate)
    return bias_gelu_composite(x, bias, approximate)


def silu_mul(gate, up):
    """``silu(gate) * up``; one pass where compiled."""
    if _use_kernel(gate):
        return torch.ops.autotp_kernels.silu_mul(gate, up)
    return silu_mul_composite(gate, up)


def masked_embedding(weight, ids, start: int, padding_idx: int = -1):
    """Rows ``ids - start`` of ``weight`` where in range, zero rows elsewhere (``padding_idx`` local, or -1)."""
    if _use_kernel(weight):
        return torch.ops.autotp_kernels.masked_embedding(weight, ids, start, padding_idx)
    return masked_embedding_composite(weight, ids, start, padding_idx)


# ----------------------------------------------------------------------------------------------
# registration (after the extension defined the ops)

def register() -> None:
    """Register the fakes and autograd formulas; idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = "autotp_kernels::"
    fake = torch.library.register_fake

    @fake(lib + "bias_gelu")
    def _(x, bias, approximate):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake(lib + "bias_gelu_backward")
    def _(grad, x, bias, approximate):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake(lib + "silu_mul")
    def _(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @fake(lib + "silu_mul_backward")
    def _(grad, gate, up):
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(gate, memory_format=torch.contiguous_format))

    @fake(lib + "ce_stats")
    def _(logits, target, valid, smoothing):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty((logits.shape[0], 4), dtype=acc)

    @fake(lib + "ce_grad")
    def _(logits, target, valid, coef):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @fake(lib + "masked_embedding")
    def _(weight, ids, start, padding_idx):
        return weight.new_empty((*ids.shape, weight.shape[1]))

    @fake(lib + "masked_embedding_backward")
    def _(grad, ids, start, rows, padding_idx):
        return grad.new_empty((rows, grad.shape[-1]))

    def gelu_setup(ctx, inputs, output):
        x, bias, approximate = inputs
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate

    def gelu_backward(ctx, grad):
        x, bias = ctx.saved_tensors
        dx = torch.ops.autotp_kernels.bias_gelu_backward(grad, x, bias, ctx.approximate)
        db = None
        if bias is not None and ctx.needs_input_grad[1]:
            db = dx.reshape(-1, dx.shape[-1]).sum(0).to(bias.dtype)
        return dx if ctx.needs_input_grad[0] else None, db, None

    torch.library.register_autograd(lib + "bias_gelu", gelu_backward, setup_context=gelu_setup)

    def silu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def silu_backward(ctx, grad):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.autotp_kernels.silu_mul_backward(grad, gate, up)
        return dgate.to(gate.dtype), dup.to(up.dtype)

    torch.library.register_autograd(lib + "silu_mul", silu_backward, setup_context=silu_setup)

    def embedding_setup(ctx, inputs, output):
        weight, ids, start, padding_idx = inputs
        ctx.save_for_backward(ids)
        ctx.args = (start, weight.shape[0], padding_idx)

    def embedding_backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        start, rows, padding_idx = ctx.args
        return torch.ops.autotp_kernels.masked_embedding_backward(grad, ids, start, rows, padding_idx), None, None, None

    torch.library.register_autograd(lib + "masked_embedding", embedding_backward, setup_context=embedding_setup)

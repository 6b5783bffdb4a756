"""A small language of model specs for fuzzing ``autotp.shard``, and the per-rank check.

A ``Spec`` is plain frozen dataclasses and tuples (picklable, and its ``repr`` is a
copy-pasteable repro once ``from fuzz_models import *``).  ``build(spec)`` makes the
``nn.Module`` and ``inputs(spec)`` its ``(args, kwargs)``; both are deterministic from
``spec.seed``, so every rank and the unsharded reference build the same model.

The model is a chain of blocks on a ``[batch, seq, width]`` stream (an ``Embedding`` of
``vocab`` ids first when ``vocab > 0``; an LM head, tied or not, last when ``head`` says so):

* ``MLP``: an optional pre-norm, a column linear ``width -> hidden`` (optionally gated,
  by a second linear or by the same one: a weight used twice), the ``mid`` ops on the
  hidden activation, a row linear ``hidden -> out``, the ``post`` ops on its output (a
  partial sum when sharded), then a residual add when ``residual``.
* ``Attn``: q/k/v projections (separate or fused) of ``heads`` / ``kv_heads`` heads (GQA by
  ``repeat_interleave`` or sdpa's ``enable_gqa``; sdpa or a written-out softmax attention),
  an output projection, ``post`` ops and an optional residual.
* ``Linear``: one linear ``width -> out`` and ``mid`` ops after it.
* ``Norm``: LayerNorm / RMSNorm (module or written out) on the stream.
* ``Reuse(i)``: call block ``i`` again (its weights used twice).

Ops are tuples ``(name, *params)``, evaluated by ``apply_op``: pointwise ops (with Python
constants, non-zero-preserving and non-finite-at-zero ones), reductions / scans over a dim
(``-1`` is the hidden dim, the one autotp shards; ``1`` seq; ``0`` batch) broadcast back into
the value, combinations of a block's output with its input (``add_x``: ``row_out + x``), and
``tap`` ops that append a reduction's result to the model's outputs (the model returns the
stream, then the taps, as a tuple).

Models are kept well conditioned, so that the 1e-5 tolerance separates bugs from rounding:
ops singular at zero read ``t + sign(t)`` (see ``apply_op``), there is no variance of nearly
equal values, and index outputs may differ from the reference only at ties up to tolerance.

``check_spec(spec, world, rank)`` runs one spec on one rank: the unsharded reference, then
``autotp.shard`` and the sharded forward, and classifies the outcome.  ``run_specs`` runs many
specs on gloo ranks with a watchdog (a hang is reported, not waited out).  ``shrink`` greedily
minimizes a failing spec.  As a script (a repro printed by ``tests/test_fuzz.py``)::

    python tests/fuzz_models.py --world 2,3,4 [--shrink] \
        "Spec(seed=0, batch=2, seq=3, width=4, blocks=(MLP(hidden=5),))"
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Spec", "MLP", "Attn", "Linear", "Norm", "Reuse", "build", "inputs", "apply_op", "check_spec",
           "compare", "run_specs", "summarize", "Outcome", "spec_repr", "failure_class",
           "shrink", "shrink_candidates", "ELEMENTWISE", "SINGULAR", "REDUCE_KINDS", "TAP_KINDS"]


# --------------------------------------------------------------------------- the language

@dataclass(frozen=True)
class MLP:
    hidden: int
    out: int | None = None          # None: the block's input width
    bias: tuple = (True, True)      # (column bias, row bias)
    gated: str | None = None        # None | "separate" (silu(gate(x)) * up(x)) | "same" (silu(up(x)) * up(x))
    norm: str | None = None         # pre-norm on the block input (see Norm.kind)
    mid: tuple = ()                 # ops on the hidden activation
    post: tuple = ()                # ops on the row linear's output
    residual: bool = True           # add the block input back (needs out == width)


@dataclass(frozen=True)
class Attn:
    heads: int
    kv_heads: int
    head_dim: int
    fused: bool = False             # one [q|k|v] projection, split
    gqa: str = "repeat"             # "repeat" (repeat_interleave) | "sdpa" (enable_gqa=True)
    impl: str = "sdpa"              # "sdpa" | "manual" (q @ k^T, masked_fill, softmax, @ v)
    causal: bool = True
    bias: bool = False
    norm: str | None = None
    post: tuple = ()
    residual: bool = True


@dataclass(frozen=True)
class Linear:
    out: int
    bias: bool = True
    mid: tuple = ()


@dataclass(frozen=True)
class Norm:
    kind: str                       # "layer" | "layer_noaffine" | "rms" | "rms_manual"


@dataclass(frozen=True)
class Reuse:
    block: int                      # index of an earlier width -> width block, called again


@dataclass(frozen=True)
class Spec:
    seed: int
    batch: int
    seq: int
    width: int                      # the stream's width (input features or embedding dim)
    blocks: tuple = ()
    vocab: int = 0                  # > 0: integer ids [batch, seq] through an Embedding(vocab, width)
    head: str = "none"              # "none" | "untied" (Linear(width, vocab)) | "tied" (the embedding's weight)
    head_bias: bool = False
    final_norm: str | None = None
    mask: bool = False              # a bool kwarg ``mask`` [batch, seq] (for masked_fill_in)
    dropout: float = 0.0            # an nn.Dropout on the stream after each block (the model runs in eval)


# Pointwise ops that are finite for any finite input of moderate size.
ELEMENTWISE = ["relu", "gelu", "silu", "tanh", "sigmoid", "exp", "neg", "abs", "square", "cube", "log_sigmoid",
               "log1p_square", "recip_safe", "where_pos", "masked_fill_neg", "masked_fill_in", "dropout",
               "clamp", "add_c", "mul_c", "sub_c", "rsub_c", "div_c", "pow_c", "mul_self", "add_self"]
# Pointwise ops of a nonzero value that are non-finite at zero (log, 1/x, rsqrt, negative or
# fractional powers, x / |x|, sqrt): where the column output is padded with zeros they give
# inf / NaN (or an infinite derivative).  See apply_op: they read t + sign(t).
SINGULAR = ["log_abs", "recip", "rsqrt_abs", "pow_neg", "pow_abs_frac", "sign_div", "sqrt_abs"]
# Reductions / scans broadcast back into the value: ("red", kind, dim, how).
# (No variance: of nearly equal values it is ill conditioned, and rounding would pass for a bug;
# LayerNorm, whose eps keeps it conditioned, covers it.)
REDUCE_KINDS = ["sum", "mean", "amax", "amin", "max", "min", "max_idx", "min_idx", "logsumexp", "prod_sign",
                "max_all", "min_all"]
SCANS = ["softmax", "log_softmax", "cumsum", "cummax", "layer_norm", "rms_norm"]
# Taps append to the outputs: ("tap", kind, dim).
TAP_KINDS = ["sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "logsumexp", "cumsum", "softmax", "id",
             "topk", "max_all", "min_all"]
# Combinations of a block's output (a partial sum when row-parallel) with its input or itself.
COMBINE = ["add_x", "sub_x", "rsub_x", "mul_x", "add_c", "rsub_c", "sub_c", "mul_c", "div_c", "mul_self",
           "add_self", "square", "where_x"]


def _reduce(t: torch.Tensor, kind: str, dim, keepdim: bool):
    if kind == "sum":
        return t.sum(dim, keepdim=keepdim)
    if kind == "mean":
        return t.mean(dim, keepdim=keepdim)
    if kind == "amax":
        return t.amax(dim, keepdim=keepdim)
    if kind == "amin":
        return t.amin(dim, keepdim=keepdim)
    if kind == "logsumexp":
        return torch.logsumexp(t, dim, keepdim=keepdim)
    if kind == "prod_sign":  # product of signs: exact in float, sensitive to every element
        return torch.sign(t).prod(dim, keepdim=keepdim)
    if kind in ("max_all", "min_all"):  # torch.max(t): aten.max.default, over every dim
        return t.max() if kind == "max_all" else t.min()
    if kind in ("max", "min"):
        return (torch.max if kind == "max" else torch.min)(t, dim, keepdim=keepdim).values
    if kind in ("max_idx", "min_idx"):
        return (torch.max if kind == "max_idx" else torch.min)(t, dim, keepdim=keepdim).indices.to(t.dtype)
    raise ValueError(f"unknown reduction {kind!r}")


# While the reference runs (eagerly), each index-valued tap records the value it indexed, so
# that ``compare`` can tell a near tie (two entries within rounding of each other, which a
# sharded run may order either way) from a wrong index.  {output position: (source, dim, keepdim)}
_INDEX_SOURCES: dict | None = None


def _record_index_source(tap_pos: int, t: torch.Tensor, dim: int, keepdim: bool = False) -> None:
    if _INDEX_SOURCES is not None:
        _INDEX_SOURCES[1 + tap_pos] = (t.detach().clone(), dim, keepdim)  # output 0 is the stream


def apply_op(op: tuple, t: torch.Tensor, x: torch.Tensor | None, mask: torch.Tensor | None, taps: list,
             training: bool = False) -> torch.Tensor:
    """Apply op ``(name, *params)`` to ``t``. ``x``: the block's input (for combinations);
    ``mask``: the model's bool ``[batch, seq]`` kwarg or None; ``taps``: the outputs list."""
    name, *p = op
    if name == "relu":
        return torch.relu(t)
    if name == "gelu":
        return F.gelu(t)
    if name == "silu":
        return F.silu(t)
    if name == "tanh":
        return torch.tanh(t)
    if name == "sigmoid":
        return torch.sigmoid(t)
    if name == "exp":
        return torch.exp(t)
    if name == "neg":
        return -t
    if name == "abs":
        return t.abs()
    if name == "square":
        return t * t
    if name == "cube":
        return t ** 3
    if name == "log_sigmoid":
        return torch.log(torch.sigmoid(t))
    if name == "log1p_square":
        return torch.log(t * t + 1.0)
    if name == "recip_safe":
        return 1.0 / (t * t + 1.0)
    if name == "where_pos":
        return torch.where(t > 0, t, t * p[0])
    if name == "masked_fill_neg":
        return t.masked_fill(t < 0, p[0])
    if name == "masked_fill_in":
        return t if mask is None else t.masked_fill(mask.unsqueeze(-1), p[0])
    if name == "dropout":
        return F.dropout(t, p[0], training=training)
    if name == "clamp":
        return t.clamp(p[0], p[1])
    if name == "add_c":
        return t + p[0]
    if name == "mul_c":
        return t * p[0]
    if name == "sub_c":
        return t - p[0]
    if name == "rsub_c":
        return p[0] - t
    if name == "div_c":
        return t / p[0]
    if name == "pow_c":
        return t ** p[0]
    if name == "mul_self":
        return t * t
    if name == "add_self":
        return t + t
    # Non-finite (or of infinite slope) at zero.  They read u = t + sign(t): |u| >= 1 for any
    # nonzero t, so they are well conditioned on real values (1 / t of a t that came out of a
    # cancelling matmul is not, and rounding would pass for a bug), while a padded 0 stays 0.
    if name in SINGULAR:
        u = t + torch.sign(t)
        if name == "log_abs":
            return torch.log(u.abs())
        if name == "recip":
            return 1.0 / u if not p else torch.reciprocal(u)
        if name == "rsqrt_abs":
            return torch.rsqrt(u.abs())
        if name == "pow_neg":
            return u ** p[0]
        if name == "pow_abs_frac":
            return u.abs().pow(p[0])
        if name == "sign_div":
            return u / u.abs()
        if name == "sqrt_abs":
            return torch.sqrt(u.abs())
    # reductions / scans over a dim, broadcast back
    if name == "red":
        kind, dim, how = p
        r = _reduce(t, kind, dim, keepdim=True)
        return t - r if how == "sub" else t * r if how == "mul" else t + r
    if name == "softmax":
        return torch.softmax(t, p[0])
    if name == "log_softmax":
        return torch.log_softmax(t, p[0])
    if name == "cumsum":
        return torch.cumsum(t, p[0])
    if name == "cummax":
        v, i = torch.cummax(t, p[0])
        return v + i.to(t.dtype)
    if name == "layer_norm":
        return F.layer_norm(t, (t.shape[-1],))
    if name == "rms_norm":
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
    # combinations with the block input
    if name == "add_x":
        return t + x
    if name == "sub_x":
        return t - x
    if name == "rsub_x":
        return x - t
    if name == "mul_x":
        return t * x
    if name == "where_x":
        return torch.where(x > 0, t, x)
    # taps: an extra output, the value passes through
    if name == "tap":
        kind, dim = p
        if kind == "id":
            taps.append(t)
        elif kind in ("max", "min"):
            v, i = (torch.max if kind == "max" else torch.min)(t, dim)
            _record_index_source(len(taps) + 1, t, dim)
            taps.extend([v, i])
        elif kind in ("argmax", "argmin"):
            _record_index_source(len(taps), t, dim)
            taps.append((torch.argmax if kind == "argmax" else torch.argmin)(t, dim))
        elif kind == "cumsum":
            taps.append(torch.cumsum(t, dim))
        elif kind == "softmax":
            taps.append(torch.softmax(t, dim))
        elif kind == "topk":
            v, i = torch.topk(t, 2 if t.shape[dim] >= 2 else 1, dim)
            _record_index_source(len(taps) + 1, t, dim, keepdim=True)
            taps.extend([v, i])
        else:
            taps.append(_reduce(t, kind, dim, keepdim=False))
        return t
    raise ValueError(f"unknown op {name!r}")


# --------------------------------------------------------------------------- the builder

class RMSNormManual(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def make_norm(kind: str | None, d: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "layer":
        m = nn.LayerNorm(d)
    elif kind == "layer_noaffine":
        return nn.LayerNorm(d, elementwise_affine=False)
    elif kind == "rms":
        m = nn.RMSNorm(d, eps=1e-6)
    elif kind == "rms_manual":
        m = RMSNormManual(d)
    else:
        raise ValueError(f"unknown norm {kind!r}")
    with torch.no_grad():  # not the identity affine: a wrong slice of it shows
        m.weight.copy_(1.0 + 0.2 * torch.randn(d))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(0.2 * torch.randn(d))
    return m


class MLPBlock(nn.Module):
    def __init__(self, b: MLP, d: int):
        super().__init__()
        self.spec = b
        out = b.out or d
        self.norm = make_norm(b.norm, d)
        self.up = nn.Linear(d, b.hidden, bias=b.bias[0])
        self.gate = nn.Linear(d, b.hidden, bias=b.bias[0]) if b.gated == "separate" else None
        self.down = nn.Linear(b.hidden, out, bias=b.bias[1])

    def forward(self, x, mask, taps):
        b = self.spec
        h_in = self.norm(x)
        h = self.up(h_in)
        if b.gated == "separate":
            h = F.silu(self.gate(h_in)) * h
        elif b.gated == "same":
            h = F.silu(self.up(h_in)) * h
        for op in b.mid:
            h = apply_op(op, h, None, mask, taps, self.training)
        y = self.down(h)
        for op in b.post:
            y = apply_op(op, y, x, mask, taps, self.training)
        return x + y if b.residual else y


class AttnBlock(nn.Module):
    def __init__(self, b: Attn, d: int):
        super().__init__()
        self.spec = b
        self.norm = make_norm(b.norm, d)
        q, kv = b.heads * b.head_dim, b.kv_heads * b.head_dim
        if b.fused:
            self.qkv = nn.Linear(d, q + 2 * kv, bias=b.bias)
        else:
            self.q = nn.Linear(d, q, bias=b.bias)
            self.k = nn.Linear(d, kv, bias=b.bias)
            self.v = nn.Linear(d, kv, bias=b.bias)
        self.o = nn.Linear(q, d, bias=b.bias)

    def forward(self, x, mask, taps):
        b = self.spec
        bsz, s, _ = x.shape
        h = self.norm(x)
        q_n, kv_n = b.heads * b.head_dim, b.kv_heads * b.head_dim
        if b.fused:
            q, k, v = self.qkv(h).split([q_n, kv_n, kv_n], dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.view(bsz, s, b.heads, b.head_dim).transpose(1, 2)
        k = k.view(bsz, s, b.kv_heads, b.head_dim).transpose(1, 2)
        v = v.view(bsz, s, b.kv_heads, b.head_dim).transpose(1, 2)
        rep = b.heads // b.kv_heads
        if rep > 1 and not (b.gqa == "sdpa" and b.impl == "sdpa"):
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if b.impl == "sdpa":
            gqa = {"enable_gqa": True} if rep > 1 and b.gqa == "sdpa" else {}
            a = F.scaled_dot_product_attention(q, k, v, is_causal=b.causal, **gqa)
        else:
            scores = q @ k.transpose(-2, -1) * (b.head_dim ** -0.5)
            if b.causal:
                causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            a = torch.softmax(scores, dim=-1) @ v
        a = a.transpose(1, 2).reshape(bsz, s, q_n)
        y = self.o(a)
        for op in b.post:
            y = apply_op(op, y, x, mask, taps, self.training)
        return x + y if b.residual else y


class LinearBlock(nn.Module):
    def __init__(self, b: Linear, d: int):
        super().__init__()
        self.spec = b
        self.lin = nn.Linear(d, b.out, bias=b.bias)

    def forward(self, x, mask, taps):
        y = self.lin(x)
        for op in self.spec.mid:
            y = apply_op(op, y, None, mask, taps, self.training)
        return y


class NormBlock(nn.Module):
    def __init__(self, b: Norm, d: int):
        super().__init__()
        self.norm = make_norm(b.kind, d)

    def forward(self, x, mask, taps):
        return self.norm(x)


class FuzzModel(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        d = spec.width
        self.embed = nn.Embedding(spec.vocab, d) if spec.vocab else None
        blocks, self.order = [], []
        widths = []  # (width in, width out) of each entry of spec.blocks
        for b in spec.blocks:
            if isinstance(b, Reuse):
                i = b.block
                if not (0 <= i < len(widths)) or widths[i] != (d, d) or isinstance(spec.blocks[i], Reuse):
                    raise ValueError(f"Reuse({i}): block {i} is not an earlier {d} -> {d} block")
                self.order.append(self.order[i])
                widths.append((d, d))
                continue
            if isinstance(b, MLP):
                m, out = MLPBlock(b, d), (b.out or d)
                if b.residual and out != d:
                    raise ValueError("MLP residual needs out == width")
            elif isinstance(b, Attn):
                if b.heads % b.kv_heads:
                    raise ValueError("heads must be a multiple of kv_heads")
                m, out = AttnBlock(b, d), d
            elif isinstance(b, Linear):
                m, out = LinearBlock(b, d), b.out
            elif isinstance(b, Norm):
                m, out = NormBlock(b, d), d
            else:
                raise ValueError(f"unknown block {b!r}")
            self.order.append(len(blocks))
            blocks.append(m)
            widths.append((d, out))
            d = out
        self.blocks = nn.ModuleList(blocks)
        self.drop = nn.Dropout(spec.dropout) if spec.dropout else None
        self.final_norm = make_norm(spec.final_norm, d)
        self.head = None
        if spec.head != "none":
            if not spec.vocab:
                raise ValueError("a head needs vocab > 0")
            if spec.head == "tied":
                if d != spec.width:
                    raise ValueError("a tied head needs the stream back at the embedding width")
                self.head = nn.Linear(d, spec.vocab, bias=spec.head_bias)
                self.head.weight = self.embed.weight
            else:
                self.head = nn.Linear(d, spec.vocab, bias=spec.head_bias)

    def forward(self, x, mask=None):
        taps: list = []
        if self.embed is not None:
            x = self.embed(x)
        for i in self.order:
            x = self.blocks[i](x, mask, taps)
            if self.drop is not None:
                x = self.drop(x)
        x = self.final_norm(x)
        if self.head is not None:
            x = self.head(x)
        return (x, *taps) if taps else x


def build(spec: Spec) -> nn.Module:
    """The model of ``spec``, in eval mode, with weights drawn from ``spec.seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = FuzzModel(spec)
        with torch.no_grad():  # biases drawn wider than the default init: a bias added twice shows
            for name, p in model.named_parameters():
                if name.endswith("bias") and "norm" not in name:
                    p.uniform_(-0.5, 0.5)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def inputs(spec: Spec) -> tuple[tuple, dict]:
    """One call's ``(args, kwargs)``, drawn from ``spec.seed``."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    if spec.vocab:
        x = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=g)
    else:
        x = torch.randn(spec.batch, spec.seq, spec.width, generator=g)
    kwargs = {}
    if spec.mask:
        kwargs["mask"] = torch.rand(spec.batch, spec.seq, generator=g) < 0.3
    return (x,), kwargs


# --------------------------------------------------------------------------- the check

RTOL = ATOL = 1e-5


def _near_tie(o: torch.Tensor, r: torch.Tensor, source) -> bool:
    """Whether indices ``o`` (sharded) and ``r`` (reference) into ``source`` pick values within the
    float tolerance of each other wherever they differ (a tie up to rounding)."""
    src, dim, keepdim = source
    oi, ri = (o, r) if keepdim else (o.unsqueeze(dim), r.unsqueeze(dim))
    if (oi < 0).any() or (oi >= src.shape[dim]).any():
        return False
    vo, vr = src.double().gather(dim, oi), src.double().gather(dim, ri)
    fin = src[torch.isfinite(src)]
    scale = fin.abs().max().item() if fin.numel() else 0.0
    same = (vo == vr) | (torch.isnan(vo) & torch.isnan(vr))
    close = (vo - vr).abs() <= RTOL * vr.abs() + ATOL * scale
    return bool((same | close).all())


def compare(out, ref, index_sources: dict | None = None) -> str | None:
    """None when ``out`` matches ``ref``; otherwise what differs (and by how much).

    Floats: within ``RTOL * |ref| + ATOL * max|ref|`` (the output's finite magnitude) where the
    reference is finite; NaN exactly where the reference is NaN, the same infinities.
    Integers and bools: equal -- except indices (``index_sources``: output position -> what they
    index, recorded by the reference run) that differ only at ties up to that tolerance."""
    from torch.utils import _pytree as pytree

    outs, out_spec = pytree.tree_flatten(out)
    refs, ref_spec = pytree.tree_flatten(ref)
    if out_spec != ref_spec:
        return f"output structure {out_spec} != reference {ref_spec}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not isinstance(r, torch.Tensor):
            if o != r:
                return f"output {i}: {o!r} != {r!r}"
            continue
        if not isinstance(o, torch.Tensor):
            return f"output {i}: a {type(o).__name__}, the reference a tensor"
        if o.shape != r.shape or o.dtype != r.dtype:
            return f"output {i}: {o.dtype}{list(o.shape)} != reference {r.dtype}{list(r.shape)}"
        if not r.is_floating_point():
            bad = o != r
            if bad.any() and not (index_sources and i in index_sources and _near_tie(o, r, index_sources[i])):
                return f"output {i} ({r.dtype}): {int(bad.sum())} of {r.numel()} elements differ"
            continue
        o, r = o.double(), r.double()
        nan_r, nan_o = torch.isnan(r), torch.isnan(o)
        if (nan_o & ~nan_r).any():
            return (f"output {i}: NaN at {int((nan_o & ~nan_r).sum())} of {r.numel()} elements where the "
                    f"reference is not NaN")
        if (nan_r & ~nan_o).any():
            return f"output {i}: finite at {int((nan_r & ~nan_o).sum())} elements where the reference is NaN"
        inf_r, inf_o = torch.isinf(r), torch.isinf(o)
        if (inf_r != inf_o).any() or (o[inf_r] != r[inf_r]).any():
            return f"output {i}: infinities differ from the reference's at {int((inf_r != inf_o).sum())} elements"
        fin = torch.isfinite(r)
        if not fin.any():
            continue
        scale = r[fin].abs().max()
        err = (o[fin] - r[fin]).abs()
        tol = RTOL * r[fin].abs() + ATOL * scale
        if (err > tol).any():
            return (f"output {i}: {int((err > tol).sum())} of {int(fin.sum())} elements off; max abs error "
                    f"{err.max().item():.3g}, {err.max().item() / max(scale.item(), 1e-30):.3g} of the output's "
                    f"magnitude {scale.item():.3g}")
    return None


@dataclass
class Outcome:
    """One spec on one rank. ``status``: ``full`` / ``fallback`` / ``none`` (sharded: fully,
    partly replicated, nothing) when the answer matched; ``error`` (a documented ValueError /
    CaptureError); ``wrong`` (a silently wrong answer); ``crash`` (any other exception);
    ``hang`` / ``died`` (set by ``run_specs``); ``invalid`` (the reference itself failed)."""

    status: str
    sharding: str | None = None      # full / fallback / none, when shard() returned
    detail: str = ""                 # the mismatch, or the exception and its traceback
    replicated: dict | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("wrong", "crash", "hang", "died", "invalid", "asymmetric")


_UNPACK = re.compile(r"values to unpack|object is not iterable|object is not subscriptable")


def _documented(e: BaseException) -> bool:
    import autotp

    if isinstance(e, autotp.CaptureError):
        return bool(str(e))
    if type(e) is ValueError or (isinstance(e, ValueError) and type(e).__module__.startswith("autotp")):
        return bool(str(e)) and not _UNPACK.search(str(e))
    return False


def _origin(e: BaseException) -> str:
    """Where the innermost cause of ``e`` was raised: ``file:line in function``."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return "?"
    f = tb[-1]
    return f"{type(e).__name__} at {os.path.relpath(f.filename)}:{f.lineno} in {f.name}"


def sharding_of(plan) -> str:
    from autotp.placements import Shard

    if not any(isinstance(p.placement, Shard) for p in plan.parameters.values()):
        return "none"
    return "fallback" if plan.replicated else "full"


def check_spec(spec: Spec, world: int, rank: int) -> Outcome:
    """Run ``spec`` on this rank: the unsharded reference, then ``autotp.shard`` and its forward."""
    import autotp

    t0 = time.perf_counter()
    global _INDEX_SOURCES
    try:
        args, kwargs = inputs(spec)
        _INDEX_SOURCES = index_sources = {}
        with torch.no_grad():
            ref = build(spec)(*args, **kwargs)
    except Exception as e:
        return Outcome("invalid", detail=f"the unsharded model failed: {type(e).__name__}: {e}\n"
                                         f"{traceback.format_exc()}")
    finally:
        _INDEX_SOURCES = None  # only the eager reference records (not export's tracing)
    sharded, stage = None, "autotp.shard"
    try:
        model = build(spec)  # a fresh model: shard sees the same weights, the reference stays untouched
        sharded = autotp.shard(model, world, example_inputs=args, example_kwargs=kwargs)
        stage = "the sharded forward"
        args, kwargs = inputs(spec)
        with torch.no_grad():
            out = sharded(*args, **kwargs)
    except Exception as e:
        sharding = sharding_of(sharded.plan) if sharded is not None else None
        rep = dict(sharded.plan.replicated) if sharded is not None else None
        status = "error" if _documented(e) else "crash"
        msg = str(e).splitlines()[0] if str(e) else ""
        return Outcome(status, sharding, f"in {stage}: {type(e).__name__}: {msg}\n  raised at {_origin(e)}\n"
                                         f"{traceback.format_exc()}", rep, time.perf_counter() - t0)
    diff = compare(out, ref, index_sources)
    return Outcome("wrong" if diff else sharding_of(sharded.plan), sharding_of(sharded.plan), diff or "",
                   dict(sharded.plan.replicated), time.perf_counter() - t0)


# --------------------------------------------------------------------------- repros and shrinking

def spec_repr(obj) -> str:
    """A copy-pasteable ``repr`` that leaves out fields at their defaults."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        parts = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.default is dataclasses.MISSING or v != f.default:
                parts.append(f"{f.name}={spec_repr(v)}")
        return f"{type(obj).__name__}({', '.join(parts)})"
    if isinstance(obj, tuple):
        inner = ", ".join(spec_repr(v) for v in obj)
        return f"({inner},)" if len(obj) == 1 else f"({inner})"
    return repr(obj)


def failure_class(o: "Outcome") -> str:
    """A short name for what went wrong, the same for the same bug (numbers and node names elided)."""
    if o.status == "wrong":
        d = o.detail
        kind = ("NaN where the reference is finite" if "NaN at" in d else
                "finite where the reference is NaN" if "reference is NaN" in d else
                "infinities differ" if "infinities" in d else
                "integers differ" if "elements differ" in d else
                "values off" if "elements off" in d else d.split(":", 1)[-1].strip()[:60])
        return f"wrong answer: {kind}"
    if o.status in ("crash", "error"):
        first = o.detail.splitlines()[0] if o.detail else ""
        first = re.sub(r"\d+", "N", first)
        first = re.sub(r"\(at [^)]*\)", "(at _)", first)
        return f"{o.status}: {first[:140]}"
    return o.status


def _replace_at(t: tuple, i: int, v) -> tuple:
    return t[:i] + (v,) + t[i + 1:]


def _smaller(n: int, world: int, lo: int = 1) -> list[int]:
    """Smaller sizes of the same kind: the same remainder mod ``world`` (divisible stays divisible)."""
    out = []
    for m in (n % world or world, n % world + world, n // 2):
        if lo <= m < n and (m % world == n % world) and m not in out:
            out.append(m)
    return out


def _block_variants(b, world: int) -> list:
    out = []
    if isinstance(b, (MLP, Linear, Attn)):
        for field in ("mid", "post"):
            ops = getattr(b, field, ())
            for i in range(len(ops)):
                out.append(dataclasses.replace(b, **{field: ops[:i] + ops[i + 1:]}))
    if isinstance(b, MLP):
        if b.gated:
            out.append(dataclasses.replace(b, gated=None))
        if b.norm:
            out.append(dataclasses.replace(b, norm=None))
        for bias in ((False, False), (True, False), (False, True)):
            if bias != tuple(b.bias) and sum(bias) < sum(b.bias):
                out.append(dataclasses.replace(b, bias=bias))
        out += [dataclasses.replace(b, hidden=h) for h in _smaller(b.hidden, world)]
        if b.out is not None:
            out += [dataclasses.replace(b, out=o) for o in _smaller(b.out, world)]
    if isinstance(b, Attn):
        for k, v in (("fused", False), ("impl", "sdpa"), ("causal", False), ("bias", False), ("norm", None),
                     ("gqa", "repeat")):
            if getattr(b, k) != v:
                out.append(dataclasses.replace(b, **{k: v}))
        if b.kv_heads != b.heads:
            out.append(dataclasses.replace(b, kv_heads=b.heads))
        out += [dataclasses.replace(b, head_dim=h) for h in range(1, b.head_dim)]
        out += [dataclasses.replace(b, heads=h, kv_heads=math.gcd(h, b.kv_heads)) for h in range(1, b.heads)]
    if isinstance(b, Linear):
        if b.bias:
            out.append(dataclasses.replace(b, bias=False))
        out += [dataclasses.replace(b, out=o) for o in _smaller(b.out, world)]
    return out


def shrink_candidates(spec: Spec, world: int) -> list[Spec]:
    """Simpler specs than ``spec``, simplest first (each still builds and runs unsharded)."""
    c: list[Spec] = []
    for i in range(len(spec.blocks)):
        kept = []  # block i removed: reuses of it go too, later indices shift down
        for j, b in enumerate(spec.blocks):
            if j == i or (isinstance(b, Reuse) and b.block == i):
                continue
            kept.append(Reuse(b.block - 1) if isinstance(b, Reuse) and b.block > i else b)
        c.append(dataclasses.replace(spec, blocks=tuple(kept)))
        for v in _block_variants(spec.blocks[i], world):
            c.append(dataclasses.replace(spec, blocks=_replace_at(spec.blocks, i, v)))
        if isinstance(spec.blocks[i], Reuse):  # a copy of the block instead of its reuse
            c.append(dataclasses.replace(spec, blocks=_replace_at(spec.blocks, i, spec.blocks[spec.blocks[i].block])))
    for k, v in (("head", "none"), ("final_norm", None), ("mask", False), ("dropout", 0.0), ("head_bias", False),
                 ("seed", 0)):
        if getattr(spec, k) != v:
            c.append(dataclasses.replace(spec, **{k: v}))
    if spec.vocab and spec.head == "none":
        c.append(dataclasses.replace(spec, vocab=0))
    if spec.vocab:
        c += [dataclasses.replace(spec, vocab=v) for v in _smaller(spec.vocab, world, 2)]
    c += [dataclasses.replace(spec, width=w) for w in _smaller(spec.width, world)]
    c += [dataclasses.replace(spec, batch=n) for n in range(1, spec.batch)]
    c += [dataclasses.replace(spec, seq=n) for n in range(1, spec.seq)]
    seen, out = set(), []
    for s in c:
        r = spec_repr(s)
        if r in seen or s == spec:
            continue
        seen.add(r)
        try:
            a, kw = inputs(s)
            with torch.no_grad():
                build(s)(*a, **kw)
        except Exception:
            continue
        out.append(s)
    return sorted(out, key=lambda s: len(spec_repr(s)))


def shrink(spec: Spec, world: int, target: str, *, rounds: int = 40, log=None) -> Spec:
    """Greedily simplify ``spec`` while it still fails at ``world`` with ``failure_class`` ``target``
    (one spawn of ranks per round, every candidate of the round in it)."""
    for _ in range(rounds):
        cands = shrink_candidates(spec, world)
        if not cands:
            break
        results = run_specs(cands, world)
        nxt = next((s for s, r in zip(cands, results) if failure_class(summarize(r)) == target), None)
        if nxt is None:
            break
        spec = nxt
        if log:
            log(spec_repr(spec))
    return spec


# --------------------------------------------------------------------------- many specs on ranks

def _rank_main(rank, world, specs, start, init_file, out_dir):
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for i in range(start, len(specs)):
        res = check_spec(specs[i], world, rank)
        dist.barrier()  # every rank finished spec i before any starts i + 1
        tmp = os.path.join(out_dir, f".r{rank}_{i}")
        with open(tmp, "wb") as f:
            pickle.dump(res, f)
        os.replace(tmp, os.path.join(out_dir, f"r{rank}_{i}.pkl"))
    # Every result is on disk: leave without interpreter teardown (a rank process sometimes
    # aborts in C++ static destructors at exit, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _done(out_dir: str, world: int, n: int, start: int) -> int:
    """Index of the first spec from ``start`` that not every rank has finished."""
    i = start
    while i < n and all(os.path.exists(os.path.join(out_dir, f"r{r}_{i}.pkl")) for r in range(world)):
        i += 1
    return i


def run_specs(specs: list, world: int, *, hang_s: float = 120.0, log=None) -> list[list[Outcome]]:
    """Run every spec on ``world`` gloo ranks (one spawn, more only after a hang or a dead rank).

    Returns, per spec, each rank's ``Outcome``.  A spec on which no rank progresses for
    ``hang_s`` seconds is a ``hang`` (the ranks are killed, the run resumes after it); one on
    which a rank process dies is ``died``."""
    import torch.multiprocessing as mp

    results: list = [None] * len(specs)
    with tempfile.TemporaryDirectory() as out_dir:
        start, attempt = 0, 0
        while start < len(specs):
            attempt += 1
            init_file = os.path.join(out_dir, f"init{attempt}")
            ctx = mp.spawn(_rank_main, args=(world, specs, start, init_file, out_dir), nprocs=world, join=False)
            last, last_t, failure = start, time.monotonic(), None
            while True:
                try:
                    finished = ctx.join(timeout=0.5)
                except Exception as e:  # a rank exited with an error or a signal
                    failure = ("died", f"a rank process died: {type(e).__name__}: {e}")
                    break
                if finished:
                    break
                now = _done(out_dir, world, len(specs), start)
                if now != last:
                    last, last_t = now, time.monotonic()
                elif time.monotonic() - last_t > hang_s:
                    failure = ("hang", f"no rank finished the spec within {hang_s:.0f} s")
                    break
            if failure is not None:
                for p in ctx.processes:  # the processes this call started
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
            done = _done(out_dir, world, len(specs), start)
            for i in range(start, done):
                outs = []
                for r in range(world):
                    with open(os.path.join(out_dir, f"r{r}_{i}.pkl"), "rb") as f:
                        outs.append(pickle.load(f))
                results[i] = outs
                if log:
                    log(i, specs[i], outs)
            if done < len(specs):
                if failure is None:
                    failure = ("died", "the ranks exited before finishing")
                results[done] = [Outcome(failure[0], detail=failure[1]) for _ in range(world)]
                if log:
                    log(done, specs[done], results[done])
                done += 1
            start = done
    return results


def summarize(outs: list[Outcome]) -> Outcome:
    """One outcome for a spec from its ranks' outcomes (every rank must agree on the status)."""
    statuses = {o.status for o in outs}
    bad = [o for o in outs if o.failed]
    if bad:
        return bad[0]
    if len(statuses) > 1:
        return Outcome("asymmetric", outs[0].sharding,
                       "ranks disagree: " + ", ".join(f"rank {r}: {o.status}" for r, o in enumerate(outs)))
    return outs[0]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="run fuzz specs on gloo ranks (a repro printed by tests/test_fuzz.py)")
    ap.add_argument("spec", nargs="+", help="Spec(...) expressions, as the fuzz test prints them")
    ap.add_argument("--world", default="2", help="world sizes, comma-separated (default 2)")
    ap.add_argument("--shrink", action="store_true", help="minimize each failing spec (same failure class)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the whole traceback of a crash")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fuzz_models  # the ranks unpickle specs from this module, not __main__

    the_specs = [eval(x, vars(fuzz_models)) for x in a.spec]
    for w in [int(v) for v in a.world.split(",")]:
        for sp, res in zip(the_specs, fuzz_models.run_specs(the_specs, w)):
            o = fuzz_models.summarize(res)
            lines = o.detail.splitlines()
            print(f"world {w}: {o.status} (sharded: {o.sharding}) {fuzz_models.spec_repr(sp)}")
            print("  " + "\n  ".join(lines if a.verbose else lines[:2]))
            if o.replicated:
                print(f"  replicated: {o.replicated}")
            if a.shrink and o.failed:
                small = fuzz_models.shrink(sp, w, fuzz_models.failure_class(o), log=lambda r: print("  ->", r))
                print(f"  minimal: {fuzz_models.spec_repr(small)}")

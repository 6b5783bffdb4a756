"""Regression tests for the classes of silent wrong answers found by trying autotp on new models.

Each class has several instances, run on gloo ranks at world size 2 and 4 against the
unsharded model built from the same weights (forward, and where it matters backward):

1. a partial sum combined with a Python number, a replicated value, another partial sum,
   or a non-linear op must be all-reduced first;
2. reductions and scans (max/min with and without ``dim=``, amax, argmax, logsumexp,
   cumsum) are not pointwise: over the sharded dim they need the whole value, over other
   dims the shard moves -- and none of them crashes the analysis;
3. the zero padding of an uneven width must stay zero up to a row-parallel linear (or the
   layer is replicated), and finite all the way to a gather, forward and backward;
4. ranks given different inputs -- rows in another order, one changed element -- are told so,
   naming the argument.

Also single-process: a rule that raises becomes a replicated fallback with its reason (or, with
``strict=True``, a clear error).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autotp
from distributed import run_ranks_once

HIDDEN = 32     # divisible by 2 and 4
UNEVEN = 37     # padded at 2 and 4


class Partial(nn.Module):
    """fc1 (column) -> relu -> fc2 (row, no bias: its output is a partial sum) -> op(y, x)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(16, HIDDEN), nn.Linear(HIDDEN, 16, bias=False)

    def forward(self, x):
        return PARTIAL_OPS[self.op](self.fc2(torch.relu(self.fc1(x))), x)


PARTIAL_OPS = {
    "add_scalar": lambda y, x: y + 1.0,
    "sub_scalar": lambda y, x: y - 2.5,
    "rsub_scalar": lambda y, x: 3.0 - y,
    "partials_then_scalar": lambda y, x: (y + y) + 0.5,
    "add_replicated": lambda y, x: y + x,
    "mul_partials": lambda y, x: y * y,
    "div": lambda y, x: y / (x.abs() + 1.0),
    "relu": lambda y, x: torch.relu(y),
    "where": lambda y, x: torch.where(y > 0, y, torch.zeros_like(y)),
    "max_with_partial": lambda y, x: torch.maximum(y, x),
}


class Reduce(nn.Module):
    """fc1 (column: hidden sharded) -> op -> (fc2 where the op keeps the hidden dim)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(16, HIDDEN), nn.Linear(HIDDEN, 16)

    def forward(self, x):
        return REDUCE_OPS[self.op](self.fc1(x), self.fc2)


REDUCE_OPS = {  # name: (fn, stays sharded)
    "max_dim_sharded": lambda h, fc2: h.max(dim=-1).values,
    "max_dim_indices": lambda h, fc2: h.max(dim=-1)[1].float(),
    "min_dim_sharded": lambda h, fc2: torch.min(h, dim=1, keepdim=True).values,
    "amax_sharded": lambda h, fc2: h.amax(-1),
    "max_all": lambda h, fc2: torch.max(h).expand(3),
    "min_all_0d": lambda h, fc2: torch.min(h),
    "argmax_sharded": lambda h, fc2: h.argmax(-1).float(),
    "logsumexp_sharded": lambda h, fc2: torch.logsumexp(h, -1),
    "cumsum_sharded": lambda h, fc2: fc2(h.cumsum(-1)),
    "max_dim_unsharded": lambda h, fc2: fc2(h.max(dim=0, keepdim=True).values),
    "amin_unsharded": lambda h, fc2: fc2(h.amin(0, keepdim=True)),
    "cumsum_unsharded": lambda h, fc2: fc2(h.cumsum(0)),
}
REDUCE_SHARDED = {"max_dim_unsharded", "amin_unsharded", "cumsum_unsharded"}


class Uneven(nn.Module):
    """fc1 (column, 37 wide: padded) -> op -> fc2 (row)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(16, UNEVEN), nn.Linear(UNEVEN, 16)

    def forward(self, x):
        return self.fc2(UNEVEN_OPS[self.op](self.fc1(x)))


UNEVEN_OPS = {
    "exp": torch.exp,                                        # 0 -> 1 at the padding: not zero at fc2
    "sigmoid": torch.sigmoid,
    "add_one": lambda h: h + 1.0,
    "log": lambda h: torch.log(h.abs() + 1.0),               # finite, but log's padding goes through +1
    "reciprocal": lambda h: 1.0 / (h.abs() + 1.0),
    "div_by_shard": lambda h: torch.ones_like(h) / (h.abs() + 1.0),
    "rsqrt": lambda h: torch.rsqrt(h * h + 1.0),
    "pow_negative": lambda h: (h.abs() + 1.0) ** -1.5,
    "sqrt": lambda h: torch.sqrt(h.abs()),                   # sqrt(0) = 0, but its slope is infinite
    "masked_fill": lambda h: h.masked_fill(h == 0, -1e4),    # the padding is == 0
    # zero-preserving chains stay sharded
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "gelu_new": lambda h: 0.5 * h * (1.0 + torch.tanh(0.79788456 * (h + 0.044715 * torch.pow(h, 3.0)))),
    "silu_mul": lambda h: F.silu(h) * h,
}
UNEVEN_SHARDED = {"gelu_tanh", "gelu_new", "silu_mul"}


class UnevenHead(nn.Module):
    """A vocab-padded LM head (37 columns) whose logits go through exp before the gather: finite padding
    is dropped by the gather, and the gradient into it is zero."""

    def __init__(self):
        super().__init__()
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, UNEVEN)

    def forward(self, x):
        return torch.exp(self.head(self.norm(x)) * 0.1)


class TiedSliced(nn.Module):
    """A tied embedding / LM head whose ids go through a slice (XLM, XLNet, Gemma 4 do this): the table
    stays whole for the lookup and is sliced for the column head -- once a crash in lowering."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(128, 64), nn.Linear(64, 128, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids[:, 1:])))


class Twice(nn.Module):
    """One biased linear applied twice: its weight is wanted whole and split (found by tests/test_fuzz.py)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


class TiedHeadBias(nn.Module):
    """A tied embedding / LM head where the head has a bias (found by tests/test_fuzz.py)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(128, 64), nn.Linear(64, 128)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


class WeightT(nn.Module):
    """An MLP written ``x @ W.T`` (Falcon's linears): exported as ``aten.numpy_T``, still a linear."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, HIDDEN, bias=False), nn.Linear(HIDDEN, 16, bias=False)

    def forward(self, x):
        return torch.relu(x @ self.up.weight.T) @ self.down.weight.T


def _narrow(t, placement, world, rank):
    from autotp.placements import Shard, placement_index, take_shard

    if not isinstance(placement, Shard):
        return t
    return take_shard(t, placement.dim, *placement_index(placement, t.shape[placement.dim], world, rank))


def _check(model, world, rank, x, grads=True):
    """Forward (and backward) of ``model`` sharded, against the model itself."""
    sharded = autotp.shard(model, world, example_inputs=(x,))
    grads_in = grads and x.is_floating_point()
    xs, xr = x.clone().requires_grad_(grads_in), x.clone().requires_grad_(grads_in)
    out, ref = sharded(xs), model(xr)
    res = {"err": (out - ref).abs().max().item() / max(1.0, ref.abs().max().item()),
           "replicated": dict(sharded.plan.replicated),
           "sharded": sum(isinstance(p.placement, autotp.Shard) for p in sharded.plan.parameters.values())}
    if grads:
        out.float().square().mean().backward()
        ref.float().square().mean().backward()
        params = dict(model.named_parameters(remove_duplicate=False))
        worst = (xs.grad - xr.grad).abs().max().item() if grads_in else 0.0
        for name, p in sharded.module.named_parameters():
            want = _narrow(params[name].grad, sharded.plan.parameters[name].placement, world, rank)
            worst = max(worst, (p.grad - want).abs().max().item())  # padded rows: the reference is zero there
        res["grad_err"] = worst
    return res


def _run(rank: int, world: int) -> dict:
    res = {}
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    for kind, ops, cls in (("partial", PARTIAL_OPS, Partial), ("reduce", REDUCE_OPS, Reduce),
                           ("uneven", UNEVEN_OPS, Uneven)):
        for op in ops:
            torch.manual_seed(0)
            res[f"{kind}:{op}"] = _check(cls(op), world, rank, x, grads=kind != "reduce")
    torch.manual_seed(0)
    res["uneven_head"] = _check(UnevenHead(), world, rank, x)
    torch.manual_seed(0)
    res["tied_sliced_ids"] = _check(TiedSliced(), world, rank, torch.randint(0, 128, (2, 8)))
    torch.manual_seed(0)
    res["weight_T"] = _check(WeightT(), world, rank, x)
    torch.manual_seed(0)
    res["linear_twice"] = _check(Twice(), world, rank, x)
    torch.manual_seed(0)
    res["tied_head_bias"] = _check(TiedHeadBias(), world, rank, torch.randint(0, 128, (2, 8)))

    # 4. different inputs on different ranks, caught on the first call and named
    torch.manual_seed(0)
    sharded = autotp.shard(Partial("relu"), world, example_inputs=(x,))
    permuted = x[torch.randperm(6, generator=torch.Generator().manual_seed(1))] if rank == 1 else x
    nudged = x.clone()
    if rank == world - 1:
        nudged[4, 7] = torch.nextafter(nudged[4, 7], torch.tensor(10.0))  # one ulp, one element
    res["agreement"] = {}
    for name, args, kwargs in (("same", (x,), {}), ("permuted", (permuted,), {}), ("nudged", (nudged,), {})):
        sharded._inputs_checked = False
        try:
            sharded(*args, **kwargs)
            res["agreement"][name] = "no error"
        except ValueError as e:
            res["agreement"][name] = str(e)
    return res


def results(world: int) -> list[dict]:
    return run_ranks_once(_run, world)


CASES = ([f"partial:{op}" for op in PARTIAL_OPS] + [f"reduce:{op}" for op in REDUCE_OPS]
         + [f"uneven:{op}" for op in UNEVEN_OPS] + ["uneven_head", "tied_sliced_ids", "weight_T", "linear_twice",
                                                  "tied_head_bias"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_exact_or_replicated(case, world):
    for rank, per_rank in enumerate(results(world)):
        r = per_rank[case]
        assert r["err"] <= 1e-5, (rank, r)
        if "grad_err" in r:
            assert r["grad_err"] <= 1e-5, (rank, r)
        op = case.split(":")[-1]
        if case.startswith("partial:"):
            # the layers stay sharded: only where the all-reduce lands changes
            assert r["sharded"] == 3 and not r["replicated"], r
        if case.startswith("reduce:"):
            assert (r["sharded"] > 0) == (op in REDUCE_SHARDED), r
        if case.startswith("uneven:") and op in UNEVEN_SHARDED:
            assert r["sharded"] == 3 and not r["replicated"], r
        elif case.startswith("uneven:"):
            assert r["sharded"] == 0 and any("padding of an uneven shard" in why for why in r["replicated"].values()), r
        if case in ("tied_sliced_ids", "linear_twice"):
            # a weight read whole by one op and split by another is held whole, and the plan says so
            assert r["sharded"] == 0, r
            assert any("held whole, sliced where a shard is needed" in why for why in r["replicated"].values()), r
        if case == "weight_T":
            assert r["sharded"] == 2 and not r["replicated"], r
        if case == "uneven_head":
            assert r["sharded"] == 2 and not r["replicated"], r  # the head stays column (weight and bias)


@pytest.mark.parametrize("world", [2, 4])
def test_different_inputs_are_named(world):
    for r in results(world):
        a = r["agreement"]
        assert a["same"] == "no error", a
        assert "args[0] differ between ranks" in a["permuted"], a
        assert "args[0] differ between ranks" in a["nudged"], a


def test_a_rule_that_raises_becomes_a_replicated_fallback(monkeypatch):
    from autotp import rules

    def broken(ctx, node):
        raise KeyError("a bug in a rule")

    monkeypatch.setitem(rules.RULES, torch.ops.aten.relu, broken)
    p = autotp.plan(Partial("add_scalar"), 2, example_inputs=(torch.randn(6, 16),))
    assert all(not isinstance(v.placement, autotp.Shard) for v in p.parameters.values())
    assert any("placement rule for aten.relu.default failed (KeyError" in why for why in p.replicated.values()), p
    with pytest.raises(ValueError, match=r"strict=True and the placement rule for .*relu.* failed: KeyError"):
        autotp.plan(Partial("add_scalar"), 2, example_inputs=(torch.randn(6, 16),), strict=True)

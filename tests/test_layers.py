"""Layer-level conformance cases L1-L4, L7, L8 (``/work/shared/CONFORMANCE.md``).

Every case shards a small model with ``autotp.shard`` on 2 and 4 gloo ranks (CPU)
and compares it with the unsharded model built from the same seed: outputs,
gradients narrowed to each rank's shard, parameters after an optimizer step, and
the collectives issued (counted with ``CommDebugMode``).

Spawning ranks costs seconds, so all cases of one world size run in a single
``run_ranks`` call (``_run_cases``) that returns plain numbers per rank and case;
the tests below only assert on them.  A case that raises inside the ranks is
recorded as an error and fails the tests of that case, not the whole run.

The single-process tests (``test_plan_*``) check ``autotp.plan`` for the same
models: placements, collective counts, per-rank bytes.
"""
from __future__ import annotations

import copy
import re
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.tensor.debug import CommDebugMode

import autotp
from autotp.runtime import AllGather, AllReduce

from distributed import run_ranks

WORLD_SIZES = (2, 4)
ATOL, RTOL = 1e-5, 1.3e-6  # CONFORMANCE.md default fp32 tolerance
ALL_REDUCE_ONCE = {"allreduce_": 1}


# --------------------------------------------------------------------------- models
#
# Each builder seeds, builds the model, then draws its inputs from the same stream,
# so every rank (and the parent process) gets identical weights and inputs.

def build_l1(world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 10))
    return model, (torch.randn(8, 10),)


def build_l2(world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    return model, (torch.randn(8, 16),)


def build_l3(world):
    # odd sizes: in = 13*tp, out = 17*tp, batch 7; fp64 so 1e-6 measures the sharding, not rounding
    torch.manual_seed(3)
    d_in, d_out = 13 * world, 17 * world
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Linear(d_out, d_in)).double()
    return model, (torch.randn(7, d_in, dtype=torch.float64, requires_grad=True),)


class TokenEmbedding(nn.Module):
    """``emb(ids)`` with the ids a direct model input, so autotp makes the table vocab-parallel."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)

    def forward(self, ids):
        return self.emb(ids)


def build_l4(world):
    torch.manual_seed(4)
    model = TokenEmbedding(48, 16).double()
    return model, (torch.randint(0, 48, (17, 23)),)


class Attention(nn.Module):
    """Multi-head self-attention with an additive float mask, heads written out in ``view``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.o = nn.Linear(inner, dim)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, s, head_dim)
        k = self.k(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (b, 1, s, s) broadcasts over heads
        return self.o(y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


def build_l7(world):
    torch.manual_seed(7)
    batch, seq, dim = 5, 13, 12
    model = Attention(dim, num_heads=3 * world, head_dim=7)
    x = torch.randn(batch, seq, dim, requires_grad=True)
    causal = torch.zeros(seq, seq).masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    mask = (causal + 0.5 * torch.randn(batch, 1, seq, seq)).contiguous()
    return model, (x, mask)


def build_l8(world):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 12))
    return model, (torch.randn(6, 12),)


MLP_PLACEMENTS = {"0.weight": "S(0)", "0.bias": "S(0)", "2.weight": "S(1)", "2.bias": "R"}
CASES = {
    # name: (builder, expected placement of every parameter)
    "L1": (build_l1, MLP_PLACEMENTS),
    "L2": (build_l2, MLP_PLACEMENTS),
    "L3": (build_l3, {"0.weight": "S(0)", "0.bias": "S(0)", "1.weight": "S(1)", "1.bias": "R"}),
    "L4": (build_l4, {"emb.weight": "S(0)"}),
    "L7": (build_l7, {**{f"{p}.{t}": "S(0)" for p in "qkv" for t in ("weight", "bias")},
                      "o.weight": "S(1)", "o.bias": "R"}),
    "L8": (build_l8, MLP_PLACEMENTS),
}


# --------------------------------------------------------------------------- helpers run inside the ranks

def _narrow(t: torch.Tensor, placement: str, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous block of ``t`` under ``placement`` ("R" or "S(dim)"; sizes divide evenly)."""
    if placement == "R":
        return t
    dim = int(re.fullmatch(r"S\((\d+)\)", placement).group(1))
    block = t.shape[dim] // world
    assert block * world == t.shape[dim], f"test sizes must divide: {tuple(t.shape)} over {world}"
    return t.narrow(dim, rank * block, block)


def _comm_counts(comm: CommDebugMode) -> dict[str, int]:
    # keys are OpOverloadPackets such as c10d.allreduce_; keep the op name
    return {str(k).split(".")[-1]: int(v) for k, v in comm.get_comm_counts().items() if v}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    return (a.detach() - b.detach()).abs().max().item()


def _close(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_err": _max_err(a, b), "allclose": bool(torch.allclose(a.detach(), b.detach(), atol=ATOL, rtol=RTOL))}


def _shard(model, args, world, **options):
    sm = autotp.shard(copy.deepcopy(model), world, example_inputs=args, **options)
    with torch.no_grad():
        sm(*args)  # first call runs the 2-all-reduce input check; counted calls come after it
    return sm


def _param_checks(local: dict, ref: nn.Module, expected: dict, rank: int, world: int, what) -> dict:
    """Per parameter: ``what(p)`` of the local shard vs the reference narrowed to this rank."""
    ref_params = dict(ref.named_parameters())
    return {name: _close(what(local[name]), _narrow(what(ref_params[name]), pl, rank, world))
            for name, pl in expected.items()}


def _mlp_case(rank, world, name):
    """L1/L2: output, grads, one SGD step, collectives of forward+backward."""
    build, expected = CASES[name]
    ref, (x,) = build(world)
    target = torch.randn(x.shape[0], ref[-1].out_features)
    sm = _shard(ref, (x,), world)
    local = dict(sm.module.named_parameters())

    with CommDebugMode() as comm_fwd:
        out = sm(x)
    with CommDebugMode() as comm:  # forward + backward, input needs no grad
        out = sm(x)
        F.mse_loss(out, target).backward()
    ref_out = ref(x)
    F.mse_loss(ref_out, target).backward()

    res = {
        "placements": {n: repr(p.placement) for n, p in sm.plan.parameters.items()},
        "local_shapes": {n: list(p.shape) for n, p in local.items()},
        "output": _close(out, ref_out),
        "grads": _param_checks(local, ref, expected, rank, world, lambda p: p.grad),
        "comm_forward": _comm_counts(comm_fwd),
        "comm_forward_backward": _comm_counts(comm),
    }
    torch.optim.SGD(sm.parameters(), lr=0.25).step()
    torch.optim.SGD(ref.parameters(), lr=0.25).step()
    res["params_after_step"] = _param_checks(local, ref, expected, rank, world, lambda p: p)

    if name == "L2":
        res.update(_between_linears(sm, x))
    return res


class _RecordGelu(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.gelu_shapes = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        from autotp.ops import bias_gelu
        if target is torch.ops.aten.gelu.default or target is bias_gelu:  # composite, or the csrc/ kernel
            self.gelu_shapes.append(list(out.shape))
        return out


def _between_linears(sm, x) -> dict:
    """Where the lowered graph communicates, relative to the two linears, and the GeLU's local shape."""
    nodes = list(sm.module.graph.nodes)
    from autotp.runtime import ColumnLinear  # a column linear fused with its input-gradient all-reduce

    linears = [i for i, n in enumerate(nodes) if (n.op == "call_function" and n.target is torch.ops.aten.linear.default)
               or (n.op == "call_module" and isinstance(sm.module.get_submodule(n.target), ColumnLinear))]
    collectives = [i for i, n in enumerate(nodes) if n.op == "call_module"
                   and isinstance(sm.module.get_submodule(n.target), (AllReduce, AllGather))]
    between = [nodes[i].name for i in collectives if linears and linears[0] < i < linears[-1]]
    interp = _RecordGelu(sm.module)
    with torch.no_grad():
        interp.run(x)
    return {"num_linears": len(linears), "collectives_between_linears": between,
            "collectives_after_last_linear": sum(i > linears[-1] for i in collectives) if linears else -1,
            "gelu_shapes": interp.gelu_shapes}


def _l3_case(rank, world):
    """dL/dW, dL/db of both linears (narrowed) and dL/dX, fp64; collectives with an input that needs grad."""
    build, expected = CASES["L3"]
    ref, (x,) = build(world)
    weight = torch.randn(x.shape, dtype=torch.float64)  # loss = sum(y * weight): a non-uniform dL/dy
    sm = _shard(ref, (x,), world)
    local = dict(sm.module.named_parameters())

    xs = x.detach().clone().requires_grad_()
    with CommDebugMode() as comm_fwd:
        out = sm(xs)
    with CommDebugMode() as comm_bwd:
        (out * weight).sum().backward()
    ref_out = ref(x)
    (ref_out * weight).sum().backward()
    ref_params = dict(ref.named_parameters())
    return {
        "output_err": _max_err(out, ref_out),
        "grad_err": {n: _max_err(local[n].grad, _narrow(ref_params[n].grad, pl, rank, world))
                     for n, pl in expected.items()},
        "input_grad_err": _max_err(xs.grad, x.grad),
        "comm_forward": _comm_counts(comm_fwd),
        "comm_backward": _comm_counts(comm_bwd),
    }


def _l4_case(rank, world):
    """Vocab-parallel embedding, fp64: exact forward, weight grad of this rank's rows."""
    ref, (ids,) = build_l4(world)
    w = torch.randn(*ids.shape, 16, dtype=torch.float64)
    sm = _shard(ref, (ids,), world)
    local = dict(sm.module.named_parameters())
    with CommDebugMode() as comm_fwd:
        out = sm(ids)
    (out * w).sum().backward()
    ref_out = ref(ids)
    (ref_out * w).sum().backward()
    lw = local["emb.weight"]
    return {
        "placements": {n: repr(p.placement) for n, p in sm.plan.parameters.items()},
        "local_weight_shape": list(lw.shape),
        "forward_equal": bool(torch.equal(out, ref_out)),
        "forward_err": _max_err(out, ref_out),
        "weight_grad_err": _max_err(lw.grad, _narrow(ref.emb.weight.grad, "S(0)", rank, world)),
        "comm_forward": _comm_counts(comm_fwd),
    }


def _l7_case(rank, world):
    """Head-sharded attention: loss, input grad, weight grads; one all-reduce each way."""
    build, expected = CASES["L7"]
    ref, (x, mask) = build(world)
    # loss = sum(y * weight), weight ~ N(0, 1/numel): the loss is O(1) like a real loss, so its
    # fp32 rounding (~1e-7) stays well inside the 5e-6 bound while dL/dx is still O(1/sqrt(numel))
    weight = torch.randn(x.shape) / x.numel() ** 0.5
    sm = _shard(ref, (x, mask), world)
    local = dict(sm.module.named_parameters())

    xs = x.detach().clone().requires_grad_()
    with CommDebugMode() as comm_fwd:
        out = sm(xs, mask)
    loss = (out * weight).sum()
    with CommDebugMode() as comm_bwd:
        loss.backward()
    ref_loss = (ref(x, mask) * weight).sum()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    return {
        "local_shapes": {n: list(p.shape) for n, p in local.items()},
        "loss_err": abs(loss.item() - ref_loss.item()),
        "input_grad_err": _max_err(xs.grad, x.grad),
        "grad_err": {n: _max_err(local[n].grad, _narrow(ref_params[n].grad, pl, rank, world))
                     for n, pl in expected.items()},
        "comm_forward": _comm_counts(comm_fwd),
        "comm_backward": _comm_counts(comm_bwd),
    }


def _l8_case(rank, world):
    """Gather every rank's shards back along the shard dim; compare with the unsharded weights."""
    build, expected = CASES["L8"]
    ref, (x,) = build(world)
    sm = _shard(ref, (x,), world)
    local = dict(sm.module.named_parameters())
    full = dict(ref.named_parameters())
    res = {"equal_after_gather": {}, "local_numel": {}, "full_numel": {}}
    for name, pl in expected.items():
        t = local[name].detach().contiguous()
        if pl == "R":
            gathered = t
        else:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            gathered = torch.cat(parts, dim=int(pl[2]))
        res["equal_after_gather"][name] = bool(torch.equal(gathered, full[name].detach()))
        res["local_numel"][name] = t.numel()
        res["full_numel"][name] = full[name].numel()
    res["param_bytes_held"] = sum(p.numel() * p.element_size() for p in sm.module.parameters())
    res["plan_param_bytes_per_rank"] = sm.plan.memory["param_bytes_per_rank"]
    return res


RANK_CASES = {
    "L1": lambda rank, world: _mlp_case(rank, world, "L1"),
    "L2": lambda rank, world: _mlp_case(rank, world, "L2"),
    "L3": _l3_case,
    "L4": _l4_case,
    "L7": _l7_case,
    "L8": _l8_case,
}


def _run_cases(rank, world):
    """Every case on this rank; a case that raises becomes ``{"error": traceback}``.

    The failures this records come from ``autotp.shard`` or the model run, which are
    deterministic and identical on every rank, so no rank is left inside a collective.
    """
    results = {}
    for name, case in RANK_CASES.items():
        try:
            results[name] = case(rank, world)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    return results


# --------------------------------------------------------------------------- fixtures

_CACHE: dict[int, list[dict]] = {}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"tp{w}")
def world(request):
    return request.param


@pytest.fixture(scope="module")
def ranks(world):
    """Per-rank results of every case at this world size (one spawn per world size)."""
    if world not in _CACHE:
        _CACHE[world] = run_ranks(_run_cases, world)
    return _CACHE[world]


def case_results(ranks, name) -> list[dict]:
    """One case's results on every rank; re-raise a case that failed inside the ranks."""
    out = []
    for rank, res in enumerate(ranks):
        r = res[name]
        if "error" in r:
            raise AssertionError(f"{name} failed on rank {rank}:\n{r['error']}")
        out.append(r)
    return out


def assert_close(check: dict, what: str):
    assert check["allclose"], f"{what}: max error {check['max_err']:.3g} (atol {ATOL}, rtol {RTOL})"


# --------------------------------------------------------------------------- single-process plan

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tp", WORLD_SIZES)
def test_plan_placements_and_collectives(name, tp):
    build, expected = CASES[name]
    model, args = build(tp)
    plan = autotp.plan(model, tp, example_inputs=args)
    assert {n: repr(p.placement) for n, p in plan.parameters.items()} == expected
    for n, p in plan.parameters.items():
        want = list(p.global_shape)
        if expected[n] != "R":
            want[int(expected[n][2])] //= tp
        assert list(p.local_shape) == want, n
    # one all-reduce closes every sharded region (row-parallel output or vocab partial sum)
    assert plan.counts("forward") == {"all_reduce": 1}
    # parameter gradients need no collective; only an input that requires grad would (not counted by the plan)
    assert plan.counts("backward") == {}
    per_rank = sum(torch.Size(p.local_shape).numel() * (8 if p.dtype == torch.float64 else 4)
                   for p in plan.parameters.values())
    assert plan.memory["param_bytes_per_rank"] == per_rank


# --------------------------------------------------------------------------- L1 / L2: column -> row MLP

MLP = pytest.mark.parametrize("name", ["L1", "L2"])


@MLP
def test_mlp_output(ranks, name):
    for rank, r in enumerate(case_results(ranks, name)):
        assert r["placements"] == MLP_PLACEMENTS
        assert_close(r["output"], f"{name} rank {rank} output")


@MLP
def test_mlp_sharded_grads(ranks, world, name):
    d_hidden = {"L1": 16, "L2": 64}[name]
    for rank, r in enumerate(case_results(ranks, name)):
        assert r["local_shapes"]["0.weight"][0] == d_hidden // world
        assert r["local_shapes"]["2.weight"][1] == d_hidden // world
        for param, check in r["grads"].items():
            assert_close(check, f"{name} rank {rank} grad of {param}")


@MLP
def test_mlp_sgd_step(ranks, name):
    for rank, r in enumerate(case_results(ranks, name)):
        for param, check in r["params_after_step"].items():
            assert_close(check, f"{name} rank {rank} {param} after SGD(lr=0.25)")


@MLP
def test_mlp_one_all_reduce_forward_backward(ranks, name):
    for r in case_results(ranks, name):
        assert r["comm_forward"] == ALL_REDUCE_ONCE
        assert r["comm_forward_backward"] == ALL_REDUCE_ONCE  # input needs no grad: backward is local


def test_l2_gelu_runs_on_shard(ranks, world):
    for r in case_results(ranks, "L2"):
        assert r["num_linears"] == 2
        assert r["collectives_between_linears"] == []
        assert r["collectives_after_last_linear"] == 1
        assert r["gelu_shapes"] == [[8, 64 // world]]


# --------------------------------------------------------------------------- L3: analytic linear grads

def test_l3_linear_grads(ranks):
    for rank, r in enumerate(case_results(ranks, "L3")):
        assert r["output_err"] < 1e-6, rank
        for param, err in r["grad_err"].items():
            assert err < 1e-6, f"rank {rank} dL/d{param}: {err:.3g}"
        assert r["input_grad_err"] < 1e-6, f"rank {rank} dL/dX: {r['input_grad_err']:.3g}"


def test_l3_input_grad_all_reduce(ranks):
    # forward: the row output's all-reduce; backward: the all-reduce of dL/dX's partial sums
    for r in case_results(ranks, "L3"):
        assert r["comm_forward"] == ALL_REDUCE_ONCE
        assert r["comm_backward"] == ALL_REDUCE_ONCE


# --------------------------------------------------------------------------- L4: vocab-parallel embedding

def test_l4_vocab_embedding(ranks, world):
    for rank, r in enumerate(case_results(ranks, "L4")):
        assert r["placements"] == {"emb.weight": "S(0)"}
        assert r["local_weight_shape"] == [48 // world, 16]
        assert r["forward_equal"], f"rank {rank}: forward differs by {r['forward_err']:.3g}"
        assert r["weight_grad_err"] < 1e-12, f"rank {rank}: {r['weight_grad_err']:.3g}"
        assert r["comm_forward"] == ALL_REDUCE_ONCE


# --------------------------------------------------------------------------- L7: head-sharded attention

def test_l7_attention_loss_and_grads(ranks, world):
    for rank, r in enumerate(case_results(ranks, "L7")):
        assert r["local_shapes"]["q.weight"] == [3 * 7, 12]  # 3 whole heads per rank
        assert r["local_shapes"]["o.weight"] == [12, 3 * 7]
        assert r["loss_err"] < 5e-6, f"rank {rank} loss: {r['loss_err']:.3g}"
        assert r["input_grad_err"] < 5e-6, f"rank {rank} dL/dx: {r['input_grad_err']:.3g}"
        for param, err in r["grad_err"].items():
            assert err < 5e-6, f"rank {rank} dL/d{param}: {err:.3g}"


def test_l7_attention_collectives(ranks):
    for r in case_results(ranks, "L7"):
        assert r["comm_forward"] == ALL_REDUCE_ONCE
        # q, k and v read one CopyToRegion of x: dL/dx is all-reduced once, not three times
        assert r["comm_backward"] == ALL_REDUCE_ONCE


# --------------------------------------------------------------------------- L8: shard / unshard round trip

def test_l8_round_trip(ranks, world):
    for rank, r in enumerate(case_results(ranks, "L8")):
        assert r["equal_after_gather"] == dict.fromkeys(MLP_PLACEMENTS, True), rank
        n, total = r["local_numel"], r["full_numel"]
        assert n["0.weight"] * world == total["0.weight"]  # column: W/tp and b/tp
        assert n["0.bias"] * world == total["0.bias"]
        assert n["2.weight"] * world == total["2.weight"]  # row: W/tp and the full bias
        assert n["2.bias"] == total["2.bias"]
        assert r["param_bytes_held"] == 4 * sum(n.values())
        assert r["param_bytes_held"] == r["plan_param_bytes_per_rank"]

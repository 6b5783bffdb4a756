"""Single-process tests of the analysis: placement rules, plans, errors. No ranks."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import autotp
from autotp.placements import Replicate, Shard, shard_index
from autotp.rules import Unsupported, reshape_shard


def test_pieced_shard_index():
    # [q q q q | k | v] over 2 ranks: q split by rows, the one k and v row whole on both
    pieces = ((4, True), (1, False), (1, False))
    assert shard_index(6, 2, 1, pieces=pieces)[0].tolist() == [2, 3, 4, 5]
    assert autotp.placements.local_size(6, 2, pieces=pieces) == 4
    with pytest.raises(ValueError, match=r"do not lay out a dim of size 7 over 2 ranks"):
        shard_index(7, 2, 0, pieces=pieces)


class _FusedUneven(nn.Module):
    """A fused projection cut into q (4 heads of 4) and one k and one v head: multi-query attention's shapes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).split([16, 4, 4], dim=-1)
        b, s, _ = x.shape
        q = q.view(b, s, 4, 4).transpose(1, 2)
        k, v = (t.view(b, s, 1, 4).transpose(1, 2) for t in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, 16))


def test_split_fused_linears_gives_each_part_its_linear():
    from autotp.capture import capture
    from autotp.split_linears import split_fused_linears

    torch.manual_seed(0)
    model, x = _FusedUneven().eval(), torch.randn(2, 3, 8)
    gm = capture(model, (x,), None, dynamic=False)
    assert split_fused_linears(gm)
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [tuple(n.meta["val"].shape) for n in linears] == [(2, 3, 16), (2, 3, 4), (2, 3, 4), (2, 3, 8)]
    got = gm(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, model(x), rtol=1e-6, atol=1e-7)  # the same math, rounded per part
    assert not split_fused_linears(gm)  # nothing left to split
    # planned: q part sharded, k and v parts whole on every rank, the weight held in pieces
    plan = autotp.plan(model, 2, example_inputs=(x,))
    assert repr(plan.parameters["qkv.weight"].placement) == "S(0,pieces=16S+4R+4R)"
    assert repr(plan.parameters["out.weight"].placement) == "S(1)"


def test_reshape_splits_projection_into_whole_heads():
    # (B, S, 768) -> (B, S, 12, 64): the shard lands on the heads dim
    assert reshape_shard((2, 8, 768), (2, 8, 12, 64), Shard(2), 2) == Shard(2)
    # and back
    assert reshape_shard((2, 8, 12, 64), (2, 8, 768), Shard(2), 2) == Shard(2)


def test_reshape_of_fused_qkv_needs_chunks():
    # [q|k|v] viewed as (3, H, D) with a contiguous shard would give rank 0 all of q
    with pytest.raises(Unsupported) as e:
        reshape_shard((2, 8, 3 * 64), (2, 8, 3, 4, 16), Shard(2), 2)
    assert e.value.chunk_factor == 3
    assert reshape_shard((2, 8, 3 * 64), (2, 8, 3, 4, 16), Shard(2, chunks=3), 2) == Shard(3)


def test_reshape_heads_not_divisible_names_the_numbers():
    with pytest.raises(Unsupported, match=r"num_heads \(6\) is not divisible by world_size \(4\)"):
        reshape_shard((2, 8, 384), (2, 8, 6, 64), Shard(2), 4)


def test_chunked_shard_index():
    idx, pad = shard_index(12, 2, 1, chunks=3)
    assert idx.tolist() == [2, 3, 6, 7, 10, 11] and pad == 0
    idx, pad = shard_index(99, 4, 3)  # padded vocab: 25 rows per rank, the last has 24 real ones
    assert idx.tolist() == list(range(75, 99)) and pad == 1


def _mlp(names=("fc1", "fc2")):
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, names[0], nn.Linear(16, 64))
            setattr(self, names[1], nn.Linear(64, 16))

        def forward(self, x):
            return getattr(self, names[1])(torch.relu(getattr(self, names[0])(x)))

    return MLP()


def test_mlp_plan_column_then_row():
    p = autotp.plan(_mlp(), 2, example_inputs=(torch.randn(4, 16),))
    assert p.parameters["fc1.weight"].placement == Shard(0)
    assert p.parameters["fc1.bias"].placement == Shard(0)
    assert p.parameters["fc2.weight"].placement == Shard(1)
    assert p.parameters["fc2.bias"].placement == Replicate()
    assert p.counts("forward") == {"all_reduce": 1}
    data = json.loads(p.to_json())
    assert data["parameters"]["fc1.weight"]["local_shape"] == [32, 16]
    assert data["collectives"][0] == {"op": "all_reduce", "reduce": "sum", "phase": "forward", "kind": "all_reduce",
                                      "change": "P -> R", "shape": [4, 16], "local_shape": [4, 16],
                                      "dtype": "float32", "bytes": 4 * 16 * 4, "at": data["collectives"][0]["at"],
                                      "consumers": ["output"], "why": "P -> R"}  # the bias joined on rank 0
    # two 64x16 weights and a 64 bias sharded over 2 ranks, plus the replicated 16 bias; fp32
    assert data["memory"]["param_bytes_per_rank"] == 4 * ((2 * 64 * 16 + 64) // 2 + 16)
    assert data["memory"]["param_bytes_total"] == 4 * (2 * 64 * 16 + 64 + 16)


def test_renamed_modules_shard_the_same():
    a = autotp.plan(_mlp(("fc1", "fc2")), 2, example_inputs=(torch.randn(4, 16),))
    b = autotp.plan(_mlp(("zebra", "apple")), 2, example_inputs=(torch.randn(4, 16),))
    assert [p.placement for p in a.parameters.values()] == [p.placement for p in b.parameters.values()]


def test_mlp_feeding_layer_norm_stays_replicated():
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64))
    p = autotp.plan(model, 2, example_inputs=(torch.randn(4, 16),))
    assert p.parameters["0.weight"].placement == Replicate()
    assert "layer_norm over the sharded dim" in p.replicated["0.weight"]
    assert p.counts("forward") == {}


class Attention(nn.Module):
    def __init__(self, heads: int, head_dim: int = 8):
        super().__init__()
        self.h, self.d = heads, head_dim
        e = heads * head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        b, s, e = x.shape
        q, k, v = (m(x).view(b, s, self.h, self.d).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, e))


def test_heads_not_divisible_replicates_and_says_so():
    p = autotp.plan(Attention(6), 4, example_inputs=(torch.randn(2, 5, 48),))
    assert all(v.placement == Replicate() for v in p.parameters.values())
    assert any("num_heads (6) is not divisible by world_size (4)" in why for why in p.replicated.values())
    with pytest.raises(ValueError, match=r"num_heads \(6\) is not divisible by world_size \(4\)"):
        autotp.plan(Attention(6), 4, example_inputs=(torch.randn(2, 5, 48),), config=autotp.ShardConfig(strict=True))


def test_attention_sharded_by_heads():
    p = autotp.plan(Attention(4), 2, example_inputs=(torch.randn(2, 5, 32),))
    assert [p.parameters[f"{n}.weight"].placement for n in "qkvo"] == [Shard(0), Shard(0), Shard(0), Shard(1)]
    assert p.counts("forward") == {"all_reduce": 1}
    assert p.counts("backward") == {}  # the input needs no grad, so its gradient is never reduced


def test_gpt2_fused_qkv_is_chunked_by_three():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_positions=32, vocab_size=100)).eval()
    p = autotp.plan(model, 2, example_inputs=(torch.randint(0, 100, (1, 8)),), example_kwargs={"use_cache": False})
    assert p.parameters["transformer.h.0.attn.c_attn.weight"].placement == Shard(1, chunks=3)
    assert p.parameters["transformer.h.0.attn.c_proj.weight"].placement == Shard(0)
    assert p.parameters["lm_head.weight"].local_shape == (50, 64)  # tied, vocab-parallel
    assert "transformer.wte.weight" not in p.parameters  # one name per tied tensor
    assert p.counts("forward") == {"all_reduce": 3, "all_gather": 1}
    # the inputs of c_attn (q, k, v at once), c_fc and the LM head: one gradient all-reduce each
    assert p.counts("backward") == {"all_reduce": 3}


def test_capture_error_says_what_to_try():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.lin(x)
            return x

    with pytest.raises(autotp.CaptureError, match="what to try") as e:
        autotp.plan(Branchy(), 2, example_inputs=(torch.randn(2, 4),))
    assert "Branchy" in str(e.value)


def test_shard_without_ranks_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node 2"):
        autotp.shard(_mlp(), 2, example_inputs=(torch.randn(4, 16),))


def test_world_size_one_runs_unsharded_graph():
    model = _mlp()
    x = torch.randn(4, 16)
    sharded = autotp.shard(model, 1, example_inputs=(x,))
    torch.testing.assert_close(sharded(x), model(x), rtol=0, atol=0)


def test_gather_outputs_false_leaves_logits_local():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_positions=32, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 8))
    kw = {"labels": ids, "use_cache": False}
    full = autotp.plan(model, 2, example_inputs=(ids,), example_kwargs=kw)
    local = autotp.plan(model, 2, example_inputs=(ids,), example_kwargs=kw, gather_outputs=False)
    assert full.counts("forward") == {"all_reduce": 5, "all_gather": 1}  # embedding 1 + layer 2 + loss 2
    assert local.counts("forward") == {"all_reduce": 5}


def test_generation_steps_keep_the_cache_sharded_by_heads():
    """The decode graph declares its past K/V with the prefill's present placements (heads,
    Shard(1)); nothing gathers them, and the step's plan is 2 all-reduces per layer + 1."""
    import transformers

    from autotp.steps import capture_steps
    from autotp.pipeline import plan_graph

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                                                 vocab_size=128)).eval()
    config = autotp.ShardConfig()
    _, prefill, decode, n, past_at = capture_steps(model)
    assert (n, past_at) == (2, 3)  # input_ids, attention_mask, position_ids, then the past
    p_pre = plan_graph(prefill, 2, config, local_outputs=set(range(1, 5)))
    cache = p_pre.outputs[1:]
    assert cache == [Shard(1)] * 4
    p_dec = plan_graph(decode, 2, config, input_placements={3 + i: p for i, p in enumerate(cache)},
                       local_outputs=set(range(1, 5)))
    past = [x.name for x in decode.graph.nodes if x.op == "placeholder"][3:]
    assert not [s for s in p_dec.steps if s.src in past]  # the cache is never communicated
    assert p_dec.outputs[1:] == cache
    assert p_dec.counts("forward") == {"all_reduce": 5, "all_gather": 1}
    # position ids come from the caller here, yet the position table stays replicated
    wpe = next(n for n in decode.graph.nodes if n.op == "get_attr" and n.target.endswith("wpe.weight"))
    assert p_dec.node(wpe).placement == Replicate()
    # without the declaration the past would be taken as replicated and sliced: the check can fail
    plain = plan_graph(decode, 2, config, local_outputs=set(range(1, 5)))
    assert [s for s in plain.steps if s.src in past]
    # the same decisions, planned in one process by the public entry, named as the model names them
    plans = autotp.plan_generation(model, 2)
    assert plans["decode"].counts("forward") == {"all_reduce": 5, "all_gather": 1}
    assert plans["decode"].parameters["transformer.h.0.attn.c_attn.weight"].placement == Shard(1, chunks=3)


class _SelectiveSSM(nn.Module):
    """A Mamba-style mixer written out (neutral names): in-projection chunked into x and a gate,
    a causal depthwise conv, x projected to dt, B, C, a left-multiplied dt projection, A read as
    ``-exp(a.float())``, a selective scan as a loop over the sequence, an out-projection."""

    def __init__(self, h=16, d=32, n=4, r=4):
        super().__init__()
        self.r, self.n = r, n
        self.inp = nn.Linear(h, 2 * d)
        self.conv = nn.Conv1d(d, d, 3, groups=d, padding=2)
        self.xp = nn.Linear(d, r + 2 * n, bias=False)
        self.w_dt = nn.Parameter(torch.randn(d, r))
        self.b_dt = nn.Parameter(torch.randn(d))
        self.a = nn.Parameter(torch.randn(d, n))
        self.skip = nn.Parameter(torch.randn(d))
        self.out = nn.Linear(d, h)

    def forward(self, x):  # (B, L, h)
        length = x.shape[1]
        u, z = self.inp(x).transpose(1, 2).chunk(2, dim=1)  # (B, d, L) each
        u = nn.functional.silu(self.conv(u)[..., :length])
        dt, b, c = self.xp(u.transpose(1, 2)).split([self.r, self.n, self.n], dim=-1)
        dt = nn.functional.softplus(self.w_dt @ dt.transpose(1, 2) + self.b_dt.float()[:, None])  # (B, d, L)
        decay = torch.exp(-torch.exp(self.a.float())[None, :, None, :] * dt[..., None])  # (B, d, L, n)
        state = torch.zeros(x.shape[0], u.shape[1], self.n)
        ys = []
        for t in range(length):
            state = decay[:, :, t] * state + dt[:, :, t, None] * b[:, None, t, :] * u[:, :, t, None]
            ys.append((state @ c[:, t, :, None])[..., 0])
        y = torch.stack(ys, -1) + u * self.skip[None, :, None]
        return self.out((y * nn.functional.silu(z)).transpose(1, 2))


def test_selective_ssm_sharded_by_channels():
    # Megatron's Mamba plan, found from the ops: in-projection column-parallel (x and the gate each
    # split by channels), conv, dt projection, A and the skip per channel, x's projection and the
    # out-projection row-parallel: two all-reduces forward; backward one, for dt, B and C together
    torch.manual_seed(0)
    p = autotp.plan(_SelectiveSSM(), 2, example_inputs=(torch.randn(2, 5, 16),))
    want = {"inp.weight": Shard(0, chunks=2), "inp.bias": Shard(0, chunks=2), "conv.weight": Shard(0),
            "conv.bias": Shard(0), "xp.weight": Shard(1), "w_dt": Shard(0), "b_dt": Shard(0), "a": Shard(0),
            "skip": Shard(0), "out.weight": Shard(1), "out.bias": Replicate()}
    assert {n: p.parameters[n].placement for n in want} == want
    assert p.counts("forward") == {"all_reduce": 2}
    assert p.counts("backward") == {"all_reduce": 1}  # the input needs no grad; dt, B, C: one copy
    conv = next(n for n, d in p.nodes.items() if d.why.startswith("depthwise convolution"))
    assert p.nodes[conv].local_args == {"local_arg": 6}  # groups, made local by localize_shapes


def test_parameter_also_read_whole_stays_whole():
    # fc1.weight is column-parallel in the linear, and read whole through a cast and a reshape:
    # held whole (sliced for the linear), with the reason -- never its shard read as the whole
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) + self.fc1.weight.float().reshape(-1)[:16]

    p = autotp.plan(M(), 2, example_inputs=(torch.randn(4, 16),))
    assert p.parameters["fc1.weight"].placement == Replicate()
    assert "fc1.weight" in p.replicated
    assert p.parameters["fc2.weight"].placement == Shard(1)

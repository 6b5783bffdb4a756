"""Regional capture (``autotp.regions``): each distinct repeated block traced once, its graph reused.

The promise is that nothing changes but the time: the stitched graph is the graph a whole
``torch.export`` makes -- the same code, node names, module paths and value metadata -- so the
plan is the same plan.  Every model case of the suite is captured both ways and compared, and
so are models built to break a careless reuse: blocks of one class that compute different
things, glue that hands identical blocks different inputs, a block that reads a plain tensor
attribute, a block that cannot run on ``meta``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from autotp.capture import capture
from autotp.pipeline import plan_graph
from autotp.config import ShardConfig
from autotp.regions import block_runs

from model_cases import CASES, LLAMA, _causal, _lm_inputs


def _both(model, args, kwargs):
    torch.manual_seed(0)
    seen = {}
    whole = capture(model, args, kwargs, regions=False)
    stitched = capture(model, args, kwargs, regions=True, progress=lambda n, t: seen.update(blocks=n, traced=t))
    return whole, stitched, seen


def _assert_same_graph(whole, stitched):
    assert stitched.code == whole.code
    for a, b in zip(whole.graph.nodes, stitched.graph.nodes, strict=True):
        assert (a.name, a.op, str(a.target)) == (b.name, b.op, str(b.target))
        stack_a = [p for p, _ in (a.meta.get("nn_module_stack") or {}).values()]
        stack_b = [p for p, _ in (b.meta.get("nn_module_stack") or {}).values()]
        assert stack_a == stack_b, a.name
        va, vb = a.meta.get("val"), b.meta.get("val")
        if isinstance(va, torch.Tensor):
            assert (va.shape, va.dtype, va.stride()) == (vb.shape, vb.dtype, vb.stride()), a.name
        if a.op == "get_attr":
            ta, tb = getattr_path(whole, a.target), getattr_path(stitched, b.target)
            if "lifted_tensor" in a.target:  # a constant made in forward: each capture makes its own
                assert torch.equal(ta, tb) and ta.dtype == tb.dtype, a.target
            else:  # the model's own parameter or buffer, shared, not copied
                assert ta is tb, a.target


def getattr_path(gm, target):
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm


def _assert_same_plans(whole, stitched, worlds=(2, 4)):
    for world in worlds:
        a = plan_graph(whole, world, ShardConfig()).to_json()
        b = plan_graph(stitched, world, ShardConfig()).to_json()
        assert a == b, f"plans differ at world size {world}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_model_case_captures_the_same_graph_and_plan(case):
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = case.inputs()
    whole, stitched, seen = _both(model, args, kwargs)
    if block_runs(model):
        assert seen, "regional capture fell back to a whole capture"
        # GPT-Neo's two layers are one global and one local attention: two computations
        assert seen["traced"] == (2 if case.name == "M7_gpt_neo" else 1), seen
    _assert_same_graph(whole, stitched)
    _assert_same_plans(whole, stitched)
    out_w, out_s = whole(*args, **kwargs), stitched(*args, **kwargs)
    assert torch.equal(case.output(out_w), case.output(out_s))


def test_t5_first_block_and_the_rest_are_two_structures():
    # T5's first block of each stack owns the relative position bias and hands it to the others.
    import transformers

    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=4, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 8))
    whole, stitched, seen = _both(model, (ids,), {"decoder_input_ids": ids[:, :5], "use_cache": False})
    assert seen == {"blocks": 6, "traced": 2}  # encoder blocks 1-3 share one graph, decoder blocks 1-3 another
    _assert_same_graph(whole, stitched)
    _assert_same_plans(whole, stitched)


def test_alternating_attention_masks_are_read_from_the_glue():
    # Gemma-2: sliding and full attention layers alternate; the model picks each layer's mask.
    import transformers

    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_hidden_layers=4, vocab_size=128, sliding_window=4)).eval()
    ids = torch.randint(0, 128, (2, 10))
    whole, stitched, seen = _both(model, (ids,), {"use_cache": False})
    assert seen["blocks"] == 4
    _assert_same_graph(whole, stitched)
    _assert_same_plans(whole, stitched)
    assert torch.equal(whole(ids, use_cache=False).logits, stitched(ids, use_cache=False).logits)


class _Block(nn.Module):
    def __init__(self, width, act="gelu", scale=1.0, flip=False):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.act, self.scale, self.flip = act, scale, flip

    def forward(self, x, bias=None):
        h = self.up(x)
        h = torch.nn.functional.gelu(h) if self.act == "gelu" else torch.relu(h)
        y = self.down(h) * self.scale
        if bias is not None:
            y = y + bias
        return x + (y.flip(-1) if self.flip else y)


class _Stack(nn.Module):
    def __init__(self, blocks, width=16):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(blocks)
        self.extra = nn.Parameter(torch.randn(width))

    def forward(self, x):
        x = self.inp(x)
        for i, block in enumerate(self.blocks):
            x = block(x, bias=self.extra if i % 2 else None)  # the glue hands odd blocks another input
        return x


def test_look_alike_blocks_that_compute_differently_get_their_own_graphs():
    torch.manual_seed(0)
    w = 16
    blocks = [_Block(w), _Block(w), _Block(w, act="relu"), _Block(w), _Block(w, scale=0.5), _Block(w, flip=True),
              _Block(w), _Block(w)]
    model = _Stack(blocks, w).eval()
    x = torch.randn(3, w)
    assert len(block_runs(model)) == 8  # one signature for all: the signature only picks candidates
    whole, stitched, seen = _both(model, (x,), {})
    # (plain, no bias), (plain, bias), relu, scale 0.5, flip: five computations; blocks 1, 3, 7 share one
    assert seen == {"blocks": 8, "traced": 5}
    _assert_same_graph(whole, stitched)
    _assert_same_plans(whole, stitched)
    assert torch.equal(whole(x), stitched(x))
    assert torch.equal(whole(x), model(x))


class _Scaled(nn.Module):
    """Reads a plain tensor attribute (not a parameter or buffer): equal only to itself."""

    def __init__(self, width, value):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.table = torch.full((width,), value)

    def forward(self, x):
        return x + self.lin(x) * self.table


def test_plain_tensor_attributes_are_never_assumed_equal():
    # On meta (planning a big model): the blocks run, and each attribute is equal only to itself.
    torch.manual_seed(0)
    with torch.device("meta"):
        model = _Stack([_Scaled(16, 1.0), _Scaled(16, 2.0), _Scaled(16, 3.0)]).eval()
    model.forward = lambda x: _run_plain(model, x)
    x = torch.randn(2, 16, device="meta")
    whole, stitched, seen = _both(model, (x,), {})
    assert seen == {"blocks": 3, "traced": 3}
    _assert_same_graph(whole, stitched)
    # On CPU the attribute is a CPU tensor a meta run cannot read: the model is captured whole.
    torch.manual_seed(0)
    model = _Stack([_Scaled(16, 1.0), _Scaled(16, 2.0), _Scaled(16, 3.0)]).eval()
    model.forward = lambda x: _run_plain(model, x)
    x = torch.randn(2, 16)
    whole, stitched, seen = _both(model, (x,), {})
    assert seen == {}
    assert torch.equal(stitched(x), _run_plain(model, x))


def _run_plain(model, x):
    x = model.inp(x)
    for block in model.blocks:
        x = block(x)
    return x


class _DataDependent(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        scale = x.abs().amax().item()  # needs a value: no meta run, so the model is captured whole
        return x + self.lin(x) * scale


def test_a_block_that_cannot_run_on_meta_falls_back_to_a_whole_capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(_DataDependent(8), _DataDependent(8))).eval()
    x = torch.randn(2, 8)
    seen = {}
    stitched = capture(model, (x,), {}, regions=True, progress=lambda n, t: seen.update(blocks=n, traced=t))
    assert seen == {}  # captured whole
    assert torch.allclose(stitched(x), model(x))


def test_planning_a_deep_llama_on_meta_reuses_one_block():
    # The 70B preset's shape in miniature: many identical layers on the meta device.
    with torch.device("meta"):
        model = _causal("LlamaForCausalLM", "LlamaConfig", **{**LLAMA, "num_hidden_layers": 12})()
    (ids,), kwargs = _lm_inputs()()
    whole, stitched, seen = _both(model, (ids.to("meta"),), kwargs)
    assert seen == {"blocks": 12, "traced": 1}
    _assert_same_graph(whole, stitched)
    _assert_same_plans(whole, stitched, worlds=(2, 8))


def test_a_block_called_twice_is_two_calls():
    # Weight sharing (ALBERT-like): one block run at two places, with different inputs.
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_Block(8), _Block(8)])
            self.extra = nn.Parameter(torch.randn(8))

        def forward(self, x):
            x = self.blocks[0](x)
            x = self.blocks[1](x, bias=self.extra)
            x = self.blocks[0](x, bias=self.extra)  # the first block again, now with a bias
            return self.blocks[1](x)

    model = Net().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():  # (with grad, the first call's input alone would not require grad: a third graph)
        whole, stitched, seen = _both(model, (x,), {})
    assert seen == {"blocks": 4, "traced": 2}
    _assert_same_graph(whole, stitched)
    assert torch.equal(stitched(x), model(x))


class _WritesInput(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x, taps):
        x.mul_(2.0)  # the caller's tensor changes: a trace that keeps this block opaque would miss it
        return self.lin(x)


class _ViewOfInput(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x, taps):
        x.mul_(self.scale)  # (the view returned below shares the input's memory)
        return x[:, :]


class _Taps(nn.Module):
    """Appends an extra output to a list its caller gave it (the fuzzer's ``tap`` ops)."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x, taps):
        y = self.lin(x)
        taps.append(y.logsumexp(-1))
        return y


class _Counts(nn.Module):
    """Keeps its last output on itself."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x, taps):
        self.last = self.lin(x)
        return self.last


class _HookedInside(_Counts):
    def __init__(self, width):
        super().__init__(width)
        self.lin.register_forward_hook(lambda mod, inp, out: out * 2.0)

    def forward(self, x, taps):
        return self.lin(x)


@pytest.mark.parametrize("block", [_WritesInput, _ViewOfInput, _Taps, _Counts, _HookedInside])
def test_blocks_with_side_effects_are_captured_whole(block):
    # An opaque block's side effects -- on its input, a list it was given, its own attributes, or
    # through hooks inside it -- would be missing from the trace around it.
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([block(8), block(8)])

        def forward(self, x):
            h, taps = x * 1.0, []
            for b in self.blocks:
                h = b(h, taps) + h  # reads h after the block ran
            return (h, *taps)

    model = Net().eval()
    x = torch.randn(2, 8)
    seen = {}
    with torch.no_grad():
        got = capture(model, (x,), {}, regions=True, progress=lambda n, t: seen.update(blocks=n, traced=t))(x)
        want = model(x)
    assert seen == {}
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_blocks_called_in_a_no_grad_region_are_captured_whole():
    # (HRM runs some of its cycles under no_grad: export nests them in a subgraph, where a block
    # call would not be stitched.)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_Block(8), _Block(8)])

        def forward(self, x):
            with torch.no_grad():
                x = self.blocks[0](x)
            return self.blocks[1](x)

    model = Net().eval()
    x = torch.randn(2, 8)
    seen = {}
    got = capture(model, (x,), {}, regions=True, progress=lambda n, t: seen.update(blocks=n, traced=t))(x)
    assert seen == {}
    assert torch.equal(got, model(x))

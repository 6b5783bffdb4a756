"""Run where the user runs: a graph captured on one device runs on another (``ShardConfig.device``).

Without a GPU here, ``meta`` stands in for the target: a model captured on CPU and
lowered for ``meta`` must hold no CPU tensor and no CPU device constant, and run on
``meta`` inputs (every op then checks that its operands share a device).
"""
from __future__ import annotations

import operator

import pytest
import torch
from torch.fx import Graph, GraphModule
from torch.utils import _pytree as pytree

from distributed import run_ranks_once

CPU = torch.device("cpu")


def _llama():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, num_hidden_layers=2,
        vocab_size=101)).eval()


def _gpt2():
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=99)).eval()


BUILD = {"llama": _llama, "gpt2": _gpt2}


def _device_constants(gm: GraphModule) -> list[tuple[str, torch.device]]:
    """Every ``torch.device`` an op of ``gm`` or of one of its subgraphs (higher-order ops) is given."""
    return [(n.name, d) for g in gm.modules() if isinstance(g, GraphModule) for n in g.graph.nodes
            if n.op == "call_function" for d in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(d, torch.device)]


def _tensors_off(gm, device) -> list[str]:
    state = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return [n for n, t in state if t.device != device]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cpu_capture_retargeted_to_meta_holds_no_cpu_constant(kind):
    import autotp
    from autotp.capture import capture

    model = BUILD[kind]()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    captured = capture(model, (ids,), {"use_cache": False})
    assert any(d == CPU for _, d in _device_constants(captured)), "the capture holds CPU constants to retarget"

    sharded = autotp.shard(model, 1, example_inputs=(ids,), example_kwargs={"use_cache": False}, device="meta")
    gm = sharded.module
    assert [c for c in _device_constants(gm) if c[1] != torch.device("meta")] == []
    assert _tensors_off(gm, torch.device("meta")) == []
    out = sharded(ids.to("meta"), use_cache=False).logits  # every op checks its operands' devices
    assert out.device.type == "meta" and tuple(out.shape) == (2, 8, model.config.vocab_size)
    # the user's model is untouched: its weights stay on the CPU
    assert all(p.device == CPU for p in model.parameters())


def _lowered_for_meta(rank: int, world: int) -> dict:
    import autotp

    model = _llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False}, device="meta")
    gm = sharded.module
    shapes_ok = all(tuple(p.shape) == tuple(sharded.plan.parameters[n].local_shape)
                    for n, p in gm.named_parameters())
    return {"constants": [str(d) for _, d in _device_constants(gm) if d.type != "meta"],
            "off": _tensors_off(gm, torch.device("meta")), "shapes_ok": shapes_ok,
            "sharded": sum(1 for p in sharded.plan.parameters.values()
                           if isinstance(p.placement, autotp.placements.Shard))}


def test_sharded_lowering_places_local_shards_on_the_run_device():
    for r in run_ranks_once(_lowered_for_meta, 2):
        assert r["sharded"] > 0 and r["shapes_ok"], r
        assert r["constants"] == [] and r["off"] == [], r


def test_from_pretrained_loads_each_shard_onto_the_run_device(tmp_path):
    """Shard-on-load with ``device=``: the generation steps (prefill, decode) hold no CPU tensor and
    no CPU device constant, and the shards hold the checkpoint's values."""
    import autotp

    model = _llama()
    model.save_pretrained(tmp_path)
    lm = autotp.from_pretrained(str(tmp_path), 1, device="meta")
    meta = torch.device("meta")
    for step in (lm.autotp_steps.prefill, lm.autotp_steps.decode):
        assert [c for c in _device_constants(step) if c[1] != meta] == []
        assert _tensors_off(step, meta) == []
    assert lm.autotp_load_stats["bytes_read"] > 0
    cpu = autotp.from_pretrained(str(tmp_path), 1)  # the same load, kept on the CPU: the checkpoint's values
    ref = dict(model.named_parameters())
    names = {pp.target: pp.name for pp in cpu.autotp_steps.plans["prefill"].parameters.values()}
    loaded = list(cpu.autotp_steps.prefill.named_parameters())
    assert loaded and all(torch.equal(p, ref[names[target]]) for target, p in loaded)


def test_positional_device_arguments_are_retargeted():
    """``aten.to.device(x, device, dtype)`` takes its device positionally: the schema, not a keyword, finds it."""
    from autotp.passes import LoweringContext, retarget_device
    from autotp.plan import Plan

    g = Graph()
    x = g.placeholder("x")
    moved = g.call_function(torch.ops.aten.to.device, (x, CPU, torch.float64))
    r = g.call_function(torch.ops.aten.arange.start, (0, 4), {"device": CPU, "dtype": torch.float64})
    g.output(g.call_function(operator.add, (moved, r)))
    gm = GraphModule(torch.nn.Module(), g)
    ctx = LoweringContext(plan=Plan.__new__(Plan), rank=0, world_size=1, comm=None, seed=0,
                          device=torch.device("meta"))
    gm = retarget_device(gm, ctx).graph_module
    gm.recompile()
    assert [d for _, d in _device_constants(gm) if d != torch.device("meta")] == []
    assert gm(torch.zeros(4, device="meta")).device.type == "meta"


def test_device_constants_inside_higher_order_op_subgraphs_are_retargeted():
    """A region under ``torch.autocast`` / ``torch.no_grad`` is captured as a higher-order op whose
    body is a subgraph module: its constants move too."""
    import autotp

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                pos = torch.arange(x.shape[-1], device=x.device, dtype=torch.float32)
            return self.down(torch.relu(self.up(x + pos)))

    model, x = M(), torch.randn(2, 8)
    from autotp.capture import capture

    captured = capture(model, (x,))
    subgraphs = [g for g in captured.modules() if isinstance(g, GraphModule) and g is not captured]
    assert subgraphs and any(d == CPU for g in subgraphs for _, d in _device_constants(g))  # a case to retarget
    sharded = autotp.shard(model, 1, example_inputs=(x,), device="meta")
    assert [c for c in _device_constants(sharded.module) if c[1] != torch.device("meta")] == []
    assert sharded(x.to("meta")).device.type == "meta"


def test_bad_device_is_a_clear_error():
    from autotp.config import ShardConfig

    with pytest.raises(ValueError, match="ShardConfig.device must be"):
        ShardConfig(device="gpu:0")


# ---- on a GPU (bench/gpu_check.sh runs these with ``-m cuda``) --------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this torch sees none)")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cuda_world_size_1_from_a_cpu_capture(kind):
    import autotp

    model = BUILD[kind]()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    sharded = autotp.shard(model, 1, example_inputs=(ids,), example_kwargs={"use_cache": False}, device="cuda")
    assert _tensors_off(sharded.module, torch.device("cuda", torch.cuda.current_device())) == []
    with torch.no_grad():
        got = sharded(ids.cuda(), use_cache=False).logits
        want = model.cuda()(ids.cuda(), use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def _two_ranks_one_gpu(rank: int, world: int) -> float:
    import autotp

    model = _llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    sharded = autotp.shard(model, world, example_inputs=(ids,), example_kwargs={"use_cache": False}, device="cuda:0")
    with torch.no_grad():
        got = sharded(ids.cuda(), use_cache=False).logits
        want = model.cuda()(ids.cuda(), use_cache=False).logits
    return (got - want).abs().max().item() / want.abs().max().item()


@pytest.mark.cuda
@cuda
def test_cuda_two_ranks_on_one_gpu_over_gloo():
    assert max(run_ranks_once(_two_ranks_one_gpu, 2)) <= 1e-5


def test_gpu_check_script_runs_on_cpu_ranks():
    """bench/gpu_check.py's checks, on CPU ranks with tiny models: the script a GPU session runs must not rot."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| check" not in line]
    # cuda tests (skipped here), kernels built, kernel micro-benchmarks, 2 x exactness, 2 x generate, speed,
    # 2 x decode (dynamic and static cache, tokens compared)
    assert len(rows) == 10 and "| SKIP" in rows[0] and all("| PASS" in r for r in rows[1:]), proc.stdout[-3000:]

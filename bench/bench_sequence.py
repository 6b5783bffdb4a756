"""sequence: sequence parallelism -- activation memory and step time vs tensor parallelism alone and vs DTensor.

Run (ranks spawned by the harness, gloo, one thread per rank)::

    python bench/harness.py sequence --world-sizes 2             # Llama 12 x 768, batch 4 x 1024 (~15 min)
    python bench/harness.py sequence --world-sizes 2 --small     # smoke test (<1 min)

A benchmark, not a test: it prints figures and marks the issue's targets met or missed; it never fails on them.
Random weights from a preset (``harness.build``; nothing is downloaded), fp32, dropout 0.

Peers, each one training step (forward + backward of the loss; no optimizer: it is the same for all) on the
same seeded batch:

* ``autotp TP``: ``autotp.shard(model, example_kwargs={"labels": ids, ...}, gather_outputs=False)``;
* ``autotp TP+SP``: the same with ``sequence_parallel=True``;
* ``autotp TP shm`` / ``autotp TP+SP shm`` (``autotp-shm``, ``autotp-sp-shm``): the two with
  ``same_host_collectives=True`` -- every collective forward and backward through shared memory (all-reduce,
  reduce-scatter, all-gather) instead of gloo: what a user runs on one CPU host;
* ``DTensor TP``: ``parallelize_module`` with ``harness.dtensor_plan`` (Colwise/Rowwise, vocab-parallel
  embedding), logits a vocab-sharded DTensor, ``F.cross_entropy`` under ``loss_parallel()``;
* ``DTensor TP+SP``: torchtitan's plan shape -- ``SequenceParallel`` on the norms, ``PrepareModuleInput``
  gathering attention's and the MLP's input, ``RowwiseParallel(output_layouts=Shard(1))`` on o/down, the
  LM head reading ``Shard(1)``.  (The embedding's output stays replicated, sliced at the first layer:
  Hugging Face's Llama builds its positions and mask from the embeddings' sequence length, which a
  reduce-scattered embedding would halve.)

Figures per peer (each the maximum over ranks):

1. **activations**: bytes allocated during the forward and still live at its end (the profiler's
   ``profile_memory`` accounting): what the forward keeps for backward, the activation memory;
2. **step peak**: the allocator's peak over forward + backward (the profiler's ``profile_memory``, as
   ``bench_train``), and the process RSS high-water mark;
3. **step time**: median over ``--iters`` rounds (peers interleaved round-robin, the order rotated) after
   ``--warmup``.

Targets (issue 15): activations with SP <= 0.7 x without (autotp), step time within 1.05 x of it; the same
figures against DTensor TP+SP.  Only rank 0 prints.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import autotp
import harness as H
from bench_train import _measure, _quiet_stderr
from harness import max_over_ranks, progress


def add_args(p):
    p.add_argument("--preset", default="llama-12x768", help="a Llama preset of harness.PRESETS (default llama-12x768)")
    p.add_argument("--batch", default="4x1024", help="BATCHxSEQ of the training batch")
    p.add_argument("--iters", type=int, default=2, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--peers", default="autotp,autotp-sp,autotp-shm,autotp-sp-shm,dtensor,dtensor-sp",
                   help="comma-separated subset of autotp, autotp-sp, autotp-shm, autotp-sp-shm, dtensor, dtensor-sp")
    p.add_argument("--small", action="store_true", help="smoke config: llama-tiny, batch 2x64, 1 timed round")


def settle_args(a):
    if a.small:
        a.preset, a.batch, a.iters, a.warmup = "llama-tiny", "2x64", 1, 1
    (a.batch_size, a.seq), = H.parse_shapes(a.batch)
    a.peer_list = [p.strip() for p in a.peers.split(",") if p.strip()]
    return a


def forward_live_bytes(fn):
    """Run ``fn()`` (the forward, -> loss) under the profiler's memory accounting; return (loss, bytes allocated during
    the forward and still live at its end): what the forward leaves for backward -- the activations (and the loss's
    inputs), whatever keeps them (autograd, a gather's shard, a wrapper)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    dist.barrier()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        loss = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    return loss, sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def dtensor_sp_plan(model, mesh):
    """Megatron TP + sequence parallelism for a Hugging Face Llama, in DTensor's styles (see the docstring)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "model.layers.0": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                 use_local_output=True),
            "model.norm": SequenceParallel(use_local_output=True),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        plan.update({
            p + "input_layernorm": SequenceParallel(),
            p + "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            p + "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            p + "post_attention_layernorm": SequenceParallel(),
            p + "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            p + "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + n] = ColwiseParallel()
    import copy
    return parallelize_module(copy.deepcopy(model), mesh, plan)


class Peer(H.Peer):
    def __init__(self, name):
        super().__init__(name)
        self.forward = None  # () -> loss
        self.times, self.act, self.peak, self.rss, self.loss = [], None, None, None, None


def build_peers(a, mesh, ref, ids):
    labels = {"labels": ids, "use_cache": False}
    shift = F.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)  # HF's ForCausalLMLoss, for the DTensor peers
    pos = torch.arange(a.seq)[None]
    peers = []
    for key, name in (("autotp", "autotp TP"), ("autotp-sp", "autotp TP+SP"), ("autotp-shm", "autotp TP shm"),
                      ("autotp-sp-shm", "autotp TP+SP shm"), ("dtensor", "DTensor TP"), ("dtensor-sp", "DTensor TP+SP")):
        if key not in a.peer_list:
            continue
        p = Peer(name)
        progress(f"building {name}")

        def build(p=p, key=key):
            if key.startswith("autotp"):
                s = autotp.shard(ref, H.WORLD, example_inputs=(ids,), example_kwargs=labels, gather_outputs=False,
                                 sequence_parallel=key.startswith("autotp-sp"),
                                 same_host_collectives=key.endswith("-shm"))
                c = s.plan.counts
                p.note = ("fwd: " + ", ".join(f"{k} x{v}" for k, v in c("forward").items()) + "; bwd: " +
                          ", ".join(f"{k} x{v}" for k, v in c("backward").items()))
                p.forward = lambda: s(ids, **labels).loss
                p.model = s
                return
            from torch.distributed.tensor.parallel import loss_parallel

            m = H.dtensor_plan(ref, mesh, lm_head_local=True) if key == "dtensor" else dtensor_sp_plan(ref, mesh)
            m.train()

            def fwd():
                logits = m(ids, position_ids=pos, use_cache=False).logits
                with loss_parallel():
                    return F.cross_entropy(logits.flatten(0, 1), shift, ignore_index=-100)
            p.forward = fwd
            p.model = m
            p.note = "Colwise/Rowwise" + (" + SequenceParallel norms" if key == "dtensor-sp" else "")

        H.guarded(p, "build", build)
        peers.append(p)
    return peers


def _backward(loss):
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        loss.backward()


def one_step(p):
    loss = p.forward()
    _backward(loss)
    return float((loss.to_local() if hasattr(loss, "to_local") else loss).detach())


def run(a) -> dict:
    settle_args(a)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (H.WORLD,))
    pre = H.preset(a.preset)
    ref = H.build(pre, max_positions=max(1024, a.seq), train=True)
    torch.manual_seed(0)
    ids = torch.randint(0, pre.vocab, (a.batch_size, a.seq))
    micro = collective_times(a.batch_size, a.seq, pre.hidden)
    peers = build_peers(a, mesh, ref, ids)
    for p in peers:  # memory: one measured step each, alone
        if p.error:
            continue
        progress(f"memory: {p.name}")

        def measure(p=p):
            loss, act = forward_live_bytes(p.forward)
            del loss
            gc.collect()
            dist.barrier()
            peak, rss, _, p.loss = _measure(lambda: _Wrapped(p.forward()))
            p.act, p.peak = max_over_ranks(act), max_over_ranks(peak)
            p.rss = max_over_ranks(rss) if rss is not None else None
            for q in p.model.parameters():
                q.grad = None

        H.guarded(p, "memory step", measure)
    live = [p for p in peers if not p.error]
    for it in range(a.warmup + a.iters):
        order = live[it % len(live):] + live[:it % len(live)] if live else []
        for p in order:
            def step(p=p, timed=it >= a.warmup):
                dist.barrier()
                t0 = time.perf_counter()
                one_step(p)
                dt = max_over_ranks(time.perf_counter() - t0)
                for q in p.model.parameters():
                    q.grad = None
                if timed:
                    p.times.append(dt)
            H.guarded(p, "training step", step)
    return {"text": report_text(a, pre, peers) + "\n" + micro_text(a, pre, micro), "micro_ms": micro, "peers": [
        {"peer": p.name, "error": p.error, "activation_bytes": p.act, "peak_bytes": p.peak, "rss_bytes": p.rss,
         "step_s": p.times, "loss": p.loss, "note": p.note} for p in peers]}


class _Wrapped:
    """A loss as ``bench_train._measure`` uses it (``.backward()``, ``.to_local()``), backward under ``loss_parallel``."""

    def __init__(self, loss):
        self.loss = loss

    def backward(self):
        _backward(self.loss)

    def to_local(self):
        return self.loss.to_local() if hasattr(self.loss, "to_local") else self.loss


def collective_times(batch: int, seq: int, hidden: int, rounds: int = 5) -> dict:
    """Median ms (max over ranks) of the collectives SP trades, on one ``[batch, seq, hidden]`` fp32 activation:
    all-reduce (TP's), reduce-scatter and all-gather along the sequence (SP's), through gloo and through the
    same-host transport (where it applies)."""
    from autotp.runtime import Communicator
    from autotp.samehost import enable_same_host_collectives
    from autotp.sequence import reduce_scatter
    from autotp.traceable import gather

    x = torch.randn(batch, seq, hidden)
    shard = x.narrow(1, 0, -(-seq // H.WORLD)).contiguous()
    out = {}
    for transport, comm in (("gloo", Communicator()), ("shm", Communicator(same_host=enable_same_host_collectives()))):
        if transport == "shm" and comm.same_host is None:
            continue
        for op, fn in (("all_reduce", lambda: comm.all_reduce(x)), ("reduce_scatter", lambda: reduce_scatter(x, 1, comm)),
                       ("all_gather", lambda: gather(shard, 1, 1, seq, comm))):
            times = []
            for _ in range(rounds + 1):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(max_over_ranks(time.perf_counter() - t0))
            out[f"{transport} {op}"] = 1e3 * statistics.median(times[1:])
    return out


def micro_text(a, pre, micro: dict) -> str:
    return (f"   collectives on one {a.batch_size}x{a.seq}x{pre.hidden} fp32 activation (median ms, max over ranks): " +
            ", ".join(f"{k} {v:.1f}" for k, v in micro.items()))


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def report_text(a, pre, peers) -> str:
    by = {p.name: p for p in peers}
    rows = []
    for p in peers:
        t = statistics.median(p.times) if p.times else None
        rows.append([p.name, "error: " + p.error if p.error else _mib(p.act), _mib(p.peak), _mib(p.rss),
                     "-" if t is None else f"{t:.2f}", "-" if p.loss is None else f"{p.loss:.5f}", p.note or ""])
    out = [f"sequence parallelism, world {H.WORLD}: {pre.describe()}, batch {a.batch_size}x{a.seq}, fp32, "
           f"{a.iters} timed rounds after {a.warmup}",
           *H.table(["peer", "activations MiB", "step peak MiB", "RSS peak MiB", "step s", "loss", "collectives"],
                    rows)]

    def ratio(x, y, what, target=None):
        if x is None or y is None or not y:
            return f"   {what}: -"
        r = x / y
        mark = "" if target is None else ("  (target <= %.2f: %s)" % (target, "met" if r <= target else "MISSED"))
        return f"   {what}: {r:.2f}x{mark}"

    def med(p):
        return statistics.median(p.times) if p and p.times else None

    sp, dsp = by.get("autotp TP+SP"), by.get("DTensor TP+SP")
    for suffix in ("", " shm"):
        sp_, tp_ = by.get("autotp TP+SP" + suffix), by.get("autotp TP" + suffix)
        if sp_ and tp_:
            out += [ratio(sp_.act, tp_.act, f"activations autotp TP+SP{suffix} / autotp TP{suffix}", 0.7),
                    ratio(sp_.peak, tp_.peak, f"step peak autotp TP+SP{suffix} / autotp TP{suffix}"),
                    ratio(med(sp_), med(tp_), f"step time autotp TP+SP{suffix} / autotp TP{suffix}", 1.05)]
    if sp and dsp:
        out += [ratio(sp.act, dsp.act, "activations autotp TP+SP / DTensor TP+SP"),
                ratio(med(sp), med(dsp), "step time autotp TP+SP / DTensor TP+SP")]
    return "\n".join(out)


def report(a, results) -> str:
    return "\n".join(r["text"] for r in results.values())


if __name__ == "__main__":
    H.main(["sequence"] + sys.argv[1:])

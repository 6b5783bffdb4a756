"""Forward-latency benchmark: autotp vs PyTorch DTensor TP vs Hugging Face tp_plan vs unsharded.

Run (2 CPU ranks, gloo, one thread per rank)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_forward.py            # GPT-2 small, ~5-10 min
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_forward.py --small    # smoke test, <1 min

What it measures (random weights built from a config: nothing is downloaded):

1. autotp compile time (capture + analyze/plan + lower), from ``sharded.timings`` and the
   wall clock around ``autotp.shard``, per static input shape and once with ``dynamic=True``.
2. Forward latency (median of ``--iters`` calls after ``--warmup`` calls, ``torch.no_grad()``,
   ``model.eval()``, fp32) at batch 1 and batch 8 (seq 128) of

   * autotp at world 2 (one static shard per shape; plus a ``dynamic=True`` shard),
   * PyTorch DTensor ``parallelize_module`` with a hand-written Colwise/Rowwise plan,
   * Hugging Face ``from_pretrained(path, tp_plan="auto")``,
   * the unsharded model (every rank runs it with one thread at the same time; rank 0 reported).

   Every sharded peer's logits are checked against the unsharded model (max |diff| over both
   batch sizes and both ranks) so a wrong result cannot look fast.

Two model groups:

* ``gpt2``: GPT2LMHeadModel. GPT-2 uses transformers' ``Conv1D`` (weight [in, out]), which the
  DTensor styles reject ("ColwiseParallel currently only support nn.Linear and nn.Embedding"),
  and its fused ``c_attn`` (Q|K|V) cannot be split in plain halves. The DTensor peer therefore
  runs on a copy whose Conv1D layers are converted to ``nn.Linear`` (transposed weights), whose
  ``c_attn`` output rows are permuted so rank r's contiguous half is [Q_r | K_r | V_r], and whose
  attention ``split_size`` is divided by the world size (the Megatron recipe). GPT-2 has no
  ``base_model_tp_plan``, so the HF peer is expected to fail; the reason is printed.
* ``llama``: LlamaForCausalLM (nn.Linear) of comparable size (same hidden/layers/heads/vocab,
  ``--llama-intermediate`` defaults to 2048 so the MLP has GPT-2's parameter count), where both
  DTensor and HF tp_plan apply directly. autotp is benchmarked on it too.

Only rank 0 prints.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn

import autotp

RANK = 0
WORLD = 1


def log(*a):
    if RANK == 0:
        print(*a, flush=True)


def progress(msg):
    if RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=str, default="1,8", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per peer and shape before timing (the first is also the correctness check)")
    p.add_argument("--time-dynamic", action="store_true", help="also time the dynamic=True autotp shard")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (all peers)")
    p.add_argument("--models", type=str, default="gpt2,llama", help="comma-separated: gpt2, llama")
    p.add_argument("--peers", type=str, default="unsharded,autotp,autotp-dynamic,dtensor,hf",
                   help="comma-separated subset of unsharded, autotp, autotp-dynamic, dtensor, hf")
    p.add_argument("--llama-intermediate", type=int, default=None,
                   help="Llama MLP width (default 8/3*hidden rounded to 256: GPT-2's MLP parameter count)")
    p.add_argument("--small", action="store_true",
                   help="quick smoke config: 2 layers, hidden 256, 4 heads, vocab 1001, 3 iters")
    p.add_argument("--timeout", type=int, default=300, help="gloo collective timeout (s), so a failed peer cannot hang")
    a = p.parse_args()
    if a.small:
        a.layers, a.hidden, a.heads, a.vocab, a.iters, a.warmup = 2, 256, 4, 1001, 3, 1
    if a.llama_intermediate is None:
        a.llama_intermediate = max(256, int(round(a.hidden * 8 / 3 / 256)) * 256)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.peers = [m.strip() for m in a.peers.split(",") if m.strip()]
    return a


# ----------------------------------------------------------------------------- models


def make_model(kind, a):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)  # same weights on every rank
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=a.layers, n_embd=a.hidden, n_head=a.heads, vocab_size=a.vocab,
                         n_positions=max(1024, a.seq), attn_implementation="sdpa")
        m = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                          num_key_value_heads=a.heads, intermediate_size=a.llama_intermediate,
                          vocab_size=a.vocab, max_position_embeddings=max(1024, a.seq),
                          tie_word_embeddings=False, attn_implementation="sdpa")
        m = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return m.float().eval()


def describe(kind, model, a):
    n = sum(p.numel() for p in model.parameters())
    extra = f", intermediate={a.llama_intermediate}" if kind == "llama" else ""
    cls = type(model).__name__
    return f"{cls}: layers={a.layers} hidden={a.hidden} heads={a.heads} vocab={a.vocab}{extra} ({n / 1e6:.1f}M params)"


def logits_of(out):
    x = out.logits if hasattr(out, "logits") else out[0]
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(x, DTensor):
            x = x.full_tensor()
    except ImportError:
        pass
    return x


# ----------------------------------------------------------------------------- DTensor peer


def _conv1d_to_linear(conv, out_perm=None):
    w = conv.weight.detach().t()  # Conv1D weight is [in, out]; nn.Linear's is [out, in]
    b = conv.bias.detach()
    if out_perm is not None:
        w, b = w[out_perm], b[out_perm]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def dtensor_gpt2(ref, world, mesh):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    m = copy.deepcopy(ref)
    E = m.config.n_embd
    assert E % world == 0 and m.config.n_head % world == 0
    step = E // world
    # rank r's contiguous 1/world of c_attn's output must be [Q_r | K_r | V_r]
    perm = torch.cat([torch.arange(r * step, (r + 1) * step) + j * E for r in range(world) for j in range(3)])
    plan = {}
    for i, blk in enumerate(m.transformer.h):
        blk.attn.c_attn = _conv1d_to_linear(blk.attn.c_attn, perm)
        blk.attn.c_proj = _conv1d_to_linear(blk.attn.c_proj)
        blk.attn.split_size = step  # local Q/K/V width; the head count follows from view(..., -1, head_dim)
        blk.mlp.c_fc = _conv1d_to_linear(blk.mlp.c_fc)
        blk.mlp.c_proj = _conv1d_to_linear(blk.mlp.c_proj)
        plan[f"transformer.h.{i}.attn.c_attn"] = ColwiseParallel()
        plan[f"transformer.h.{i}.attn.c_proj"] = RowwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_fc"] = ColwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_proj"] = RowwiseParallel()
    # vocab-parallel embedding and LM head (the tie is broken: each gets its own shard, same values)
    plan["transformer.wte"] = RowwiseParallel(input_layouts=Replicate())
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return parallelize_module(m, mesh, plan).eval()


def dtensor_llama(ref, world, mesh):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    m = copy.deepcopy(ref)
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(m.model.layers)):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + n] = ColwiseParallel()
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            plan[p + n] = RowwiseParallel()
    return parallelize_module(m, mesh, plan).eval()


# ----------------------------------------------------------------------------- harness


def max_over_ranks(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_ok(ok: bool) -> bool:
    t = torch.tensor([1 if ok else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def short_err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def local_param_mb(module) -> float:
    from torch.distributed.tensor import DTensor

    seen, n = set(), 0
    for p in list(module.parameters()) + list(module.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if isinstance(p, DTensor) else p
        n += t.numel() * t.element_size()
    return n / 2**20


class Peer:
    """One row: a model variant with one callable per batch size."""

    def __init__(self, model, name, timed=True):
        self.model, self.name, self.timed = model, name, timed
        self.fns = {}  # batch -> callable(ids)
        self.times = {}  # batch -> list of seconds
        self.diff = None
        self.error = None
        self.note = ""
        self.mb = None


def guarded(peer, what, fn):
    """Run fn() on every rank; if it raises on any rank, mark the peer failed on all ranks."""
    err = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        err = e
        if RANK == 0:
            print(f"--- {peer.model} / {peer.name}: {what} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
    if not all_ok(err is None):
        peer.error = f"{what}: " + (short_err(err) if err is not None else "failed on another rank")
        peer.fns = {}
        return False
    return True


def warm_and_check(peer, inputs, refs, a):
    """Warm-up calls; the first one's logits are compared with the unsharded model's."""
    diffs = []

    def go():
        with torch.no_grad():
            for b, x in inputs.items():
                for i in range(max(1, a.warmup)):
                    out = peer.fns[b](x)
                    if i == 0:
                        lg = logits_of(out).float()
                        if refs is None or b not in refs:
                            refs[b] = lg
                        else:
                            diffs.append((lg - refs[b]).abs().max().item())
                    del out

    if guarded(peer, "run", go) and diffs:
        peer.diff = max_over_ranks(max(diffs))


def time_round_robin(peers, inputs, a):
    """iters rounds; in each round every peer runs each batch once (order rotated per round),
    so load from other processes hits all peers alike."""
    live = [p for p in peers if p.timed and not p.error]
    for p in live:
        p.times = {b: [] for b in inputs}
    with torch.no_grad():
        for it in range(a.iters):
            order = live[it % len(live):] + live[:it % len(live)] if live else []
            for b, x in inputs.items():
                for p in order:
                    dist.barrier()  # start every call together (outside the timed region)
                    t0 = time.perf_counter()
                    p.fns[b](x)
                    p.times[b].append(time.perf_counter() - t0)


# ----------------------------------------------------------------------------- peers


def bench_group(kind, a, compile_rows, mesh):
    progress(f"[{kind}] building model")
    ref = make_model(kind, a)
    desc = describe(kind, ref, a)
    torch.manual_seed(0)  # same inputs on every rank
    inputs = {b: torch.randint(0, a.vocab, (b, a.seq)) for b in a.batches}
    kw = {"use_cache": False}
    refs = {}
    peers = []

    def call(m):
        return lambda x: m(x, **kw)

    # unsharded: its first warm-up call gives the reference logits
    un = Peer(kind, "unsharded (1 rank, each rank concurrently)", timed="unsharded" in a.peers)
    un.fns = {b: call(ref) for b in inputs}
    un.mb = local_param_mb(ref)
    progress(f"[{kind}] unsharded reference")
    warm_and_check(un, inputs, refs, a)
    if un.error:
        raise RuntimeError(f"unsharded {kind} failed: {un.error}")
    if un.timed:
        peers.append(un)

    if "autotp" in a.peers:
        p = Peer(kind, f"autotp (world {WORLD}, static shard per shape)")
        progress(f"[{kind}] autotp static shard")

        def build():
            for b, x in inputs.items():
                dist.barrier()
                t0 = time.perf_counter()
                s = autotp.shard(ref, world_size=WORLD, example_inputs=(x,), example_kwargs=kw)
                wall = max_over_ranks(time.perf_counter() - t0)
                compile_rows.append((kind, f"{b}x{a.seq}", "static", wall, dict(s.timings)))
                p.fns[b] = call(s)
                p.mb = local_param_mb(s)
                p.note = "fwd collectives: " + ", ".join(f"{k} x{v}" for k, v in s.plan.counts("forward").items())

        if guarded(p, "autotp.shard", build):
            warm_and_check(p, inputs, refs, a)
        peers.append(p)

    if "autotp-dynamic" in a.peers:
        p = Peer(kind, f"autotp (world {WORLD}, dynamic=True, one shard)", timed=a.time_dynamic)
        progress(f"[{kind}] autotp dynamic shard")
        bmax = max(inputs)  # a batch-1 example lets export specialize the batch dim to 1

        def build_dyn():
            dist.barrier()
            t0 = time.perf_counter()
            s = autotp.shard(ref, world_size=WORLD, example_inputs=(inputs[bmax],), example_kwargs=kw, dynamic=True)
            wall = max_over_ranks(time.perf_counter() - t0)
            compile_rows.append((kind, f"{bmax}x{a.seq}", "dynamic", wall, dict(s.timings)))
            p.fns = {b: call(s) for b in inputs}
            p.mb = local_param_mb(s)

        if guarded(p, "autotp.shard(dynamic=True)", build_dyn):
            warm_and_check(p, inputs, refs, a)
        if not p.timed and not p.error:
            p.note = "correctness only (not timed; --time-dynamic to time it)"
        peers.append(p)

    if "dtensor" in a.peers:
        p = Peer(kind, "DTensor parallelize_module (hand plan)")
        progress(f"[{kind}] DTensor parallelize_module")

        def build_dt():
            m = dtensor_gpt2(ref, WORLD, mesh) if kind == "gpt2" else dtensor_llama(ref, WORLD, mesh)
            p.fns = {b: call(m) for b in inputs}
            p.mb = local_param_mb(m)

        if guarded(p, "parallelize_module", build_dt):
            warm_and_check(p, inputs, refs, a)
        if kind == "gpt2":
            p.note = "Conv1D->nn.Linear copy, c_attn rows permuted per rank, split_size/=world"
        peers.append(p)

    path = [None]
    if "hf" in a.peers:
        p = Peer(kind, 'HF from_pretrained(tp_plan="auto")')
        progress(f"[{kind}] HF from_pretrained(tp_plan='auto')")

        def save():
            if RANK == 0:
                path[0] = tempfile.mkdtemp(prefix=f"bench_{kind}_")
                ref.save_pretrained(path[0])

        def load():
            dist.broadcast_object_list(path, src=0)
            dist.barrier()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # tp_plan= is deprecated for distributed_config=
                m = type(ref).from_pretrained(path[0], tp_plan="auto", dtype=torch.float32).eval()
            torch.set_num_threads(a.threads)  # in case loading changed it
            p.fns = {b: call(m) for b in inputs}
            p.mb = local_param_mb(m)

        if guarded(p, "save_pretrained", save) and guarded(p, "from_pretrained", load):
            warm_and_check(p, inputs, refs, a)
        peers.append(p)

    progress(f"[{kind}] timing {sum(p.timed and not p.error for p in peers)} peers x {len(inputs)} shapes "
             f"x {a.iters} rounds")
    time_round_robin(peers, inputs, a)
    dist.barrier()
    if RANK == 0 and path[0]:
        shutil.rmtree(path[0], ignore_errors=True)
    for p in peers:
        p.fns = {}
    ref = None  # noqa: F841 - free it (closures above captured the name)
    gc.collect()
    return desc, peers


# ----------------------------------------------------------------------------- report


def fmt_ms(ts):
    if not ts:
        return "-"
    return f"{statistics.median(ts) * 1e3:9.1f}"


def spread(ts):
    if not ts or len(ts) < 2:
        return ""
    med = statistics.median(ts)
    return f"{(max(ts) - min(ts)) / med * 100:.0f}%"


def report(a, descs, compile_rows, all_rows, cmd, load0, load1, total_s):
    bs = a.batches
    W = 46
    L = []
    L.append("=" * 110)
    L.append(f"autotp forward benchmark | world {WORLD} (gloo, CPU) | torch {torch.__version__} | fp32, "
             f"{a.threads} thread(s)/rank, no_grad, eval | {a.iters} timed rounds, {a.warmup} warm-up")
    for k, d in descs.items():
        L.append(f"  {k}: {d}")
    L.append("")
    L.append("1. autotp compile time, seconds (wall = around autotp.shard, max over ranks; "
             "capture/analyze/lower = sharded.timings, rank 0)")
    L.append(f"   {'model':6} {'example':9} {'mode':8} {'wall':>7} {'capture':>8} {'analyze':>8} {'lower':>7}")
    for kind, shape, mode, wall, t in compile_rows:
        L.append(f"   {kind:6} {shape:9} {mode:8} {wall:7.2f} {t.get('capture_s', float('nan')):8.2f} "
                 f"{t.get('analyze_s', float('nan')):8.2f} {t.get('lower_s', float('nan')):7.2f}")
    if not compile_rows:
        L.append("   (none: autotp did not run)")
    L.append("")
    L.append(f"2. forward latency: median (and min) ms of {a.iters} calls on rank 0, peers interleaved round-robin; "
             "spread = (max-min)/median;")
    L.append("   max|diff| = max abs logit difference vs the unsharded model over all batches and both ranks; "
             "MiB = parameter+buffer bytes held per rank")
    L.append(f"   {'model':6} {'peer':{W}}" + "".join(f" {f'b={b} s={a.seq}':>11} {'min':>7} {'spread':>6}" for b in bs) +
             f" {'max|diff|':>9} {'MiB':>6}  note")
    for r in all_rows:
        line = f"   {r.model:6} {r.name:{W}}"
        if r.error:
            line += f" FAILED: {r.error}"
        else:
            for b in bs:
                ts = r.times.get(b)
                line += (f" {fmt_ms(ts):>11} {min(ts) * 1e3:7.1f} {spread(ts):>6}" if ts
                         else f" {'-':>11} {'':>7} {'':>6}")
            d = ("%.2e" % r.diff) if r.diff is not None else "(ref)"
            line += f" {d:>9} {r.mb or 0:6.0f}  {r.note}"
        L.append(line)
    L.append("")
    L.append("3. autotp(static) / peer latency (<1: autotp faster): ratio of medians, and in brackets the median of")
    L.append("   the per-round ratios (each round runs every peer back to back, so this pairs calls made under similar load)")
    L.append(f"   {'model':6} {'peer':{W}}" + "".join(f" {f'b={b}':>16}" for b in bs))
    for kind in descs:
        rows = [r for r in all_rows if r.model == kind]
        at = next((r for r in rows if r.name.startswith("autotp") and "static" in r.name), None)
        if at is None or at.error or not at.times:
            L.append(f"   {kind:6} (autotp static did not run)")
            continue
        for r in rows:
            if r is at:
                continue
            line = f"   {kind:6} {r.name:{W}}"
            if r.error:
                line += "      n/a (peer failed)"
            elif not r.times:
                line += "      n/a (not timed)"
            else:
                for b in bs:
                    rm = statistics.median(at.times[b]) / statistics.median(r.times[b])
                    rp = statistics.median(x / y for x, y in zip(at.times[b], r.times[b]))
                    line += f" {rm:8.2f} [{rp:5.2f}]"
            L.append(line)
    L.append("")
    L.append(f"load average (1 min) at start / end: {load0:.2f} / {load1:.2f} (the 2 ranks alone give ~2; "
             f"more = other processes shared the 2 cores)   total {total_s:.0f} s")
    L.append(f"command: {cmd}")
    L.append("=" * 110)
    log("\n".join(L))


def main():
    global RANK, WORLD
    a = parse_args()
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=a.timeout))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} torchrun --nproc_per_node {WORLD} " + \
          " ".join(sys.argv)
    descs, compile_rows, all_rows = {}, [], []
    for kind in a.models:
        desc, rows = bench_group(kind, a, compile_rows, mesh)
        descs[kind] = desc
        all_rows += rows
    dist.barrier()
    report(a, descs, compile_rows, all_rows, cmd, load0, os.getloadavg()[0], time.perf_counter() - t_start)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

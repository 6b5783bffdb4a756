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
import contextlib
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
    p.add_argument("--warmup", type=int, default=2)
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


# ----------------------------------------------------------------------------- timing


def time_forward(fn, x, a):
    with torch.no_grad():
        for _ in range(a.warmup):
            fn(x)
        ts = []
        for _ in range(a.iters):
            dist.barrier()  # start every call together (outside the timed region)
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return ts


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


class Row:
    def __init__(self, model, peer):
        self.model, self.peer = model, peer
        self.times = {}  # batch -> list of seconds
        self.diff = None
        self.error = None
        self.note = ""


def run_peer(row, fn_for_batch, inputs, refs, a):
    """fn_for_batch(batch) -> callable(ids) -> output. Errors are caught and agreed between ranks."""
    err = None
    try:
        diffs = []
        for b, x in inputs.items():
            f = fn_for_batch(b)
            with torch.no_grad():
                out = logits_of(f(x))
            if refs is not None:
                diffs.append((out.float() - refs[b]).abs().max().item())
            row.times[b] = time_forward(f, x, a)
        if refs is not None:
            row.diff = max(diffs)
    except Exception as e:  # noqa: BLE001 - reported in the table
        err = e
        if RANK == 0:
            traceback.print_exc(file=sys.stderr)
    ok = all_ok(err is None)
    if not ok:
        row.error = short_err(err) if err is not None else "failed on another rank"
        row.times = {}
    elif row.diff is not None:
        row.diff = max_over_ranks(row.diff)
    return row


# ----------------------------------------------------------------------------- peers


def bench_group(kind, a, compile_rows, mesh):
    progress(f"[{kind}] building model")
    ref = make_model(kind, a)
    desc = describe(kind, ref, a)
    torch.manual_seed(0)  # same inputs on every rank
    inputs = {b: torch.randint(0, a.vocab, (b, a.seq)) for b in a.batches}
    refs = {}
    with torch.no_grad():
        for b, x in inputs.items():
            refs[b] = ref(x, use_cache=False).logits.float()
    kw = {"use_cache": False}
    rows = []

    if "unsharded" in a.peers:
        progress(f"[{kind}] unsharded")
        r = Row(kind, "unsharded (1 rank, each rank concurrently)")
        rows.append(run_peer(r, lambda b: (lambda x: ref(x, **kw)), inputs, None, a))

    if "autotp" in a.peers:
        progress(f"[{kind}] autotp static")
        r = Row(kind, f"autotp (world {WORLD}, static shard/shape)")
        shards = {}

        def autotp_static(b):
            if b not in shards:
                dist.barrier()
                t0 = time.perf_counter()
                s = autotp.shard(ref, world_size=WORLD, example_inputs=(inputs[b],), example_kwargs=kw)
                wall = max_over_ranks(time.perf_counter() - t0)
                compile_rows.append((kind, f"{b}x{a.seq}", "static", wall, dict(s.timings)))
                shards.clear()  # keep one shard in memory at a time
                shards[b] = s
            s = shards[b]
            return lambda x: s(x, **kw)

        rows.append(run_peer(r, autotp_static, inputs, refs, a))
        if not r.error and shards:
            s = next(iter(shards.values()))
            r.note = "fwd collectives " + ", ".join(f"{k} x{v}" for k, v in s.plan.counts("forward").items())
        shards.clear()
        gc.collect()

    if "autotp-dynamic" in a.peers:
        progress(f"[{kind}] autotp dynamic")
        r = Row(kind, f"autotp (world {WORLD}, dynamic=True)")
        holder = {}
        bmax = max(a.batches)  # a batch-1 example specializes the batch dim to 1; capture with the largest

        def autotp_dynamic(b):
            if "s" not in holder:
                dist.barrier()
                t0 = time.perf_counter()
                holder["s"] = autotp.shard(ref, world_size=WORLD, example_inputs=(inputs[bmax],), example_kwargs=kw,
                                           dynamic=True)
                wall = max_over_ranks(time.perf_counter() - t0)
                compile_rows.append((kind, f"{bmax}x{a.seq}", "dynamic", wall, dict(holder["s"].timings)))
            s = holder["s"]
            return lambda x: s(x, **kw)

        rows.append(run_peer(r, autotp_dynamic, inputs, refs, a))
        if r.error:
            r.note = "(static shards above are the fallback)"
        holder.clear()
        gc.collect()

    if "dtensor" in a.peers:
        progress(f"[{kind}] DTensor")
        r = Row(kind, "DTensor parallelize_module (hand plan)")
        holder = {}

        def dt(b):
            if "m" not in holder:
                holder["m"] = dtensor_gpt2(ref, WORLD, mesh) if kind == "gpt2" else dtensor_llama(ref, WORLD, mesh)
            m = holder["m"]
            return lambda x: m(x, **kw)

        rows.append(run_peer(r, dt, inputs, refs, a))
        if kind == "gpt2":
            r.note = "on a Conv1D->nn.Linear copy, c_attn rows permuted per rank, split_size/=world"
        holder.clear()
        gc.collect()

    if "hf" in a.peers:
        progress(f"[{kind}] HF tp_plan=auto")
        r = Row(kind, 'HF from_pretrained(tp_plan="auto")')
        holder = {}
        path = [None]
        if RANK == 0:
            path[0] = tempfile.mkdtemp(prefix=f"bench_{kind}_")
            ref.save_pretrained(path[0])
        dist.broadcast_object_list(path, src=0)
        dist.barrier()

        def hf(b):
            if "m" not in holder:
                cls = type(ref)
                holder["m"] = cls.from_pretrained(path[0], tp_plan="auto", dtype=torch.float32).eval()
                torch.set_num_threads(a.threads)  # in case loading changed it
            m = holder["m"]
            return lambda x: m(x, **kw)

        rows.append(run_peer(r, hf, inputs, refs, a))
        holder.clear()
        gc.collect()
        dist.barrier()
        if RANK == 0:
            shutil.rmtree(path[0], ignore_errors=True)

    del ref
    gc.collect()
    return desc, rows


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
    L = []
    L.append("=" * 100)
    L.append(f"autotp forward benchmark  |  world {WORLD} (gloo, CPU)  |  torch {torch.__version__}  |  "
             f"fp32, {a.threads} thread(s)/rank, no_grad, eval  |  iters {a.iters} (warmup {a.warmup})")
    for k, d in descs.items():
        L.append(f"  {k}: {d}")
    L.append("")
    L.append("1. autotp compile time (seconds; wall = max over ranks around autotp.shard)")
    L.append(f"   {'model':6} {'example':9} {'mode':8} {'wall':>7} {'capture':>8} {'analyze':>8} {'lower':>7}")
    for kind, shape, mode, wall, t in compile_rows:
        L.append(f"   {kind:6} {shape:9} {mode:8} {wall:7.2f} {t.get('capture_s', float('nan')):8.2f} "
                 f"{t.get('analyze_s', float('nan')):8.2f} {t.get('lower_s', float('nan')):7.2f}")
    if not compile_rows:
        L.append("   (none: autotp not run)")
    L.append("")
    L.append(f"2. forward latency, median ms over {a.iters} calls (rank 0); spread = (max-min)/median; "
             f"max|diff| = vs unsharded logits, both batches, both ranks")
    hdr = f"   {'model':6} {'peer':45}" + "".join(f" {f'b={b} s={a.seq}':>11} {'spread':>6}" for b in bs) + \
          f" {'max|diff|':>10}  note"
    L.append(hdr)
    for r in all_rows:
        line = f"   {r.model:6} {r.peer:45}"
        if r.error:
            line += f"  FAILED: {r.error}"
        else:
            for b in bs:
                line += f" {fmt_ms(r.times.get(b)):>11} {spread(r.times.get(b)):>6}"
            line += f" {('%.2e' % r.diff) if r.diff is not None else '(ref)':>10}  {r.note}"
        L.append(line)
    L.append("")
    L.append("3. ratio autotp(static) / peer median latency (<1: autotp faster)")
    L.append(f"   {'model':6} {'peer':45}" + "".join(f" {f'b={b}':>8}" for b in bs))
    for kind in descs:
        rows = [r for r in all_rows if r.model == kind]
        at = next((r for r in rows if r.peer.startswith("autotp") and "static" in r.peer), None)
        if at is None or at.error:
            L.append(f"   {kind:6} (autotp static did not run)")
            continue
        for r in rows:
            if r is at:
                continue
            line = f"   {kind:6} {r.peer:45}"
            if r.error:
                line += "   n/a (peer failed)"
            else:
                line += "".join(f" {statistics.median(at.times[b]) / statistics.median(r.times[b]):8.2f}" for b in bs)
            L.append(line)
    L.append("")
    L.append(f"load average (1 min) before/after: {load0:.2f} / {load1:.2f}  (2 ranks busy = ~2.0; more means "
             f"other processes shared the cores)   total {total_s:.0f} s")
    L.append(f"command: {cmd}")
    L.append("=" * 100)
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

"""train: training step time of autotp vs PyTorch DTensor TP (loss_parallel) vs unsharded; loss-step peak memory.

Run (ranks spawned by the harness, gloo, one thread per rank)::

    python bench/harness.py train --world-sizes 2            # GPT-2 small + Llama of like size, ~5-7 min
    python bench/harness.py train --world-sizes 2 --small    # smoke test, <1 min

A benchmark, not a test: it prints numbers and marks the targets met or missed; it never fails on them.
Random weights built from a preset (``harness.build``; nothing is downloaded), fp32,
dropout set to 0 so every peer's loss can be compared with the unsharded one step by step.

1. Training step time: forward + backward + ``torch.optim.AdamW`` step (+ ``zero_grad``), the same
   seeded batch every step, median over ``--iters`` steps after ``--warmup`` steps, of

   * autotp at the world size: ``autotp.shard(model, example_kwargs={"labels": ids, "use_cache": False},
     gather_outputs=False)``; the loss is ``out.loss`` (autotp's vocab-parallel cross-entropy inside
     the captured graph), the logits are never gathered;
   * PyTorch DTensor ``parallelize_module`` with a hand-written Colwise/Rowwise plan whose LM head is
     ``ColwiseParallel(use_local_output=False)`` (logits stay a DTensor sharded on the vocab); the model is
     called without labels and the loss is ``F.cross_entropy`` of the logits and the shifted labels
     (exactly HF's ``ForCausalLMLoss``) under ``loss_parallel()``, forward and backward;
   * the unsharded HF model (``model(ids, labels=ids).loss``) on one rank, both ranks running it at once.

   Peers are interleaved round-robin (each round every peer does one step, order rotated), so load from
   other processes falls on all alike. A step's time is the max over ranks. Each peer's loss at every step
   (warm-up included: step 0 is the initial weights) is compared with the unsharded model's loss at the same
   step, so wrong gradients or a wrong optimizer update show up as a growing difference.
2. Loss-step peak memory: the peak of extra bytes allocated while computing the loss and its backward from
   given logits (a leaf tensor), for a GPT-2 vocab (50257) at ``--mem-shapes``, of
   (a) ``autotp.vocab_parallel_cross_entropy`` on this rank's [B, S, ceil(V/2)] shard,
   (b) all-gather of the shards to [B, S, V] then ``F.cross_entropy`` (backward: the local slice of the
       gradient, no communication, as DTensor's Replicate->Shard backward does),
   (c) DTensor ``loss_parallel()`` on the [B, S, V/2] shard, and (d) unsharded ``F.cross_entropy`` on [B, S, V].
   Two measures: torch's allocator accounting (the profiler's ``profile_memory=True`` records every c10 CPU
   allocation and free; their running sum's maximum is the peak; exact, but blind to memory not allocated through
   torch on this thread, e.g. gloo's worker-thread buffers) and the process RSS high-water mark (``VmHWM`` after
   ``malloc_trim`` and a reset via ``/proc/self/clear_refs``, minus ``VmRSS`` before; sees everything, page granular,
   but glibc keeps freed chunks under its dynamic mmap threshold (<= 32 MiB) in the heap, so at small shapes it also
   counts fragmentation).
3. Ratios autotp/DTensor and autotp/unsharded for step time, vp/gathered for loss-step memory, against the
   issue's targets (step time <= 0.9 x DTensor's; vp peak <= gathered peak / world + 10%).

Only rank 0 prints (progress goes to stderr).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import autotp
import harness as H
from harness import all_ok, local_param_mb, max_over_ranks, progress, spread


def add_args(p):
    p.add_argument("--presets", default="gpt2-small,llama-12x768-mha",
                   help="comma-separated presets (harness.PRESETS); default GPT-2 small and a Llama of like size")
    p.add_argument("--batch", default="4x128", help="BATCHxSEQ of the training batch")
    p.add_argument("--iters", type=int, default=5, help="timed steps per peer")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per peer first (AdamW allocates its state)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peers", type=str, default="unsharded,autotp,dtensor",
                   help="comma-separated subset of unsharded, autotp, dtensor")
    p.add_argument("--mem-shapes", type=str, default=None,
                   help="comma-separated BxS logits shapes for the loss-step memory section (default 4x128,8x512; "
                        "'' skips it)")
    p.add_argument("--mem-vocab", type=int, default=50257, help="vocab of the loss-step memory section")
    p.add_argument("--small", action="store_true",
                   help="smoke config: presets gpt2-tiny,llama-tiny, batch 2x32, 3 iters, memory at 2x64")


def settle_args(a):
    if a.small:
        a.presets, a.batch, a.iters, a.warmup = "gpt2-tiny,llama-tiny", "2x32", 3, 1
        a.mem_shapes = "2x64" if a.mem_shapes is None else a.mem_shapes
    if a.mem_shapes is None:
        a.mem_shapes = "4x128,8x512"
    a.models = [m.strip() for m in a.presets.split(",") if m.strip()]
    (a.batch_size, a.seq), = H.parse_shapes(a.batch)
    a.peer_list = [m.strip() for m in a.peers.split(",") if m.strip()]
    a.mem_shape_list = H.parse_shapes(a.mem_shapes)
    return a


# ----------------------------------------------------------------------------- models


def make_train_model(kind, a):
    """The preset's model (same seeded weights on every rank) with dropout off, in train mode."""
    m = H.build(H.preset(kind), max_positions=max(1024, a.seq), train=True)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(m.config, attr):
            setattr(m.config, attr, 0.0)
    return m.train()


def dtensor_train_model(kind, ref, world, mesh):
    """``harness.dtensor_plan`` with the LM head leaving the logits a DTensor sharded on the vocab (GPT-2:
    the Conv1D->nn.Linear copy, and the wte/lm_head tie restored after ``parallelize_module``)."""
    tied = ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
    return H.dtensor_plan(ref, mesh, lm_head_local=True).train(), tied


# ----------------------------------------------------------------------------- training peers


class TrainPeer(H.Peer):
    def __init__(self, model, name):
        super().__init__(name)
        self.model = model
        self.step = None  # callable() -> (loss, (fwd_s, bwd_s, opt_s))
        self.losses = []  # loss of every step, warm-up included
        self.phases = []  # (fwd, bwd, opt) seconds of the timed steps, max over ranks
        self.times = []  # step seconds of the timed steps, max over ranks
        self.compile_s = None
        self.traj = None  # max |loss - unsharded loss| over all steps


def make_step(forward, params, lr, ctx=contextlib.nullcontext):
    opt = torch.optim.AdamW(params, lr=lr)

    def step():
        t0 = time.perf_counter()
        with ctx():
            loss = forward()
            t1 = time.perf_counter()
            loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        val = loss.to_local() if hasattr(loss, "to_local") else loss
        return float(val.detach()), (t1 - t0, t2 - t1, t3 - t2)

    return step


def guarded(peer, what, fn):
    ok = H.guarded(peer, what, fn)
    if not ok:
        peer.step = None
    return ok


def run_rounds(peers, n, timed):
    """n rounds; each live peer does one step per round (order rotated). Timed steps record max-over-ranks times."""
    for it in range(n):
        live = [p for p in peers if p.step is not None and not p.error]
        order = live[it % len(live):] + live[:it % len(live)] if live else []
        for p in order:
            res = {}

            def one():
                dist.barrier()  # every rank starts together (outside the timed region)
                res["loss"], res["ph"] = p.step()

            if not guarded(p, "training step", one):
                continue
            p.losses.append(res["loss"])
            if timed:
                ph = torch.tensor(res["ph"], dtype=torch.float64)
                dist.all_reduce(ph, op=dist.ReduceOp.MAX)
                tot = torch.tensor([sum(res["ph"])], dtype=torch.float64)
                dist.all_reduce(tot, op=dist.ReduceOp.MAX)
                p.phases.append(tuple(ph.tolist()))
                p.times.append(float(tot.item()))


def bench_train_group(kind, a, mesh):
    progress(f"[{kind}] building model")
    ref = make_train_model(kind, a)
    desc = H.preset(kind).describe()
    torch.manual_seed(0)  # same batch on every rank
    ids = torch.randint(0, H.preset(kind).vocab, (a.batch_size, a.seq))
    peers = []

    if "unsharded" in a.peer_list:
        p = TrainPeer(kind, "unsharded (1 rank, each rank concurrently)")
        p.mb = local_param_mb(ref)
        p.note = "model(ids, labels=ids).loss"
        un = copy.deepcopy(ref)  # ref itself stays untouched (the sharded peers are built from it)
        p.step = make_step(lambda: un(ids, labels=ids, use_cache=False).loss, un.parameters(), a.lr)
        peers.append(p)

    if "autotp" in a.peer_list:
        p = TrainPeer(kind, f"autotp (world {H.WORLD}, gather_outputs=False)")
        progress(f"[{kind}] autotp.shard")

        def build():
            kw = {"labels": ids, "use_cache": False}
            dist.barrier()
            t0 = time.perf_counter()
            s = autotp.shard(ref, world_size=H.WORLD, example_inputs=(ids,), example_kwargs=kw,
                             gather_outputs=False)
            p.compile_s = max_over_ranks(time.perf_counter() - t0)
            p.mb = local_param_mb(s)
            c = s.plan.counts
            p.note = ("fwd: " + ", ".join(f"{k} x{v}" for k, v in c("forward").items()) + "; bwd: " +
                      ", ".join(f"{k} x{v}" for k, v in c("backward").items()))

            def fwd(p=p):
                out = s(ids, labels=ids, use_cache=False)
                if "logits" not in p.note:  # gather_outputs=False: the logits stay this rank's vocab slice
                    p.note += f"; logits out {list(out.logits.shape)}"
                return out.loss

            p.step = make_step(fwd, s.parameters(), a.lr)

        guarded(p, "autotp.shard", build)
        peers.append(p)

    if "dtensor" in a.peer_list:
        p = TrainPeer(kind, "DTensor parallelize_module + loss_parallel")
        progress(f"[{kind}] DTensor parallelize_module")

        def build_dt():
            from torch.distributed.tensor.parallel import loss_parallel

            m, tied = dtensor_train_model(kind, ref, H.WORLD, mesh)
            p.mb = local_param_mb(m)
            # HF's ForCausalLMLoss: labels padded with -100 on the right, shifted by one; mean over the rest
            shift = F.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)

            def fwd():
                logits = m(ids, use_cache=False).logits  # DTensor [B, S, V], Shard(2)
                return F.cross_entropy(logits.flatten(0, 1), shift, ignore_index=-100)

            p.step = make_step(fwd, m.parameters(), a.lr, ctx=loss_parallel)
            p.note = ("Conv1D->nn.Linear copy, c_attn rows permuted, split_size/=world; " if kind == "gpt2" else "") + \
                     ("wte/lm_head tie restored" if tied else "untied head")

        guarded(p, "parallelize_module", build_dt)
        peers.append(p)

    ref = None  # noqa: F841 - free it (the build closures above captured the name)
    gc.collect()
    progress(f"[{kind}] {a.warmup} warm-up + {a.iters} timed rounds x {sum(p.step is not None for p in peers)} peers")
    run_rounds(peers, a.warmup, timed=False)
    run_rounds(peers, a.iters, timed=True)
    # loss trajectories vs the unsharded one (identical on both ranks by construction; max over ranks anyway)
    base = next((p for p in peers if p.name.startswith("unsharded") and not p.error), None)
    for p in peers:
        if base is None or p is base or p.error:
            continue
        n = min(len(p.losses), len(base.losses))
        if n:
            p.diff = max_over_ranks(abs(p.losses[0] - base.losses[0]))
            p.traj = max_over_ranks(max(abs(x - y) for x, y in zip(p.losses[:n], base.losses[:n])))
    for p in peers:
        p.step = None
    gc.collect()
    return desc, peers


# ----------------------------------------------------------------------------- loss-step memory


def _proc_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _trim_heap():
    """Give freed heap memory back to the OS (glibc malloc_trim), so a measured step's allocations fault in fresh
    pages that VmHWM sees instead of silently reusing pages freed by earlier work."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab shards (each [.., V_local], the last rank's padded) into [.., V].
    Backward: every rank holds the whole (replicated) gradient, so its shard's slice is local (no communication)."""

    @staticmethod
    def forward(ctx, local, vocab):
        n = local.shape[-1]
        parts = [torch.empty_like(local) for _ in range(H.WORLD)]
        dist.all_gather(parts, local.contiguous())
        parts = [t[..., :max(0, min(n, vocab - r * n))] for r, t in enumerate(parts)]
        full = torch.cat(parts, dim=-1)
        del parts
        ctx.n, ctx.vocab = n, vocab
        return full

    @staticmethod
    def backward(ctx, g):
        n, start = ctx.n, H.RANK * ctx.n
        valid = max(0, min(n, ctx.vocab - start))
        out = g[..., start:start + valid]
        return F.pad(out, (0, n - valid)) if valid < n else out.contiguous(), None


def _measure(fn):
    """Run fn() (-> scalar loss) and loss.backward(); return (alloc peak bytes, rss peak bytes or None, s, loss)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    _trim_heap()
    dist.barrier()
    rss0 = _proc_kb("VmRSS")
    hwm_ok = _reset_hwm() and rss0 is not None
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs profiler_start/stop lines on fd 2
        prof.start()
    try:
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        dt = time.perf_counter() - t0
    finally:
        with _quiet_stderr():
            prof.stop()
    hwm = _proc_kb("VmHWM") if hwm_ok else None
    val = float((loss.to_local() if hasattr(loss, "to_local") else loss).detach())
    del loss
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cum = peak = 0
    for _, nb in mem:
        cum += nb
        peak = max(peak, cum)
    return peak, (hwm - rss0 if hwm is not None else None), dt, val


def bench_memory(a, mesh):
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    V = a.mem_vocab
    n = -(-V // H.WORLD)  # autotp's shard width (the last rank's is padded)
    chunk = [len(c) for c in torch.arange(V).chunk(H.WORLD)]  # DTensor's (torch.chunk) shard widths
    rows = []
    # a tiny first shape warms every variant up (gloo buffers, DTensor's sharding caches), not reported
    for i, (B, S) in enumerate([(1, 8)] + a.mem_shape_list):
        warm = i == 0
        progress(f"[memory] {'warm-up ' if warm else ''}{B}x{S}x{V}")
        torch.manual_seed(7)
        full = torch.randn(B, S, V) * 4
        target = torch.randint(0, V, (B, S))
        lo = H.RANK * n
        vp_in = F.pad(full[..., lo:lo + n], (0, max(0, lo + n - V)))  # [B, S, n]
        lo_c = sum(chunk[:H.RANK])
        dt_in = full[..., lo_c:lo_c + chunk[H.RANK]].contiguous()
        full_bytes = full.numel() * full.element_size()
        leaves = {}

        def leaf(name, t):
            leaves[name] = t.clone().requires_grad_()
            return leaves[name]

        variants = [
            ("a", "autotp.vocab_parallel_cross_entropy (local shard)", leaf("a", vp_in),
             lambda x: autotp.vocab_parallel_cross_entropy(x, target, vocab_size=V)),
            ("b", "all-gather [B,S,V] + F.cross_entropy", leaf("b", vp_in),
             lambda x: F.cross_entropy(_GatherVocab.apply(x, V).flatten(0, 1), target.flatten())),
            ("c", "DTensor loss_parallel (local shard)", leaf("c", dt_in),
             lambda x: F.cross_entropy(DTensor.from_local(x, mesh, [Shard(2)], run_check=False, shape=(B, S, V),
                                                          stride=(S * V, V, 1)).flatten(0, 1), target.flatten())),
            ("d", "unsharded F.cross_entropy [B,S,V] (1 rank)", leaf("d", full),
             lambda x: F.cross_entropy(x.flatten(0, 1), target.flatten())),
        ]
        del full, vp_in, dt_in
        res = {}
        for key, name, x, fn in variants:
            ctx = loss_parallel if key == "c" else contextlib.nullcontext
            row = {"shape": f"{B}x{S}", "key": key, "name": name, "full_bytes": full_bytes}

            def go():
                with ctx():
                    row["alloc"], row["rss"], row["s"], row["loss"] = _measure(lambda: fn(x))

            err = None
            try:
                go()
            except Exception as e:  # noqa: BLE001 - reported in the table
                err = e
                if H.RANK == 0:
                    import traceback

                    print(f"--- memory {B}x{S} ({key}) failed:", file=sys.stderr)
                    traceback.print_exc(file=sys.stderr)
            if warm:
                all_ok(err is None)
                x.grad = None
                continue
            if not all_ok(err is None):
                row["error"] = H.short_err(err) if err is not None else "failed on another rank"
            else:
                row["alloc"] = max_over_ranks(row["alloc"])
                row["rss"] = max_over_ranks(row["rss"]) if all_ok(row["rss"] is not None) else None
                row["s"] = max_over_ranks(row["s"])
                res[key] = (row["loss"], x.grad if key == "a" else None)
                if key == "b" and "a" in res:  # same (padded) layout: the vp gradient vs the gathered one's slice
                    row_a = next(r for r in rows if r["shape"] == row["shape"] and r["key"] == "a")
                    row_a["gdiff"] = max_over_ranks((res["a"][1] - x.grad).abs().max().item())
                    res["a"] = (res["a"][0], None)
            rows.append(row)
            x.grad = None
        # correctness: every loss equals the unsharded one
        if "d" in res:
            ref_loss = res["d"][0]
            for row in rows[-len(variants):]:
                if row["key"] in res and row["key"] != "d":
                    row["diff"] = max_over_ranks(abs(res[row["key"]][0] - ref_loss))
        leaves.clear()
        res.clear()
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- report


def ms(ts):
    return f"{statistics.median(ts) * 1e3:9.1f}" if ts else "-"


def report_text(a, descs, rows, mem_rows):
    W = 44
    L = ["=" * 118]
    L.append(f"autotp training benchmark | world {H.WORLD} (gloo, CPU) | torch {torch.__version__} | fp32, "
             f"{a.threads} thread(s)/rank, dropout 0, AdamW lr={a.lr} | batch {a.batch_size} x seq {a.seq} | "
             f"{a.iters} timed rounds, {a.warmup} warm-up")
    for k, d in descs.items():
        L.append(f"  {k}: {d}")
    if rows:
        L.append("")
        L.append("1. training step (forward + backward + AdamW step + zero_grad), ms: median and min over the timed steps, "
                 "each step the max over ranks;")
        L.append("   fwd/bwd/opt = median phase times; loss0 = |loss - unsharded loss| at the initial weights; "
                 "traj = max of that over all steps;")
        L.append("   MiB = parameter bytes per rank (Adam state and gradients add 3x that); compile = wall of "
                 "autotp.shard (max over ranks)")
        L.append(f"   {'model':10} {'peer':{W}} {'step':>8} {'min':>8} {'spread':>6} {'fwd':>7} {'bwd':>7} {'opt':>7} "
                 f"{'loss0':>8} {'traj':>8} {'MiB':>5}  note")
        for r in rows:
            line = f"   {r.model:10} {r.name:{W}}"
            if r.error and not r.times:
                line += f" FAILED: {r.error}"
            else:
                ph = [statistics.median(x[i] for x in r.phases) * 1e3 for i in range(3)] if r.phases else [0] * 3
                none = "(ref)" if r.name.startswith("unsharded") else "-"
                d0 = ("%.1e" % r.diff) if r.diff is not None else none
                dt = ("%.1e" % r.traj) if r.traj is not None else none
                line += (f" {ms(r.times):>8} {min(r.times) * 1e3:8.1f} {spread(r.times):>6} {ph[0]:7.1f} {ph[1]:7.1f} "
                         f"{ph[2]:7.1f} {d0:>8} {dt:>8} {r.mb or 0:5.0f}  ")
                if r.compile_s is not None:
                    line += f"compile {r.compile_s:.1f} s; "
                line += r.note + (f" [ERROR later: {r.error}]" if r.error else "")
            L.append(line)
        L.append("")
        L.append("2. step-time ratios (<1: autotp faster): ratio of medians, in brackets the median of per-round ratios "
                 "(same round = similar load)")
        for kind in descs:
            grp = [r for r in rows if r.model == kind]
            at = next((r for r in grp if r.name.startswith("autotp")), None)
            if at is None or not at.times:
                L.append(f"   {kind:10} autotp did not run")
                continue
            for r in grp:
                if r is at:
                    continue
                line = f"   {kind:10} autotp / {r.name:{W}}"
                if not r.times:
                    line += " n/a (peer failed)"
                else:
                    n = min(len(at.times), len(r.times))
                    rm = statistics.median(at.times) / statistics.median(r.times)
                    rp = statistics.median(x / y for x, y in zip(at.times[:n], r.times[:n]))
                    line += f" {rm:6.2f} [{rp:5.2f}]"
                    if r.name.startswith("DTensor"):
                        line += f"   target <= 0.90: {'MET' if rm <= 0.9 else 'MISSED'}"
                L.append(line)
    if mem_rows:
        L.append("")
        L.append(f"3. loss-step peak memory (loss + backward from given logits, vocab {a.mem_vocab}, fp32), max over "
                 "ranks; MiB, and x = multiple of the full [B,S,V] logits' bytes")
        L.append("   alloc = peak of the running sum of torch's CPU allocations/frees (profiler profile_memory=True: "
                 "exact for torch tensors,")
        L.append("           blind to gloo worker-thread buffers and Python); rss = VmHWM (malloc_trim, then reset via "
                 "/proc/self/clear_refs) minus")
        L.append("           VmRSS before (everything, page granular; buffers < 32 MiB may reuse or fragment the heap). "
                 "The logits' gradient (kept)")
        L.append("           is included, the given logits are not.")
        L.append(f"   {'BxS':8} {'':1} {'variant':46} {'alloc MiB':>10} {'x full':>7} {'rss MiB':>8} {'x full':>7} "
                 f"{'ms':>7} {'|loss-d|':>9}")
        mib = 2 ** 20
        for r in mem_rows:
            line = f"   {r['shape']:8} {r['key']} {r['name']:46}"
            if "error" in r:
                line += f" FAILED: {r['error']}"
            else:
                fb = r["full_bytes"]
                rss = (f"{r['rss'] / mib:8.0f} {r['rss'] / fb:7.2f}" if r["rss"] is not None else f"{'n/a':>8} {'':7}")
                d = ("%.1e" % r["diff"]) if "diff" in r else "(ref)"
                line += f" {r['alloc'] / mib:10.0f} {r['alloc'] / fb:7.2f} {rss} {r['s'] * 1e3:7.0f} {d:>9}"
            L.append(line)
        tgt = 1.1 / H.WORLD
        L.append(f"   vp / gathered (a / b), target <= 1/world + 10% = {tgt:.2f} "
                 f"(read as: vp peak <= gathered peak / {H.WORLD} x 1.1):")
        for shape in dict.fromkeys(r["shape"] for r in mem_rows):
            by = {r["key"]: r for r in mem_rows if r["shape"] == shape and "error" not in r}
            if "a" not in by or "b" not in by:
                L.append(f"   {shape:8} n/a (a variant failed)")
                continue
            ra = by["a"]["alloc"] / by["b"]["alloc"]
            line = f"   {shape:8} alloc {ra:5.2f} ({'MET' if ra <= tgt else 'MISSED'})"
            if by["a"]["rss"] is not None and by["b"]["rss"]:
                rr = by["a"]["rss"] / by["b"]["rss"]
                line += f"   rss {rr:5.2f} ({'MET' if rr <= tgt else 'MISSED'})"
            if "gdiff" in by["a"]:
                line += f"   max|grad a - grad b| {by['a']['gdiff']:.1e}"
            if "c" in by:
                line += f"   | DTensor loss_parallel / gathered: alloc {by['c']['alloc'] / by['b']['alloc']:.2f}"
            L.append(line)
    L.append("=" * 118)
    return "\n".join(L)


def run(a) -> dict:
    """On every rank: the loss-step memory section, then each preset's training steps; rank 0's result."""
    settle_args(a)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (H.WORLD,))
    mem_rows = bench_memory(a, mesh) if a.mem_shape_list else []
    descs, rows = {}, []
    for kind in a.models:
        desc, r = bench_train_group(kind, a, mesh)
        descs[kind] = desc
        rows += r
    H.barrier()
    peers = [{"model": r.model, "peer": r.name, "error": r.error, "step_ms": [t * 1e3 for t in r.times],
              "phases_ms": [[t * 1e3 for t in ph] for ph in r.phases], "losses": r.losses, "loss0_diff": r.diff,
              "traj_diff": r.traj, "compile_s": r.compile_s, "param_mib": r.mb, "note": r.note} for r in rows]
    return {"text": report_text(a, descs, rows, mem_rows), "steps": peers, "memory": mem_rows}


def report(a, results) -> str:
    return "\n".join(r["text"] for r in results.values())


if __name__ == "__main__":
    H.main(["train"] + sys.argv[1:])

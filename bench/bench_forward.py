"""forward: forward latency of autotp vs DTensor, HF tp_plan="auto", the unsharded model and the serial limit.

    python bench/harness.py forward --preset llama-6x768 --world-sizes 2 --batch 4x128,1x32 --json forward.json

Random weights from a preset (``harness.PRESETS``), fp32, ``eval()``, ``torch.no_grad()``, ``use_cache=False``,
the same seeded token ids on every rank.  Peers (``--peers``, all by default):

* ``autotp``: ``autotp.shard`` at the world size, one static shard per input shape, gloo collectives;
* ``autotp-shm``: the same with ``same_host_collectives=True`` (on its own process group);
* ``autotp-dynamic``: one ``dynamic=True`` shard for every shape (not in the default set);
* ``dtensor``: PyTorch ``parallelize_module`` with a hand-written Colwise/Rowwise plan (``harness.dtensor_plan``);
* ``hf``: Hugging Face ``from_pretrained(path, tp_plan="auto")`` of the same weights saved to a temporary directory;
* ``unsharded``: the whole model, every rank running it at once;
* ``limit``: the serial limit, the sum per round of three rows measured in the same rounds:
  ``half width`` (the eager model with heads, KV heads, MLP and vocab divided by the world size: one
  rank's compute, no communication), ``all-reduces`` (as many gloo all-reduces of ``[B, S, hidden]``
  fp32 as autotp's plan issues in a forward) and ``logits gather`` (one bare gloo
  ``all_gather_into_tensor`` of the ``[B, S, V / world]`` local logits into a preallocated flat buffer,
  nothing placed in an output layout).

Every sharded peer's logits are compared with the unsharded model's (max |diff| over shapes and
ranks) so a wrong result cannot look fast.  Peers are timed round-robin (``harness.time_round_robin``);
the table shows medians, minima, spread, and autotp / peer ratios (ratio of medians, and in brackets
the median of per-round ratios).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import harness as H

DEFAULT_PEERS = "autotp,autotp-shm,dtensor,hf,unsharded,limit"


def add_args(p):
    p.add_argument("--preset", default="llama-6x768", help="one of: " + ", ".join(H.PRESETS))
    p.add_argument("--batch", default="4x128,1x32", help="comma-separated BATCHxSEQ input shapes")
    p.add_argument("--peers", default=DEFAULT_PEERS,
                   help="comma-separated subset of autotp, autotp-shm, autotp-dynamic, dtensor, hf, unsharded, limit")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (every peer runs each shape once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per peer and shape (the first is the check)")


def run(a) -> dict:
    p = H.preset(a.preset)
    shapes = H.parse_shapes(a.batch)
    want = [s.strip() for s in a.peers.split(",") if s.strip()]
    world = H.WORLD
    ref = H.build(p, max_positions=max(1024, max(t for _, t in shapes)))
    gen = torch.Generator().manual_seed(0)
    inputs = {s: torch.randint(0, p.vocab, s, generator=gen) for s in shapes}
    kw = {"use_cache": False}
    peers, refs, compile_rows = [], {}, []

    def call(m, s):
        return lambda: m(inputs[s], **kw)

    def check(peer):
        diffs = []

        def go():
            with torch.no_grad():
                for s in shapes:
                    for i in range(max(1, a.warmup)):
                        out = peer.fns[s]()
                        if i == 0 and out is not None and refs is not None:
                            lg = H.logits_of(out).float()
                            if s not in refs:
                                refs[s] = lg
                            else:
                                diffs.append((lg - refs[s]).abs().max().item())
                        del out

        if H.guarded(peer, "first calls", go) and diffs:
            peer.diff = H.max_over_ranks(max(diffs))

    un = H.Peer("unsharded", timed="unsharded" in want)
    un.fns = {s: call(ref, s) for s in shapes}
    un.mb = H.local_param_mb(ref)
    H.progress(f"world {world}: unsharded reference")
    check(un)
    if un.error:
        raise RuntimeError(f"the unsharded model failed: {un.error}")
    peers.append(un)

    import autotp

    plan_reduces = [None]

    def autotp_peer(name, **options):
        peer = H.Peer(name)
        H.progress(f"world {world}: {name}")

        def build():
            for s in shapes:
                H.barrier()
                t0 = time.perf_counter()
                m = autotp.shard(ref, world_size=world, example_inputs=(inputs[s],), example_kwargs=kw, **options)
                wall = H.max_over_ranks(time.perf_counter() - t0)
                compile_rows.append({"peer": name, "shape": list(s), "wall_s": wall, **dict(m.timings)})
                peer.fns[s] = call(m, s)
                peer.mb = H.local_param_mb(m)
                counts = m.plan.counts("forward")
                plan_reduces[0] = counts.get("all_reduce", 0)
                peer.note = "fwd: " + ", ".join(f"{k} x{v}" for k, v in counts.items())

        if H.guarded(peer, "autotp.shard", build):
            check(peer)
        peers.append(peer)

    if "autotp" in want:
        autotp_peer("autotp")
    if "autotp-shm" in want:
        shm_group = dist.new_group(list(range(world))) if world > 1 else None
        autotp_peer("autotp-shm", group=shm_group, same_host_collectives=True)
    if "autotp-dynamic" in want:
        peer = H.Peer("autotp-dynamic")

        def build_dyn():
            big = max(shapes)
            m = autotp.shard(ref, world_size=world, example_inputs=(inputs[big],), example_kwargs=kw, dynamic=True)
            peer.fns = {s: call(m, s) for s in shapes}
            peer.mb = H.local_param_mb(m)

        if H.guarded(peer, "autotp.shard(dynamic=True)", build_dyn):
            check(peer)
        peers.append(peer)
    if "dtensor" in want:
        peer = H.Peer("DTensor parallelize_module")
        H.progress(f"world {world}: DTensor parallelize_module")

        def build_dt():
            from torch.distributed.device_mesh import init_device_mesh

            m = H.dtensor_plan(ref, init_device_mesh("cpu", (world,))).eval()
            peer.fns = {s: call(m, s) for s in shapes}
            peer.mb = H.local_param_mb(m)

        if H.guarded(peer, "parallelize_module", build_dt):
            check(peer)
        if p.kind == "gpt2":
            peer.note = "Conv1D->nn.Linear copy, c_attn rows permuted per rank, split_size/=world"
        peers.append(peer)
    saved = None
    if "hf" in want:
        peer = H.Peer('HF tp_plan="auto"')
        H.progress(f"world {world}: HF from_pretrained(tp_plan='auto')")

        def build_hf():
            nonlocal saved
            saved = H.SavedCheckpoint(ref)
            m = saved.hf_tp(type(ref), a.threads)
            peer.fns = {s: call(m, s) for s in shapes}
            peer.mb = H.local_param_mb(m)

        if H.guarded(peer, "from_pretrained(tp_plan='auto')", build_hf):
            check(peer)
        peers.append(peer)
    limit_parts = []
    if "limit" in want:
        limit_parts = _limit_peers(a, p, ref, shapes, inputs, kw, world, plan_reduces[0])
        peers += limit_parts

    H.progress(f"world {world}: timing {sum(x.timed and not x.error for x in peers)} peers x {len(shapes)} shapes "
               f"x {a.rounds} rounds")
    H.time_round_robin(peers, shapes, a.rounds)
    if saved is not None:
        saved.close()
    rows = {f"{b}x{t}": [x.row((b, t)) for x in peers] for b, t in shapes}
    if limit_parts and all(x.times for x in limit_parts):
        for b, t in shapes:
            total = [sum(v) for v in zip(*(x.times[(b, t)] for x in limit_parts))]
            limit = H.Peer("serial limit")
            limit.times[(b, t)] = total
            limit.note = "= half width + all-reduces + logits gather, per round"
            rows[f"{b}x{t}"].append(limit.row((b, t)))
    return {"preset": a.preset, "model": p.describe(), "world": world, "rows": rows, "compile": compile_rows,
            "forward_all_reduces": plan_reduces[0]}


def _limit_peers(a, p, ref, shapes, inputs, kw, world, n_reduces):
    """The serial limit's three parts as peers of their own (timed in the same rounds as the others)."""
    half = H.Peer("  half width (1 rank's compute)")
    reduces = H.Peer("  all-reduces [B,S,hidden]")
    gather = H.Peer("  logits gather (bare)")
    if p.kind != "llama":
        for x in (half, reduces, gather):
            x.error = "the serial limit is built for Llama presets"
        return [half, reduces, gather]
    n = n_reduces if n_reduces is not None else 2 * p.layers + 1
    reduces.note = f"{n} gloo all-reduces (autotp's forward count)"

    def build():
        m = H.build(p.half_width(world), max_positions=max(1024, max(t for _, t in shapes)))
        half.mb = H.local_param_mb(m)
        for s in shapes:
            ids = inputs[s] % m.config.vocab_size
            half.fns[s] = (lambda m, ids: lambda: m(ids, **kw))(m, ids)
            act = torch.randn(*s, p.hidden)
            local = torch.randn(*s, -(-p.vocab // world))
            flat = local.new_empty(world * local.numel())

            def all_reduces(act=act):
                for _ in range(n):
                    if world > 1:
                        dist.all_reduce(act)

            def bare_gather(local=local, flat=flat):
                if world > 1:  # the plan's collective on a preallocated flat buffer, nothing placed
                    dist.all_gather_into_tensor(flat, local.view(-1))

            reduces.fns[s], gather.fns[s] = all_reduces, bare_gather
        with torch.no_grad():
            for s in shapes:
                for x in (half, reduces, gather):
                    x.fns[s]()

    if not H.guarded(half, "serial-limit parts", build):
        reduces.error = gather.error = half.error
    return [half, reduces, gather]


def report(a, results) -> str:
    L = ["=" * 118]
    for world, r in results.items():
        L.append(f"forward latency | {r['model']} | world {world} (gloo, CPU) | torch {torch.__version__} | fp32, "
                 f"{a.threads} thread(s)/rank, no_grad, eval | {a.rounds} rounds, {a.warmup} warm-up")
        if r["compile"]:
            L.append("  autotp.shard wall s (max over ranks) / capture / analyze / lower: " + "; ".join(
                f"{c['peer']} {c['shape'][0]}x{c['shape'][1]}: {c['wall_s']:.1f} / {c.get('capture_s', 0):.1f} / "
                f"{c.get('analyze_s', 0):.1f} / {c.get('lower_s', 0):.1f}" for c in r["compile"]))
        for shape, rows in r["rows"].items():
            at = next((x for x in rows if x["peer"] == "autotp" and x["times_ms"]), None)
            at_shm = next((x for x in rows if x["peer"] == "autotp-shm" and x["times_ms"]), None)
            body = []
            for x in rows:
                if x["error"]:
                    body.append([x["peer"], "FAILED: " + x["error"]])
                    continue
                ts = x["times_ms"]
                cells = [x["peer"], f"{x['median_ms']:.1f}" if ts else "-", f"{x['min_ms']:.1f}" if ts else "",
                         H.spread(ts)]
                for mine in (at, at_shm):
                    if mine is None or not ts or x is mine:
                        cells.append("")
                    else:
                        rm, rp = H.ratios(mine["times_ms"], ts)
                        cells.append(f"{rm:.2f} [{rp:.2f}]")
                d = x["max_abs_diff"]
                cells += ["%.1e" % d if d is not None else ("(ref)" if x["peer"] == "unsharded" else ""),
                          f"{x['param_mib']:.0f}" if x["param_mib"] else "", x["note"]]
                body.append(cells)
            L.append(f"  batch {shape}: ms per forward (max over ranks), median and min of {a.rounds} rounds")
            L += H.table(["peer", "median", "min", "spread", "autotp/peer", "autotp-shm/peer", "max|diff|", "MiB",
                          "note"], body)
            L += _targets(shape, rows)
        L.append("")
    L.append("ratios: ratio of medians [median of per-round ratios]; < 1 = autotp faster. max|diff| = max abs logit "
             "difference vs the unsharded model over shapes and ranks; MiB = parameters + buffers held per rank.")
    L.append("=" * 118)
    return "\n".join(L)


def _targets(shape, rows) -> list[str]:
    by = {x["peer"]: x for x in rows if x["times_ms"]}
    out = []
    for mine in ("autotp", "autotp-shm"):
        if mine not in by:
            continue
        parts = []
        for peer, label in (('HF tp_plan="auto"', "HF"), ("serial limit", "limit"), ("unsharded", "unsharded"),
                            ("DTensor parallelize_module", "DTensor")):
            if peer in by:
                rm, rp = H.ratios(by[mine]["times_ms"], by[peer]["times_ms"])
                parts.append(f"{mine}/{label} {rm:.2f} [{rp:.2f}]")
        out.append("   " + ", ".join(parts))
    return out


if __name__ == "__main__":
    import sys

    import harness

    harness.main(["forward"] + sys.argv[1:])

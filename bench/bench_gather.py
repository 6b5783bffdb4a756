"""gather: the logits all-gather alone, autotp's route against list all_gather + cat and the bare c10d exchanges.

    python bench/harness.py gather --world-sizes 2 --shapes 4x128x8192,1x32x8192 --json gather.json

Each rank holds a seeded ``[B, S, V / world]`` fp32 shard (the local logits of a vocab-sharded LM head) and
gathers ``[B, S, V]`` on the last dim.  Peers, timed round-robin (``harness.time_round_robin``):

* ``autotp``: ``autotp.traceable.gather`` on a plain ``Communicator`` (what a sharded model's ``AllGather``
  runs on gloo ranks: one list ``all_gather`` whose outputs are views of the ``[B, S, V]`` result, so gloo
  writes each part straight into the layout);
* ``list all_gather + cat``: a list ``dist.all_gather`` into one tensor per rank, then ``torch.cat`` (what
  autotp ran before, and what most code writes);
* ``bare all_gather_into_tensor``: gloo's flat all-gather of the shard, no output layout;
* ``bare all_to_all exchange``: one ``all_to_all_single`` with an empty split for oneself: the shard sent to
  every peer, theirs received, nothing placed (not what autotp runs: the plan's collective is an all-gather,
  and the tests hold the runtime to it; shown for what the transport could do).

The first two return the gathered logits, compared for equality; the bare ones only move the bytes.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import harness as H


def add_args(p):
    p.add_argument("--shapes", default="4x128x8192,1x32x8192", help="comma-separated BxSxN local shard shapes")
    p.add_argument("--rounds", type=int, default=30)


def run(a) -> dict:
    from autotp.runtime import Communicator
    from autotp.traceable import gather

    world, rank = H.WORLD, H.RANK
    comm = Communicator()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s.strip()]
    names = ["autotp", "list all_gather + cat", "bare all_gather_into_tensor", "bare all_to_all exchange"]
    peers = {n: H.Peer(n) for n in names}
    equal = {}
    for shape in shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(rank))
        n = x.numel()
        flat = x.new_empty(world * n)
        recv = x.new_empty((world - 1) * n)
        splits = [0 if r == rank else n for r in range(world)]

        def listcat(x=x):
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            return torch.cat(parts, dim=-1)

        def exchange(x=x, recv=recv, splits=splits):
            send = x.view(1, -1).expand(world - 1, -1).reshape(-1)
            dist.all_to_all_single(recv, send, output_split_sizes=splits, input_split_sizes=splits)

        peers["autotp"].fns[shape] = (lambda x=x: gather(x, -1, 1, x.shape[-1] * world, comm))
        peers["list all_gather + cat"].fns[shape] = listcat
        peers["bare all_gather_into_tensor"].fns[shape] = (
            lambda x=x, flat=flat: dist.all_gather_into_tensor(flat, x.view(-1)))
        peers["bare all_to_all exchange"].fns[shape] = exchange
        equal[shape] = H.all_ok(bool(torch.equal(peers["autotp"].fns[shape](), listcat())))
    H.time_round_robin(list(peers.values()), shapes, a.rounds)
    return {"world": world, "equal": {"x".join(map(str, s)): v for s, v in equal.items()},
            "rows": {"x".join(map(str, s)): [p.row(s) for p in peers.values()] for s in shapes}}


def report(a, results) -> str:
    L = ["=" * 100]
    for world, r in results.items():
        L.append(f"logits all-gather on the last dim | world {world} (gloo, CPU) | fp32 | {a.rounds} rounds | ms per call "
                 "(max over ranks)")
        for shape, rows in r["rows"].items():
            base = next(x for x in rows if x["peer"] == "autotp")
            body = []
            for x in rows:
                rm, rp = H.ratios(base["times_ms"], x["times_ms"])
                body.append([x["peer"], f"{x['median_ms']:.2f}", f"{x['min_ms']:.2f}", H.spread(x["times_ms"]),
                             "" if x is base else f"{rm:.2f} [{rp:.2f}]"])
            L.append(f"  local shard {shape}: autotp's result equal to list all_gather + cat: {r['equal'][shape]}")
            L += H.table(["peer", "median", "min", "spread", "autotp/peer"], body)
    L.append("=" * 100)
    return "\n".join(L)


if __name__ == "__main__":
    H.main(["gather"] + sys.argv[1:])

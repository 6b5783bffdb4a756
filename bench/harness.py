"""One benchmark harness: presets, ranks, peers, interleaved timing, a printed table and JSON.

    python bench/harness.py forward  --preset llama-6x768 --world-sizes 2 --batch 4x128,1x32 --json out.json
    python bench/harness.py train    --preset llama-6x768 --world-sizes 2
    python bench/harness.py generate --preset llama-12x768 --world-sizes 2
    python bench/harness.py load     --preset gpt2-medium --world-sizes 2
    python bench/harness.py gather   --world-sizes 2 --shapes 4x128x8192,1x32x8192
    python bench/harness.py sequence --world-sizes 2 [--small]      # sequence parallelism vs TP and DTensor
    python bench/harness.py kernels  --json kernels.json

Each subcommand is a module of ``bench/`` registered in ``SUBCOMMANDS`` with three functions:
``add_args(parser)``, ``run(a) -> dict`` (on every rank of a world, the process group
initialized; rank 0's dict is the result) and ``report(a, results) -> str`` (in the launching
process: ``results`` maps each world size to rank 0's dict).  A subcommand whose module sets
``RANKS = False`` (``load``, ``kernels``) runs ``run`` once in the launching process instead.

Ranks are spawned with ``torch.multiprocessing`` (gloo, one torch thread each unless
``--threads``); started under ``torchrun`` the harness runs the world torchrun made instead.
What lives here is what every benchmark shares: the model presets (random weights from a
config, seeded: the same on every rank), the half-width model (one rank's compute at world
size W), the DTensor ``parallelize_module`` plans, HF ``tp_plan="auto"`` loading, the
round-robin timer (every peer runs once per round, the order rotated, so load from other
processes falls on all alike; each sample is the maximum over ranks), and the table/JSON.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import json
import os
import pickle
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))

SUBCOMMANDS = {  # name -> module of bench/
    "forward": "bench_forward",
    "train": "bench_train",
    "generate": "bench_generate",
    "load": "bench_load",
    "gather": "bench_gather",
    "sequence": "bench_sequence",
    "kernels": "kernel_micro",
}

RANK = 0
WORLD = 1


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model config built with random weights (nothing is downloaded)."""

    kind: str  # "llama" | "gpt2"
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # llama: GQA when < heads
    intermediate: int | None = None  # llama MLP width (gpt2: 4 x hidden)
    head_dim: int | None = None  # llama: None = hidden / heads (a half-width model keeps its parent's)

    def describe(self) -> str:
        if self.kind == "llama":
            return (f"LlamaForCausalLM {self.layers}x{self.hidden}, heads {self.heads} (KV {self.kv_heads}), "
                    f"MLP {self.intermediate}, vocab {self.vocab}")
        return f"GPT2LMHeadModel {self.layers}x{self.hidden}, heads {self.heads}, vocab {self.vocab}"

    def half_width(self, world: int) -> "Preset":
        """One rank's compute at world size ``world``: heads, KV heads, MLP and vocab divided, the hidden
        width and head size kept (what each rank of a Megatron-sharded model multiplies)."""
        if self.kind != "llama":
            raise ValueError("the half-width model is built for Llama presets")
        return dataclasses.replace(self, heads=self.heads // world, kv_heads=max(1, self.kv_heads // world),
                                   intermediate=self.intermediate // world, vocab=self.vocab // world,
                                   head_dim=self.hidden // self.heads)


PRESETS = {
    "llama-6x768": Preset("llama", 6, 768, 12, 16384, kv_heads=4, intermediate=2048),  # issue 13's forward model
    "llama-12x768": Preset("llama", 12, 768, 12, 32000, kv_heads=4, intermediate=2048),
    "llama-12x768-mha": Preset("llama", 12, 768, 12, 50257, kv_heads=12, intermediate=2048),  # GPT-2 small's size
    "llama-tiny": Preset("llama", 2, 128, 4, 1000, kv_heads=2, intermediate=256),
    "gpt2-small": Preset("gpt2", 12, 768, 12, 50257),
    "gpt2-medium": Preset("gpt2", 24, 1024, 16, 50257),
    "gpt2-tiny": Preset("gpt2", 2, 256, 4, 1001),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SystemExit(f"unknown preset {name!r}; one of: {', '.join(PRESETS)}") from None


def build(p: Preset, *, seed: int = 1234, max_positions: int = 1024, train: bool = False) -> nn.Module:
    """``p`` with random weights drawn from ``seed`` (the same model on every rank), fp32; dropout 0 when
    ``train`` (so every peer's loss is comparable step for step)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if p.kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=p.layers, hidden_size=p.hidden, num_attention_heads=p.heads,
                                       num_key_value_heads=p.kv_heads, head_dim=p.head_dim,
                                       intermediate_size=p.intermediate, vocab_size=p.vocab,
                                       max_position_embeddings=max_positions, tie_word_embeddings=False,
                                       attn_implementation="sdpa")
        m = transformers.LlamaForCausalLM(cfg)
    elif p.kind == "gpt2":
        kw = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if train else {}
        cfg = transformers.GPT2Config(n_layer=p.layers, n_embd=p.hidden, n_head=p.heads, vocab_size=p.vocab,
                                      n_positions=max_positions, attn_implementation="sdpa", **kw)
        m = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(p.kind)
    m = m.float()
    return m.train() if train else m.eval()


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x128,1x32"`` -> ``[(4, 128), (1, 32)]`` (batch x sequence)."""
    out = []
    for s in text.split(","):
        if s.strip():
            b, _, t = s.lower().partition("x")
            out.append((int(b), int(t)))
    return out


# ----------------------------------------------------------------------------- rank helpers


def log(*a):
    if RANK == 0:
        print(*a, flush=True)


def progress(msg):
    if RANK == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def max_over_ranks(v):
    """Elementwise maximum over the ranks of a float or a list of floats."""
    t = torch.tensor(v if isinstance(v, list) else [v], dtype=torch.float64)
    if WORLD > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist() if isinstance(v, list) else float(t.item())


def all_ok(ok: bool) -> bool:
    t = torch.tensor([1 if ok else 0])
    if WORLD > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier():
    if WORLD > 1:
        dist.barrier()


def short_err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def local_param_mb(module) -> float:
    """Parameter and buffer MiB this rank holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    seen, n = set(), 0
    for p in list(module.parameters()) + list(module.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if isinstance(p, DTensor) else p
        n += t.numel() * t.element_size()
    return n / 2**20


def logits_of(out):
    x = out.logits if hasattr(out, "logits") else out[0]
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


class Peer:
    """One row of a table: a named variant with one callable per shape, its samples and its checks."""

    def __init__(self, name, timed=True):
        self.name, self.timed = name, timed
        self.fns = {}  # shape -> callable()
        self.times = {}  # shape -> seconds per round (max over ranks)
        self.diff = None  # max |logits - unsharded logits| over shapes and ranks
        self.error = None
        self.note = ""
        self.mb = None

    def row(self, shape) -> dict:
        ts = self.times.get(shape) or []
        return {"peer": self.name, "error": self.error, "times_ms": [t * 1e3 for t in ts],
                "median_ms": statistics.median(ts) * 1e3 if ts else None, "min_ms": min(ts) * 1e3 if ts else None,
                "max_abs_diff": self.diff, "param_mib": self.mb, "note": self.note}


def guarded(peer, what, fn) -> bool:
    """Run ``fn()`` on every rank; if it raises on any rank, the peer fails on all ranks (reported, not fatal)."""
    err = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        err = e
        if RANK == 0:
            print(f"--- {peer.name}: {what} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
    if not all_ok(err is None):
        peer.error = f"{what}: " + (short_err(err) if err is not None else "failed on another rank")
        peer.fns = {}
        return False
    return True


def time_round_robin(peers, shapes, rounds: int):
    """``rounds`` rounds; in each, every live timed peer runs each shape once, the order rotated by one per
    round.  Every call starts after a barrier; each sample is the call's maximum over the ranks."""
    live = [p for p in peers if p.timed and not p.error]
    local = {(p.name, s): [] for p in live for s in shapes}
    with torch.no_grad():
        for it in range(rounds):
            order = live[it % len(live):] + live[:it % len(live)] if live else []
            for s in shapes:
                for p in order:
                    barrier()
                    t0 = time.perf_counter()
                    p.fns[s]()
                    local[(p.name, s)].append(time.perf_counter() - t0)
    for p in live:
        for s in shapes:
            p.times[s] = max_over_ranks(local[(p.name, s)])


def median(ts):
    return statistics.median(ts) if ts else float("nan")


def spread(ts) -> str:
    if not ts or len(ts) < 2:
        return ""
    return f"{(max(ts) - min(ts)) / statistics.median(ts) * 100:.0f}%"


def ratios(mine, theirs) -> tuple[float, float]:
    """(ratio of medians, median of the per-round ratios): the second pairs calls made under similar load."""
    if not mine or not theirs:
        return float("nan"), float("nan")
    return median(mine) / median(theirs), statistics.median(x / y for x, y in zip(mine, theirs))


# ----------------------------------------------------------------------------- peers shared by benchmarks


def dtensor_plan(model, mesh, *, lm_head_local: bool = False):
    """A hand-written Megatron plan for ``parallelize_module``: QKV/gate/up column-parallel, o/down row-parallel,
    vocab-parallel embedding; the LM head's logits gathered (or left a vocab-sharded DTensor:
    ``lm_head_local``).  GPT-2's ``Conv1D`` layers (which the DTensor styles reject) are converted to
    ``nn.Linear`` on a copy, with ``c_attn``'s rows permuted so rank r's contiguous share is
    ``[Q_r | K_r | V_r]`` and the attention's ``split_size`` divided by the world size."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = mesh.size()
    m = copy.deepcopy(model)
    head = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) if lm_head_local else \
        ColwiseParallel(output_layouts=Replicate())
    if type(m).__name__ == "GPT2LMHeadModel":
        E = m.config.n_embd
        step = E // world
        perm = torch.cat([torch.arange(r * step, (r + 1) * step) + j * E for r in range(world) for j in range(3)])
        plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate()), "lm_head": head}
        for i, blk in enumerate(m.transformer.h):
            blk.attn.c_attn = conv1d_to_linear(blk.attn.c_attn, perm)
            blk.attn.c_proj = conv1d_to_linear(blk.attn.c_proj)
            blk.attn.split_size = step
            blk.mlp.c_fc = conv1d_to_linear(blk.mlp.c_fc)
            blk.mlp.c_proj = conv1d_to_linear(blk.mlp.c_proj)
            for n, style in (("attn.c_attn", ColwiseParallel()), ("attn.c_proj", RowwiseParallel()),
                             ("mlp.c_fc", ColwiseParallel()), ("mlp.c_proj", RowwiseParallel())):
                plan[f"transformer.h.{i}.{n}"] = style
        tied = m.config.tie_word_embeddings
        m = parallelize_module(m, mesh, plan)
        if tied:  # parallelize_module breaks the tie; both are Shard(0) of [V, E]
            m.get_output_embeddings().weight = m.get_input_embeddings().weight
        return m
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()), "lm_head": head}
    for i in range(len(m.model.layers)):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + n] = ColwiseParallel()
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            plan[p + n] = RowwiseParallel()
    return parallelize_module(m, mesh, plan)


def conv1d_to_linear(conv, out_perm=None):
    w = conv.weight.detach().t()  # Conv1D weight is [in, out]; nn.Linear's is [out, in]
    b = conv.bias.detach()
    if out_perm is not None:
        w, b = w[out_perm], b[out_perm]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


class SavedCheckpoint:
    """``model`` saved once (rank 0) to a temporary directory every rank can read; removed on ``close``."""

    def __init__(self, model):
        self.path = [tempfile.mkdtemp(prefix="autotp_bench_") if RANK == 0 else None]
        if RANK == 0:
            model.save_pretrained(self.path[0])
        if WORLD > 1:
            dist.broadcast_object_list(self.path, src=0)
        barrier()

    def hf_tp(self, cls, threads: int):
        """Hugging Face ``from_pretrained(path, tp_plan="auto")`` of the saved weights, in eval mode."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tp_plan= is deprecated for distributed_config=
            # tp_size given: transformers otherwise reads it from $WORLD_SIZE and silently loads it whole
            m = cls.from_pretrained(self.path[0], tp_plan="auto", tp_size=WORLD, dtype=torch.float32).eval()
        from torch.distributed.tensor import DTensor

        if WORLD > 1 and not any(isinstance(p, DTensor) for p in m.parameters()):
            raise RuntimeError('from_pretrained(tp_plan="auto") returned an unsharded model')
        torch.set_num_threads(threads)  # loading may change it
        return m

    def close(self):
        barrier()
        if RANK == 0 and self.path[0]:
            import shutil

            shutil.rmtree(self.path[0], ignore_errors=True)


# ----------------------------------------------------------------------------- tables


def table(header: list[str], rows: list[list], indent: str = "   ") -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    out = []
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append(indent + "  ".join(parts).rstrip())
    return out


def command_line() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ)
    launcher = f"torchrun --nproc_per_node {os.environ['WORLD_SIZE']}" if _under_torchrun() else "python"
    return f"{env + ' ' if env else ''}{launcher} {shlex.join(sys.argv)}"


# ----------------------------------------------------------------------------- launching


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _init_rank(a, rank, world, init_method=None):
    global RANK, WORLD
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)
    kw = dict(timeout=datetime.timedelta(seconds=a.timeout))
    if init_method is not None:
        kw.update(init_method=init_method, rank=rank, world_size=world)
    dist.init_process_group("gloo", **kw)
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _rank_entry(rank, world, module_name, a, init_file, out_file):
    payload = ("error", f"rank {rank} did not finish")
    # what torchrun would set: libraries that read the world from the environment (transformers) see it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        _init_rank(a, rank, world, f"file://{init_file}")
        result = _module(module_name).run(a)
        barrier()
        payload = ("ok", result)
    except BaseException as e:  # reported by the launcher
        payload = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    if rank == 0 or payload[0] == "error":
        with open(out_file if rank == 0 else f"{out_file}.{rank}", "wb") as f:
            pickle.dump(payload, f)
    # no interpreter teardown: the result is on disk, and gloo's destructors sometimes abort at exit
    os._exit(1 if payload[0] == "error" else 0)


def _spawn(module_name, a, world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pkl")
        try:
            mp.spawn(_rank_entry, args=(world, module_name, a, os.path.join(tmp, "init"), out_file),
                     nprocs=world, join=True)
        except Exception as e:  # a rank failed: its own message says why
            msgs = []
            for name in sorted(os.listdir(tmp)):
                if name.startswith("result.pkl"):
                    with open(os.path.join(tmp, name), "rb") as f:
                        status, val = pickle.load(f)
                    if status == "error":
                        msgs.append(val)
            raise RuntimeError("\n".join(msgs) or str(e)) from None
        with open(out_file, "rb") as f:
            status, val = pickle.load(f)
        if status != "ok":
            raise RuntimeError(val)
        return val


def _module(name):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/harness.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        mod = _module(module_name)
        sp = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0],
                            description=(mod.__doc__ or name).strip().splitlines()[0])
        if getattr(mod, "RANKS", True):
            sp.add_argument("--world-sizes", default="2", help="comma-separated world sizes, one run each")
            sp.add_argument("--threads", type=int, default=1, help="torch threads per rank (all peers)")
            sp.add_argument("--timeout", type=int, default=600, help="gloo timeout (s): a failed peer cannot hang")
        sp.add_argument("--json", default=None, help="also write the results to this file")
        mod.add_args(sp)
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    a.cmd = command_line()
    mod = _module(SUBCOMMANDS[a.command])
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    if not getattr(mod, "RANKS", True):
        results = {0: mod.run(a)}
    elif _under_torchrun():
        _init_rank(a, None, None)
        res = mod.run(a)
        results = {WORLD: res}
        barrier()
        if RANK != 0:
            dist.destroy_process_group()
            return
    else:
        a.world_sizes = [int(w) for w in str(a.world_sizes).split(",") if w.strip()]
        results = {w: _spawn(SUBCOMMANDS[a.command], a, w) for w in a.world_sizes}
    text = mod.report(a, results)
    text += (f"\nload average (1 min) at start / end: {load0:.2f} / {os.getloadavg()[0]:.2f} (the benchmark's own ranks "
             f"alone give about the world size; more = other processes shared the cores)   total "
             f"{time.perf_counter() - t0:.0f} s\ncommand: {a.cmd}")
    print(text, flush=True)
    if a.json:
        doc = {"command": a.cmd, "subcommand": a.command, "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "load_average": [load0, os.getloadavg()[0]],
               "args": {k: v for k, v in vars(a).items() if k != "cmd" and _jsonable(v)},
               "results": {str(w): r for w, r in results.items()}}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {a.json}")
    if _under_torchrun():
        dist.destroy_process_group()


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


if __name__ == "__main__":
    # run as the module ``harness`` (not ``__main__``): the subcommands and the spawned ranks import it by
    # that name, and must see the one copy whose RANK / WORLD the ranks set
    sys.path.insert(0, HERE)
    import harness

    harness.main()

"""The prepared GPU check: every path a GPU user takes, on one GPU, in a few minutes, as one table.

    bash bench/gpu_check.sh                       # on a machine with one GPU and a CUDA build of torch
    python bench/gpu_check.py --device cpu --quick   # the same checks on CPU ranks (what CI runs)

Rows (PASS / FAIL / SKIP, with the figure each one measured):

1. the tests marked ``cuda`` (``pytest -m cuda``): skipped on CPU, with the reason printed;
2. ``shard`` at world size 1 over NCCL (gloo on CPU): logits vs the unsharded model (fp32, 1e-5),
   one training step's gradients, ``torch.compile(fullgraph=True)`` vs eager;
3. the same at world size 2 as two processes on the one GPU over gloo with CUDA tensors
   (NCCL refuses two ranks on one GPU);
4. greedy ``generate`` in bf16 (``shard_for_generation``, world size 1 and 2) vs the unsharded model's tokens;
5. forward latency and greedy tokens/s of autotp (world size 1) vs the unsharded model, and of the
   half-width unsharded model: one rank's compute at world size 2, no communication;
6. greedy decode tokens/s (batch 1, bf16) at world size 1 and 2: autotp with the dynamic cache, with the static
   cache (``static_cache=True``), and compiled with CUDA graphs (``compile=True``: ``mode="reduce-overhead"``), vs
   the unsharded model, each autotp variant's tokens compared with the unsharded model's (at least the first 8 of
   32 equal: bf16 partial sums added in another order may flip a near-tie later).

Nothing is downloaded: models are built from configs with random weights.  Exits 1 when a row fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, dtype=torch.float32,
           head_dim: int | None = None):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                                   intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                                   max_position_embeddings=1024, head_dim=head_dim or hidden // heads)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=257)
    return dict(hidden=1024, layers=8, heads=16, kv=8, inter=2816, vocab=32000)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / max(1e-6, b.float().abs().max().item())


def _narrow(t, placement, world, rank):
    from autotp.placements import Shard, placement_index, take_shard

    if not isinstance(placement, Shard):
        return t
    return take_shard(t, placement.dim, *placement_index(placement, t.shape[placement.dim], world, rank))


# ---- worker bodies (one per rank) ---------------------------------------------------------------

def _exactness(rank: int, world: int, device: torch.device, sizes: dict) -> dict:
    """Logits, one step's gradients, and compiled vs eager, against the unsharded model on ``device``."""
    import autotp

    model = _llama(**sizes).to(device)
    ids = torch.randint(0, sizes["vocab"], (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    sharded = autotp.shard(_llama(**sizes), world, example_inputs=(ids.cpu(),), example_kwargs={"use_cache": False},
                           device=device)  # captured on CPU, run on the device
    out = {}
    with torch.no_grad():
        out["logits"] = _rel(sharded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    sharded.train()
    model.train()
    sharded(ids, use_cache=False).logits.float().square().mean().backward()
    model(ids, use_cache=False).logits.float().square().mean().backward()
    ref = dict(model.named_parameters())
    out["grads"] = max(_rel(p.grad, _narrow(ref[n].grad, sharded.plan.parameters[n].placement, world, rank))
                       for n, p in sharded.module.named_parameters())
    eager = {n: p.grad.clone() for n, p in sharded.named_parameters()}
    sharded.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    compiled = torch.compile(sharded, fullgraph=True)
    logits = compiled(ids, use_cache=False).logits
    logits.float().square().mean().backward()
    out["compile_s"] = time.perf_counter() - t0
    out["compiled"] = max(_rel(p.grad, eager[n]) for n, p in sharded.named_parameters())
    return out


def _generate(rank: int, world: int, device: torch.device, sizes: dict) -> dict:
    """Greedy bf16 tokens of ``shard_for_generation`` vs the unsharded model's."""
    import autotp

    model = _llama(**sizes, dtype=torch.bfloat16).to(device)
    ids = torch.randint(3, sizes["vocab"], (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    lm = autotp.shard_for_generation(_llama(**sizes, dtype=torch.bfloat16), world, device=device)
    with torch.no_grad():
        got, want = lm.generate(ids, **kw), model.generate(ids, **kw)
    return {"tokens_equal": bool(torch.equal(got.cpu(), want.cpu())), "new_tokens": int(got.shape[1] - ids.shape[1])}


def _speed(rank: int, world: int, device: torch.device, sizes: dict, iters: int) -> dict:
    """Forward latency (batch 4 x 128) and greedy tokens/s (batch 1): autotp, unsharded, half width."""
    import autotp

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # one rank's compute at world size 2: half the heads (same head width), half the MLP and the vocab;
    # the hidden width (the replicated residual stream) is not split
    half = dict(sizes, heads=sizes["heads"] // 2, kv=max(1, sizes["kv"] // 2), inter=sizes["inter"] // 2,
                vocab=sizes["vocab"] // 2, head_dim=sizes["hidden"] // sizes["heads"])
    ids = torch.randint(0, sizes["vocab"], (4, 128), generator=torch.Generator().manual_seed(3)).to(device)
    models = {"unsharded": _llama(**sizes, dtype=torch.bfloat16).to(device),
              "half width (one rank of 2)": _llama(**half, dtype=torch.bfloat16).to(device)}
    sharded = autotp.shard(_llama(**sizes, dtype=torch.bfloat16), world, example_inputs=(ids.cpu(),),
                           example_kwargs={"use_cache": False}, device=device)
    gen = autotp.shard_for_generation(_llama(**sizes, dtype=torch.bfloat16), world, device=device)
    rows = {}
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for name, fwd, lm in (("autotp", sharded, gen), *((n, m, m) for n, m in models.items())):
            x = ids % lm.config.vocab_size  # the half-width model's vocab is half
            latency = median_s(lambda: fwd(x, use_cache=False))
            decode = median_s(lambda: lm.generate(x[:1, :16], **kw))
            rows[name] = {"forward_ms": latency * 1e3, "tokens_per_s": 32 / decode}
    return rows


def _entry(rank, world, fn, args, init, out, backend, device_str):
    try:
        device = torch.device(device_str)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
        result = ("ok", fn(rank, world, device, *args))
        dist.barrier()
    except BaseException as e:
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)


def _ranks(fn, world: int, backend: str, device: str, *args):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_entry, args=(world, fn, args, os.path.join(tmp, "init"), tmp, backend, device), nprocs=world)
        except Exception:  # a rank that died before writing: reported below
            pass
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"{r}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result")
            with open(path) as f:
                status, value = json.load(f)
            if status != "ok":
                raise RuntimeError(value)
            results.append(value)
        return results


# ---- the table ---------------------------------------------------------------------------------

class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, check: str, status: str, figure: str) -> None:
        self.rows.append((check, status, figure))
        print(f"  {status:4s}  {check}: {figure}", flush=True)

    def run(self, check: str, fn, judge) -> None:
        """``judge(result) -> (passed, figure)``; an exception is a FAIL with its first line."""
        t0 = time.perf_counter()
        try:
            result = fn()
            passed, figure = judge(result)
            self.add(check, "PASS" if passed else "FAIL", f"{figure} ({time.perf_counter() - t0:.0f} s)")
        except Exception as e:
            text = str(e).strip().splitlines()
            self.add(check, "FAIL", f"{type(e).__name__}: {(text[-1] if text else '')[:300]}")

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        print("\n| check" + " " * (width - 5) + " | result | figure |")
        print("|" + "-" * (width + 2) + "|--------|--------|")
        for check, status, figure in self.rows:
            print(f"| {check.ljust(width)} | {status:6s} | {figure} |")

    @property
    def failed(self) -> bool:
        return any(r[1] == "FAIL" for r in self.rows)


def _exact_judge(tol: float):
    def judge(results):
        worst = {k: max(r[k] for r in results) for k in ("logits", "grads", "compiled")}
        ok = all(v <= tol for v in worst.values())
        return ok, (f"logits {worst['logits']:.1e}, grads {worst['grads']:.1e}, compiled vs eager "
                    f"{worst['compiled']:.1e} (tol {tol:g}); compile {max(r['compile_s'] for r in results):.0f} s")
    return judge


def _decode(rank: int, world: int, device: torch.device, sizes: dict, iters: int, compile_peer: bool) -> dict:
    """Greedy decode tokens/s (batch 1, bf16) of autotp -- dynamic cache eager, static cache eager,
    static cache compiled (CUDA graphs: ``mode="reduce-overhead"``) -- vs the unsharded model; how many
    leading new tokens of each equal the unsharded model's."""
    import autotp

    new = 32
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    ids = torch.randint(3, sizes["vocab"], (1, 16), generator=torch.Generator().manual_seed(4)).to(device)
    ref = _llama(**sizes, dtype=torch.bfloat16).to(device)
    peers = {"unsharded": ref,
             "autotp dynamic": autotp.shard_for_generation(_llama(**sizes, dtype=torch.bfloat16), world, device=device),
             "autotp static": autotp.shard_for_generation(_llama(**sizes, dtype=torch.bfloat16), world, device=device,
                                                          static_cache=True)}
    t0 = time.perf_counter()
    if compile_peer:
        peers["autotp static+compile"] = autotp.shard_for_generation(_llama(**sizes, dtype=torch.bfloat16), world,
                                                                     device=device, static_cache=True, compile=True)
    rows = {}
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        for name, lm in peers.items():
            t = time.perf_counter()
            got = lm.generate(ids, **kw)  # warm-up: the compiled peer compiles and records here
            first = time.perf_counter() - t
            times = []
            for _ in range(iters):
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                t = time.perf_counter()
                lm.generate(ids, **kw)
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                times.append(time.perf_counter() - t)
            same = (got[0, ids.shape[1]:] == want[0, ids.shape[1]:]).long().cumprod(0).sum()
            rows[name] = {"tokens_per_s": new / statistics.median(times), "leading_equal": int(same),
                          "first_call_s": first}
    if compile_peer:
        rows["autotp static+compile"]["setup_s"] = time.perf_counter() - t0
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny models, few iterations (a smoke run)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per figure (default 10; 2 with --quick)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to this torch build; run with --device cpu for the CPU version of the checks")
        return 2
    sizes = _sizes(args.quick)
    iters = args.iters or (2 if args.quick else 10)
    gpu = args.device == "cuda"
    dev = "cuda:0" if gpu else "cpu"
    name = torch.cuda.get_device_name(0) if gpu else "CPU"
    print(f"autotp GPU check: torch {torch.__version__}, CUDA {torch.version.cuda}, {name}; model {sizes}", flush=True)
    table = Table()

    tests = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"],
                           cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    skips = [line for line in tests.stdout.splitlines() if line.startswith("SKIPPED")]
    if skips:
        print("\n".join(skips))
    ran = tests.returncode == 0 and " passed" in last  # all skipped (no GPU) exits 0 too
    table.add("tests marked cuda (pytest -m cuda)", "PASS" if ran else "FAIL" if tests.returncode not in (0, 5)
              else "SKIP", last)

    from autotp import kernels
    built = kernels.available()
    table.add("csrc/ kernels compiled", "PASS" if built["cpu"] and (built["cuda"] or not gpu) else "FAIL", str(built))
    if built["cpu"] and (built["cuda"] or not gpu):
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        import bench_kernels

        def kernel_judge(rows):
            return True, "; ".join(f"{r['kernel']} {r['what']} {r['ratio']:.2f}x" for r in rows)

        table.run(f"kernel micro-benchmarks on {'cuda' if gpu else 'cpu'} (composite / fused)", lambda: bench_kernels.run(
            small=args.quick, iters=iters, device="cuda" if gpu else "cpu"), kernel_judge)

    table.run(f"shard, world 1, {'nccl' if gpu else 'gloo'}, fp32", lambda: _ranks(
        _exactness, 1, "nccl" if gpu else "gloo", dev, sizes), _exact_judge(1e-5))
    table.run(f"shard, world 2 on one {'GPU' if gpu else 'CPU'}, gloo, fp32", lambda: _ranks(
        _exactness, 2, "gloo", dev, sizes), _exact_judge(1e-5))
    for world in (1, 2):
        table.run(f"greedy generate bf16, world {world}", lambda w=world: _ranks(
            _generate, w, "nccl" if gpu and w == 1 else "gloo", dev, sizes),
            lambda rs: (all(r["tokens_equal"] for r in rs), f"{rs[0]['new_tokens']} new tokens, equal: "
                        f"{[r['tokens_equal'] for r in rs]}"))

    def speed_judge(rs):
        rows = rs[0]
        base = rows["unsharded"]
        parts = [f"{k}: {v['forward_ms']:.1f} ms fwd, {v['tokens_per_s']:.0f} tok/s" for k, v in rows.items()]
        ratio = base["forward_ms"] / rows["autotp"]["forward_ms"]
        return True, "; ".join(parts) + f"; autotp/unsharded forward speed {ratio:.2f}x"

    table.run("speed bf16, world 1 (batch 4x128 forward; batch 1 greedy)", lambda: _ranks(
        _speed, 1, "nccl" if gpu else "gloo", dev, sizes, iters), speed_judge)

    def decode_judge(rs):
        rows = rs[0]
        base = rows["unsharded"]["tokens_per_s"]
        parts = [f"{k}: {v['tokens_per_s']:.0f} tok/s ({v['tokens_per_s'] / base:.2f}x)" for k, v in rows.items()]
        first = rows.get("autotp static+compile", {}).get("first_call_s")
        # bf16: partial sums added in another order may flip a near-tie after some tokens; a wrong shard
        # differs from the first token on
        lead = min(v["leading_equal"] for r in rs for v in r.values())
        return (lead >= 8, "; ".join(parts) + (f"; compiled first call {first:.0f} s" if first else "") +
                f"; leading new tokens equal to the unsharded model's: at least {lead} of 32 (8 needed)")

    for world in (1, 2):
        table.run(f"decode bf16 batch 1, world {world}: eager dynamic / static / compiled (CUDA graphs)",
                  lambda w=world: _ranks(_decode, w, "nccl" if gpu and w == 1 else "gloo", dev, sizes, iters,
                                         gpu or not args.quick),  # (CPU --quick: no Inductor compile, CI's time)
                  decode_judge)
    table.print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("check", "result", "figure"), r)) for r in table.rows], f, indent=1)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``autotp`` command line (also ``python -m autotp``).

    autotp demo                                    # 2 CPU ranks shard a small GPT-2, check it, generate, plan page
    autotp plan gpt2-small --world-size 4 --out plan/      # plan on the meta device, write the dumps
    autotp plan llama-70b --world-size 8 --out plan70b/    # 80 layers: no weights are made
    autotp plan ./my-checkpoint --world-size 2 --out plan/ # a Hugging Face checkpoint or config directory
    autotp plan mypkg.models:build --world-size 2 --out plan/

A failure prints one ``autotp: error: ...`` line and exits 1 (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from contextlib import contextmanager

__all__ = ["main", "run", "PRESETS"]

# name -> (transformers config class, its fields): built from config, no download.
PRESETS = {
    "gpt2-tiny": ("GPT2Config", dict(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=1000,
                                     bos_token_id=999, eos_token_id=999, initializer_range=0.2)),
    "gpt2-small": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-medium": ("GPT2Config", dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)),
    "llama-tiny": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                       max_position_embeddings=256)),
    "llama-70b": ("LlamaConfig", dict(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
                                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)),
}
_DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """A user-facing failure: printed as one line."""


def _say(msg: str) -> None:
    print(f"autotp: {msg}", flush=True)


@contextmanager
def _step(what: str):
    """Progress for a step that may take seconds: "what ..." then "what: done in N s"."""
    _say(f"{what} ...")
    t0 = time.perf_counter()
    yield
    _say(f"{what}: done in {time.perf_counter() - t0:.1f} s")


def _hf_config(model: str):
    """A transformers config for a preset name or a directory with ``config.json``, else ``None``."""
    import transformers

    if model in PRESETS:
        cls, fields = PRESETS[model]
        return getattr(transformers, cls)(**fields)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise CliError(f"{model} is a directory without config.json: give a Hugging Face checkpoint or config "
                           "directory (save_pretrained writes one)")
        return transformers.AutoConfig.from_pretrained(model)
    return None


def load_model(model: str, *, dtype: str, meta: bool, batch: int, seq_len: int, seed: int = 0):
    """``(module, example_inputs, example_kwargs)`` for MODEL: a preset, a checkpoint/config
    directory (built from its config; weights are not read) or ``module:callable``.  ``meta``:
    parameters on the meta device (planning only)."""
    import torch

    cfg = _hf_config(model)
    if cfg is None and ":" in model:
        return _from_callable(model, batch=batch, seq_len=seq_len)
    if cfg is None:
        raise CliError(f"MODEL {model!r} is not a directory, a module:callable or a preset "
                       f"({', '.join(PRESETS)})")
    import transformers

    kind = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            module = kind.from_config(cfg, dtype=getattr(torch, dtype))
    else:
        module = kind.from_config(cfg, dtype=getattr(torch, dtype))
    module.eval()
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if positions and seq_len > positions:
        raise CliError(f"--seq-len {seq_len} is longer than the model's {positions} positions")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    kwargs = {"use_cache": False}
    if cfg.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    return module, (ids.to("meta") if meta else ids,), kwargs


def _from_callable(spec: str, *, batch: int, seq_len: int):
    import torch

    mod_name, _, fn_name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise CliError(f"cannot load {spec}: {e} (MODEL as module:callable needs an importable module, "
                       "from the current directory or PYTHONPATH, and a function in it)") from e
    finally:
        sys.path.pop(0)
    made = fn()
    module, args, kwargs = (made, None, {}) if isinstance(made, torch.nn.Module) else (tuple(made) + ({},))[:3]
    if not isinstance(module, torch.nn.Module):
        raise CliError(f"{spec} returned {type(made).__name__}: it must return an nn.Module, or "
                       "(module, example_inputs) or (module, example_inputs, example_kwargs)")
    if args is None:
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        if vocab is None:
            raise CliError(f"{spec} returned a module without config.vocab_size, so autotp cannot make token ids "
                           "for it: return (module, example_inputs) instead")
        device = next(module.parameters(), torch.empty(0)).device
        args = (torch.randint(0, vocab, (batch, seq_len)).to(device),)
        kwargs = {"use_cache": False} if hasattr(module, "generation_config") else {}
    return module.eval(), tuple(args), dict(kwargs)


def _print_plan(plan, written: dict) -> None:
    m = plan.memory
    for phase in ("forward", "backward"):
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(plan.counts(phase).items())) or "none"
        _say(f"collectives per {phase}: {counts}")
    _say(f"parameter bytes per rank: {m['param_bytes_per_rank'] / 2**20:,.1f} MiB of "
         f"{m['param_bytes_total'] / 2**20:,.1f} MiB ({len(plan.replicated)} layers left replicated)")
    if "note" in written:
        _say(written["note"])
    _say(f"wrote {', '.join(k for k in written if k != 'note')} to {os.path.dirname(written['plan.html'])}")
    _say(f"open {os.path.abspath(written['plan.html'])}")


def cmd_plan(args) -> int:
    import gc

    import torch

    from .config import ShardConfig
    from .pipeline import plan_model

    if args.world_size < 1:
        raise CliError(f"--world-size must be at least 1, got {args.world_size}")
    gc.disable()  # a short-lived process: the collector's passes over the trace's objects cost seconds on 70B
    with _step(f"building {args.model} on the meta device"):
        model, inputs, kwargs = load_model(args.model, dtype=args.dtype, meta=True, batch=args.batch,
                                           seq_len=args.seq_len)
    with _step(f"planning for world_size={args.world_size} (capture + analysis)"), torch.no_grad():
        _, plan, timings = plan_model(model, args.world_size, ShardConfig(reuse_blocks=not args.whole),
                                      inputs, kwargs)
    if "blocks" in timings:
        _say(f"{timings['blocks']} repeated blocks: {timings['blocks_traced']} traced, the others reuse their graph "
             "(--whole traces every one)")
    with _step("writing the dumps"):
        written = plan.dump(args.out, expand=args.expand)
    _print_plan(plan, written)
    return 0


def cmd_demo(args) -> int:
    import torch

    import autotp

    if args.world_size < 2:
        raise CliError(f"--world-size must be at least 2 for the demo, got {args.world_size}")
    if args.model not in PRESETS or args.model == "llama-70b":
        raise CliError(f"--model must be one of the small presets ({', '.join(p for p in PRESETS if p != 'llama-70b')}),"
                       f" got {args.model!r}")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    with _step(f"building {args.model} (random weights, seed 0)"):
        model, (ids,), _ = load_model(args.model, dtype="float32", meta=False, batch=2, seq_len=args.seq_len)
        mask = torch.ones_like(ids)
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else model.config.eos_token_id if model.config.eos_token_id is not None else 0
        gen = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
        with torch.no_grad():
            reference = model(ids, use_cache=False).logits[:, -1:]
            ref_tokens = model.generate(ids, **gen)
    with _step(f"starting {args.world_size} CPU ranks (gloo) and sharding"):
        from transformers.utils import logging

        logging.disable_progress_bar()  # save_pretrained's, for the workers' checkpoint
        lm = autotp.parallelize(model, world_size=args.world_size)
    with lm:
        with _step("checking the sharded logits against the unsharded model"):
            logits = lm.forward(ids)
        err = (logits - reference).abs().max().item()
        ok = err <= 1e-5 * max(1.0, reference.abs().max().item())
        _say(f"max |logits - unsharded logits| = {err:.2e} ({'OK' if ok else 'MISMATCH'})")
        with _step(f"generating {args.new_tokens} tokens (greedy) on the ranks"):
            tokens = lm.generate(ids, **gen)
        same = torch.equal(tokens, ref_tokens)
        _say(f"generated: {tokens[0, ids.shape[1]:].tolist()} "
             f"({'the same as' if same else 'DIFFERENT from'} the unsharded model's)")
    with _step("writing the plan page (the model's forward at the prompt's size)"), torch.no_grad():
        plan = autotp.plan(model, args.world_size, example_inputs=(ids,), example_kwargs={"use_cache": False})
        written = plan.dump(args.out)
    _print_plan(plan, written)
    if not (ok and same):
        raise CliError("the sharded model disagrees with the unsharded one (see above): please report it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    ap = argparse.ArgumentParser(prog="autotp", parents=[common],
                                 description="Automatic tensor parallelism for PyTorch: plan, dump and demo.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("plan", parents=[common], help="plan a model on the meta device and write the plan's dumps",
                       description="Plan MODEL for --world-size ranks in this process (parameters on the meta "
                                   "device: no memory) and write plan.json, graph.dot, graph.svg and plan.html.")
    p.add_argument("model", metavar="MODEL",
                   help=f"a Hugging Face checkpoint or config directory, module:callable returning an nn.Module, "
                        f"or a preset: {', '.join(PRESETS)}")
    p.add_argument("--world-size", type=int, required=True, help="tensor-parallel ranks")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="example sequence length (default 128)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="parameter dtype (default float32)")
    p.add_argument("--out", required=True, help="directory for the dumps (created)")
    p.add_argument("--expand", action="store_true", help="draw every transformer block (default: identical "
                                                         "blocks once, x N)")
    p.add_argument("--whole", action="store_true", help="trace every block (default: each distinct block once, "
                                                        "its graph reused for the identical ones)")
    p.set_defaults(run=cmd_plan)
    d = sub.add_parser("demo", parents=[common], help="shard a small GPT-2 on CPU ranks, check it, generate",
                       description="Start --world-size CPU ranks (gloo), shard a small model built from a preset, "
                                   "check its logits against the unsharded model, generate a few tokens and write "
                                   "the plan page.")
    d.add_argument("--world-size", type=int, default=2, help="ranks to start (default 2)")
    d.add_argument("--model", default="gpt2-tiny", help="a preset (default gpt2-tiny)")
    d.add_argument("--seq-len", type=int, default=12, help="prompt length (default 12)")
    d.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    d.add_argument("--out", default="autotp-demo", help="directory for the plan page (default ./autotp-demo)")
    d.set_defaults(run=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def run() -> None:
    """The console script and ``python -m autotp``: ``main()``, then exit.  After ``plan`` it exits
    without tearing the interpreter down: freeing a 70B trace's objects one by one costs more
    than a second, and by then every file is closed and the output flushed."""
    args = build_parser().parse_args()
    code = _run(args)
    if args.command == "plan":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run(args) -> int:
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()  # config warnings about a preset's special tokens are noise here
    except ImportError:
        pass
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("autotp: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, unless --debug
        if args.debug:
            raise
        text = str(e).strip().splitlines()
        print(f"autotp: error: {text[0] if text else type(e).__name__}"
              f"{'' if isinstance(e, CliError) else f' ({type(e).__name__}; --debug shows the traceback)'}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    run()

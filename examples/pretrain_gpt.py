"""Pretrain a GPT-2 with autotp tensor parallelism: Megatron-LM's pretrain_gpt.py, on any model autotp shards.

CPU smoke run (2 gloo ranks, a tiny GPT-2, the stdlib-docstring corpus shipped in the repo):

    python examples/preprocess_data.py --input examples/data/corpus.jsonl \\
        --output-prefix /tmp/stdlib --vocab-size 512 --append-eod
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/pretrain_gpt.py \\
        --data-path /tmp/stdlib_text_document --vocab-file /tmp/stdlib-vocab.json --train-iters 50

GPT-2 345M on 4 GPUs (the seed's run): see examples/README.md.

Every rank builds the same model from the same seed, ``autotp.shard`` keeps each
rank's shards, and every rank reads the same batches (samples are a pure function
of the seed and the number of samples consumed), so the ranks are one tensor-
parallel group: world size = TP size, no data parallelism. AdamW is elementwise
and runs on the local shards with no communication; gradient clipping uses the
norm of the whole model (``autotp.optim.clip_grad_norm_``, one all-reduce).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name for "which iteration to resume from"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout after attention/MLP and on embeddings (Megatron's default is 0.1; 0 here so "
                        "that a resumed run repeats an uninterrupted one exactly: dropout RNG is not checkpointed)")
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--recompute-activations", action="store_true",
                   help="recompute each transformer block in backward instead of storing its activations "
                        "(autotp.shard(activation_checkpointing=True))")
    g.add_argument("--activations-checkpoint-method", choices=["uniform"], default=None,
                   help="Megatron's spelling of --recompute-activations")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard the norms, dropouts and residual adds between the parallel blocks along the sequence "
                        "(autotp.shard(sequence_parallel=True)): 1/world of those activations per rank")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                   help="pad the vocabulary to a multiple of this (Megatron: 128 x TP; autotp pads unevenly "
                        "split vocabularies itself, so 1 is exact)")
    g = ap.add_argument_group("data")
    g.add_argument("--data-path", required=True, help="dataset prefix (PREFIX_text_document from preprocess_data.py)")
    g.add_argument("--vocab-file", help="the tokenizer's vocab.json; sets the vocabulary size")
    g.add_argument("--merge-file", help="accepted for Megatron compatibility; not needed to train")
    g.add_argument("--vocab-size", type=int, help="vocabulary size when no --vocab-file (default: largest id + 1)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights over documents")
    g = ap.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per iteration: micro-batches accumulated (default: --micro-batch-size)")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["cosine"], default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="of --lr-decay-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU), fp32 weights")
    g.add_argument("--fp16", action="store_true", help="fp16 autocast with a dynamic loss scale (GPU; CPU too, slowly)")
    g.add_argument("--loss-scale-window", type=int, default=1000, help="fp16: good steps before the scale grows")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    g.add_argument("--seed", type=int, default=1234)
    g = ap.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation (0: none)")
    g.add_argument("--save", help="directory to save checkpoints to")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    g.add_argument("--load", help="directory to resume from (its latest checkpoint; none there: start fresh)")
    g.add_argument("--ckpt-step", type=int, default=None, help="with --load: resume from this iteration")
    g.add_argument("--fail-at-iteration", type=int, default=None, metavar="N",
                   help="testing elastic restarts: right after iteration N the last rank exits with status 1 "
                        "(os._exit: no cleanup, like a crashed worker), once: it first writes the marker file "
                        "failed_at_iteration_N into --save, and a run that finds that marker does not fail. Under "
                        "torchrun --max-restarts 1 with --load set to --save, torchrun restarts every rank and "
                        "they resume from the last checkpoint. Use --standalone (or --rdzv-backend c10d) and set "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with a rendezvous store shared across restarts "
                        "(torchrun's default static rendezvous, or c10d without that variable) a restarted rank "
                        "can read the previous attempt's addresses and fail or hang (pytorch/pytorch#135712)")
    args = ap.parse_args(argv)

    args.recompute_activations = args.recompute_activations or args.activations_checkpoint_method is not None
    if args.bf16 and args.fp16:
        ap.error("--bf16 and --fp16 are exclusive")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.seq_length > args.max_position_embeddings:
        ap.error(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings "
                 f"({args.max_position_embeddings})")
    args.global_batch_size = args.global_batch_size or args.micro_batch_size
    if args.global_batch_size % args.micro_batch_size:
        ap.error(f"--global-batch-size ({args.global_batch_size}) is not a multiple of --micro-batch-size "
                 f"({args.micro_batch_size})")
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = int(round((args.lr_warmup_fraction or 0.0) * args.lr_decay_iters))
    if args.save_interval is None:
        args.save_interval = args.train_iters
    if args.fail_at_iteration is not None and not args.save:
        ap.error("--fail-at-iteration needs --save (its marker file goes there)")
    if args.save_interval < 1 or args.log_interval < 1 or args.eval_interval < 1:
        ap.error("--save-interval, --log-interval and --eval-interval must be >= 1")
    return args


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), world, device


def print_rank0(*a, **kw) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def build_datasets(args):
    from autotp.data import GPTDataset, IndexedDataset, split_documents

    indexed = IndexedDataset(args.data_path)
    weights = [float(w) for w in args.split.split(",")]
    parts = split_documents(len(indexed), weights + [0.0] * (3 - len(weights)))
    names = ("train", "valid", "test")
    datasets = {}
    for name, docs in zip(names, parts):
        if not len(docs) or (name == "valid" and args.eval_iters == 0):
            continue
        try:
            datasets[name] = GPTDataset(indexed, args.seq_length, args.seed, documents=docs)
        except ValueError as e:
            if name == "train" or name == "valid":
                raise SystemExit(f"{name} split: {e}")
            print_rank0(f" > skipping the test split: {e}")
    print_rank0(f" > {indexed}")
    for name, ds in datasets.items():
        print_rank0(f"    {name}: {len(ds.documents)} documents, {ds.num_tokens:,} tokens, "
                    f"{len(ds)} samples of {args.seq_length + 1} tokens per epoch")
    return indexed, datasets


def vocab_size_of(args, indexed) -> tuple[int, int | None]:
    """(padded vocabulary size, end-of-document id) from --vocab-file, --vocab-size or the data."""
    eod = None
    if args.vocab_file:
        with open(args.vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        size, eod = len(vocab), vocab.get("<|endoftext|>")
    elif args.vocab_size:
        size = args.vocab_size
    else:
        size = int(indexed.tokens.max()) + 1 if indexed.num_tokens else 1
    top = int(indexed.tokens.max()) if indexed.num_tokens else 0
    if top >= size:
        raise SystemExit(f"the dataset holds token id {top} but the vocabulary has {size} tokens: "
                         "pass the tokenizer the data was written with (--vocab-file)")
    multiple = args.make_vocab_size_divisible_by
    padded = -(-size // multiple) * multiple
    if padded != size:
        print_rank0(f" > padded vocab (size: {size}) with {padded - size} dummy tokens (new size: {padded})")
    return padded, eod


def build_model(args, vocab_size: int, eod: int | None):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=args.max_position_embeddings, n_embd=args.hidden_size,
        n_layer=args.num_layers, n_head=args.num_attention_heads, resid_pdrop=args.hidden_dropout,
        embd_pdrop=args.hidden_dropout, attn_pdrop=args.attention_dropout, initializer_range=args.init_method_std,
        bos_token_id=eod if eod is not None else 0, eos_token_id=eod if eod is not None else 0)
    return GPT2LMHeadModel(config)


def get_batch(dataset, start: int, size: int, device):
    """Inputs and targets of samples ``start .. start + size - 1``: (size, seq) int64 each."""
    tokens = torch.from_numpy(dataset.batch(start, size)).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward_loss(sharded, x, y):
    # shift_labels: y is already the next token of x (Megatron's seq+1 samples), so every
    # position is a target; with labels alone, HF would shift again and drop the last one.
    return sharded(x, labels=y, shift_labels=y, use_cache=False).loss


def evaluate(sharded, dataset, args, device, autocast) -> float:
    """Mean loss over the first ``--eval-iters`` micro-batches of ``dataset`` (the same ones every time)."""
    sharded.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(args.eval_iters):
            x, y = get_batch(dataset, i * args.micro_batch_size, args.micro_batch_size, device)
            with autocast():
                total += forward_loss(sharded, x, y).item()
    sharded.train()
    return total / args.eval_iters


def report_eval(what: str, loss: float) -> None:
    line = f" validation loss {what} | lm loss value: {loss:.6E} | lm loss PPL: {math.exp(min(20.0, loss)):.6E} | "
    print_rank0("-" * len(line) + "\n" + line + "\n" + "-" * len(line))


def checkpoint_module():
    """``autotp.checkpoint`` (save / load of a sharded module and its optimizer), imported on first use."""
    try:
        from autotp import checkpoint
    except ImportError as e:
        raise SystemExit(f"--save / --load need autotp.checkpoint, which this autotp does not have ({e})") from e
    return checkpoint


def save_checkpoint(args, sharded, optimizer, scaler, iteration: int, consumed: int) -> None:
    path = os.path.join(args.save, f"iter_{iteration:07d}")
    print_rank0(f"saving checkpoint at iteration {iteration:8d} to {path}")
    t0 = time.perf_counter()
    extra = {"iteration": iteration, "consumed_train_samples": consumed,
             "scaler": scaler.state_dict() if scaler is not None else None,
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    checkpoint_module().save(path, sharded, optimizer, step=iteration, extra=extra)
    if dist.is_initialized():
        dist.barrier()  # every rank's shard is on disk before the tracker points at it
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(args.save, TRACKER), "w") as f:
            f.write(str(iteration))
    print_rank0(f"  successfully saved checkpoint at iteration {iteration:8d} to {path} "
                f"({(time.perf_counter() - t0) * 1000:.0f} ms)")


def load_checkpoint(args, sharded, optimizer, scaler) -> tuple[int, int]:
    """(iteration, consumed samples) to resume from; (0, 0) when ``--load`` holds no checkpoint."""
    if args.ckpt_step is not None:
        iteration = args.ckpt_step
    else:
        tracker = os.path.join(args.load, TRACKER)
        if not os.path.exists(tracker):
            print_rank0(f" > no {TRACKER} in {args.load}: starting from scratch")
            return 0, 0
        with open(tracker) as f:
            iteration = int(f.read().strip())
    path = os.path.join(args.load, f"iter_{iteration:07d}")
    if not os.path.isdir(path):
        raise SystemExit(f"--load: no checkpoint at {path}")
    meta = checkpoint_module().load(path, sharded, optimizer) or {}
    extra = meta["extra"] if isinstance(meta.get("extra"), dict) else meta  # what save(extra=...) stored
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    iteration = int(extra.get("iteration", meta.get("step", iteration)))
    consumed = int(extra.get("consumed_train_samples", iteration * args.global_batch_size))
    print_rank0(f" > resumed from {path} at iteration {iteration} ({consumed} samples consumed)")
    return iteration, consumed


def fail_once(args, rank: int, world: int, iteration: int) -> None:
    """--fail-at-iteration: the last rank dies here unless a marker says it already did."""
    marker = os.path.join(args.save, f"failed_at_iteration_{iteration}")
    if rank != world - 1 or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"rank {rank} exited after iteration {iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    print(f" > --fail-at-iteration {iteration}: rank {rank} exits with status 1 (once: {marker} now exists)",
          flush=True)
    os._exit(1)


def make_scaler(args, sharded, device):
    """fp16's dynamic loss scale, or None. With TP the overflow check must agree across ranks
    (a rank whose shard overflowed must not be the only one to skip), hence the sharded scaler."""
    if not args.fp16:
        return None
    kw = dict(init_scale=args.initial_loss_scale, growth_interval=args.loss_scale_window)
    if sharded.world_size == 1:
        return torch.amp.GradScaler(device.type, **kw)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    return ShardedGradScaler(device.type, process_group=sharded.group, **kw)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)  # same weights (and dropout streams) on every rank
    np.random.seed(args.seed)
    from transformers.utils import logging as hf_logging

    import autotp
    from autotp.optim import clip_grad_norm_, cosine_lr

    hf_logging.set_verbosity_error()
    if args.load:
        checkpoint_module()  # fail before the expensive part
    if args.save:
        checkpoint_module()
        os.makedirs(args.save, exist_ok=True)

    print_rank0(f"> building the datasets from {args.data_path} ...")
    indexed, datasets = build_datasets(args)
    train_ds, valid_ds, test_ds = datasets["train"], datasets.get("valid"), datasets.get("test")
    vocab_size, eod = vocab_size_of(args, indexed)

    print_rank0(f"> building GPT-2 ({args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} "
                f"heads, vocab {vocab_size}) and sharding it over {world} rank(s) on {device.type} ...")
    model = build_model(args, vocab_size, eod).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    x, y = get_batch(train_ds, 0, args.micro_batch_size, device)
    t0 = time.perf_counter()
    options = {"activation_checkpointing": True} if args.recompute_activations else {}
    if args.sequence_parallel:
        options["sequence_parallel"] = True
    # gather_outputs=False: the loop reads only the loss, so the logits stay vocab-sharded
    # (no [batch, seq, vocab] all-gather; the loss is a vocab-parallel cross-entropy)
    sharded = autotp.shard(model, world, example_inputs=(x,),
                           example_kwargs={"labels": y, "shift_labels": y, "use_cache": False},
                           gather_outputs=False, **options)
    del model  # each rank keeps only its shards
    plan = sharded.plan
    fwd = ", ".join(f"{k} x{v}" for k, v in sorted(plan.counts("forward").items())) or "none"
    print_rank0(f" > {n_params:,} parameters; sharded in {time.perf_counter() - t0:.1f} s; "
                f"{plan.memory['param_bytes_per_rank'] / 2**20:.1f} MiB of parameters per rank "
                f"({plan.memory['param_bytes_per_rank'] / max(plan.memory['param_bytes_total'], 1):.0%}); "
                f"collectives per forward: {fwd}")
    if plan.replicated:
        print_rank0(f" > left replicated: {plan.replicated}")

    decay = [p for p in sharded.parameters() if p.ndim >= 2]  # no weight decay on biases and LayerNorms
    no_decay = [p for p in sharded.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    scaler = make_scaler(args, sharded, device)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    iteration, consumed = load_checkpoint(args, sharded, optimizer, scaler) if args.load else (0, 0)
    micro_steps = args.global_batch_size // args.micro_batch_size
    tokens_per_iter = args.global_batch_size * args.seq_length
    print_rank0(f"> training iterations {iteration + 1} .. {args.train_iters}: global batch {args.global_batch_size} "
                f"({micro_steps} micro-batch(es) of {args.micro_batch_size}) x {args.seq_length} tokens")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def new_window():
        return {"loss": 0.0, "iters": 0, "skipped": 0, "norm": 0.0, "paused": 0.0}

    window = new_window()
    sync()
    t_window = time.perf_counter()
    while iteration < args.train_iters:
        lr = cosine_lr(iteration, max_lr=args.lr, min_lr=args.min_lr, warmup=args.lr_warmup_iters,
                       total=args.lr_decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(micro_steps):
            x, y = get_batch(train_ds, consumed + m * args.micro_batch_size, args.micro_batch_size, device)
            with autocast():
                loss = forward_loss(sharded, x, y) / micro_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += loss.item()
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = clip_grad_norm_(sharded, args.clip_grad if args.clip_grad > 0 else math.inf).item()
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # skipped on every rank alike when any rank overflowed
            scaler.update()
            skipped = scaler.get_scale() < scale_before
        elif math.isfinite(norm):
            optimizer.step()
            skipped = False
        else:
            skipped = True  # a nan/inf gradient without a loss scaler: do not poison the weights
        iteration += 1
        consumed += args.global_batch_size
        window["iters"] += 1
        window["skipped"] += int(skipped)
        if not skipped:
            window["loss"] += loss_sum
            window["norm"] += norm

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            sync()
            dt = (time.perf_counter() - t_window - window["paused"]) / window["iters"]
            good = max(window["iters"] - window["skipped"], 1)
            print_rank0(f" iteration {iteration:8d}/{args.train_iters:8d} | consumed samples: {consumed:12d} | "
                        f"elapsed time per iteration (ms): {dt * 1000:.1f} | learning rate: {lr:.3E} | "
                        f"global batch size: {args.global_batch_size:5d} | lm loss: {window['loss'] / good:.6E} | "
                        f"loss scale: {scaler.get_scale() if scaler is not None else 1.0:.1f} | "
                        f"grad norm: {window['norm'] / good:.3f} | "
                        f"number of skipped iterations: {window['skipped']:3d} | "
                        f"tokens per second: {tokens_per_iter / dt:.0f} |")
            window = new_window()
            t_window = time.perf_counter()
        if iteration == args.fail_at_iteration:
            fail_once(args, rank, world, iteration)
        t_pause = time.perf_counter()  # evaluation and saving are not iteration time
        if valid_ds is not None and iteration % args.eval_interval == 0 and iteration != args.train_iters:
            report_eval(f"at iteration {iteration}", evaluate(sharded, valid_ds, args, device, autocast))
        if args.save and (iteration % args.save_interval == 0 or iteration == args.train_iters):
            save_checkpoint(args, sharded, optimizer, scaler, iteration, consumed)
        window["paused"] += time.perf_counter() - t_pause

    print_rank0("[after training is done]")
    if valid_ds is not None:
        report_eval("at the end of training for val data", evaluate(sharded, valid_ds, args, device, autocast))
    if test_ds is not None and args.eval_iters:
        report_eval("at the end of training for test data", evaluate(sharded, test_ds, args, device, autocast))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: on these machines a rank sometimes aborts in C++
    # static destructors at exit ("terminate called without an active exception", SIGABRT) after
    # all its work is done, and torchrun would report the finished run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""``autotp.parallelize``: tensor parallelism from one ordinary Python process (a notebook).

    lm = autotp.parallelize(model, world_size=2, dtype=torch.bfloat16)
    out = lm.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=20)
    lm.close()          # or: with autotp.parallelize(...) as lm: ...

The model reaches the workers as a checkpoint, not as pickled tensors: a model
object is written once with ``save_pretrained`` to a temporary directory (deleted
as soon as the workers are up; a path is used as it is), and every worker runs ``autotp.from_pretrained`` on it, so a
worker reads only its own slices and no rank ever holds the whole model.  The
workers are an ``autotp.launch.WorkerPool``: plain pipes (no ``/dev/shm``, the
seed's docker trouble), no hangs (a worker that raises or dies becomes a
``WorkerError`` here), no orphans (``close``, context manager, ``atexit``).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .config import resolve_config
from .launch import WorkerPool

__all__ = ["parallelize", "Parallelized", "resolve_backend"]


def _aliases(world_size, num_gpus, dtype, fp16: bool):
    """``world_size`` and ``dtype`` from them or from parallelformers' ``num_gpus`` / ``fp16``."""
    if num_gpus is not None:
        if world_size is not None and world_size != num_gpus:
            raise ValueError(f"world_size={world_size} and num_gpus={num_gpus} disagree; num_gpus is another name "
                             "for world_size: pass one of them")
        world_size = num_gpus
    if world_size is None:
        raise ValueError("autotp.parallelize needs world_size (or num_gpus): the number of ranks")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if fp16:
        if dtype not in (None, torch.float16):
            raise ValueError(f"fp16=True and dtype={dtype} disagree; fp16=True means dtype=torch.float16: pass one")
        dtype = torch.float16
    return world_size, dtype


def resolve_backend(world_size: int, backend: str | None) -> str:
    """``backend``, or by default NCCL when a GPU per rank is visible, else gloo (CPU ranks)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend is None:
        return "nccl" if gpus >= world_size else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None (automatic), got {backend!r}")
    if backend == "nccl" and gpus < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank, but world_size={world_size} and {gpus} CUDA device(s) "
                         "are visible; use backend='gloo' (CPU ranks) or a smaller world_size")
    return backend


class _Rank:
    """One worker's state: its shard of the model."""

    def __init__(self, rank: int, world_size: int, group, payload: dict):
        from .pretrained import from_pretrained

        self.model = from_pretrained(payload["path"], world_size, group=group, dtype=payload["dtype"],
                                     **payload["options"])

    def _here(self, args, kwargs):
        """The caller's (CPU) tensors on this rank's device (its GPU on NCCL ranks)."""
        device = next(self.model.parameters()).device
        return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (args, kwargs))

    def generate(self, *args, **kwargs):
        args, kwargs = self._here(args, kwargs)
        with torch.no_grad():
            return self.model.generate(*args, **kwargs).cpu()

    def forward(self, *args, **kwargs):
        args, kwargs = self._here(args, kwargs)
        with torch.no_grad():
            out = self.model(*args, use_cache=False, **kwargs)
        return out.logits.cpu()

    def info(self) -> dict:
        steps = self.model.autotp_steps
        local = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"plans": steps.plans, "timings": steps.timings, "parameter_bytes": local}


class Parallelized:
    """A handle on a model sharded over worker processes; calls run on every rank and return
    rank 0's result.  ``config`` and ``generation_config`` are the model's."""

    def __init__(self, pool: WorkerPool, config, generation_config):
        self.pool = pool
        self.config = config
        self.generation_config = generation_config
        self._info = None

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """``model.generate(...)`` on every rank (Hugging Face's own); returns the token ids."""
        return self.pool.call("generate", *args, **kwargs)

    def forward(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """The last position's logits ``[batch, 1, vocab]`` (the generation graph's output)."""
        return self.pool.call("forward", input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    __call__ = forward

    @property
    def plans(self) -> dict:
        """The plans the workers applied (``prefill``, ``decode`` and, for seq2seq, ``encoder``)."""
        return self._load_info()["plans"]

    @property
    def parameter_bytes_per_rank(self) -> int:
        return self._load_info()["parameter_bytes"]

    def _load_info(self) -> dict:
        if self._info is None:
            self._info = self.pool.call("info")
        return self._info

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self.pool.close()

    def __enter__(self) -> "Parallelized":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # (dropping the handle closes too: the pool closes itself when collected or at exit)

    def __repr__(self) -> str:
        return f"Parallelized({type(self.config).__name__}, world_size={self.pool.world_size}, alive={self.pool.alive})"


def parallelize(model: nn.Module | str, world_size: int | None = None, *, dtype: torch.dtype | None = None,
                backend: str | None = None, timeout_s: float = 600.0, tmpdir: str | None = None,
                num_gpus: int | None = None, fp16: bool = False, **options) -> Parallelized:
    """Shard a Hugging Face model over ``world_size`` worker processes started from here.

    Args:
        model: a Hugging Face causal LM or seq2seq model, or the path of a ``save_pretrained``
            directory (read in place).
        world_size: number of worker processes (ranks).
        dtype: the workers' parameter dtype (``torch.float16`` / ``torch.bfloat16`` for
            inference); default: the checkpoint's.
        backend: ``"nccl"`` (rank r on ``cuda:r``) or ``"gloo"`` (CPU ranks).  Default: nccl
            when there is a GPU per rank, else gloo.
        num_gpus / fp16: parallelformers' names, accepted as they are written there:
            ``parallelize(model, num_gpus=4, fp16=True)`` is ``world_size=4, dtype=torch.float16``.
        timeout_s: longest a call may take before the workers are stopped and it raises.
        tmpdir: where a model object is written for the workers to load (default: the
            system's temporary directory); deleted as soon as they have loaded it.
        options: ``ShardConfig`` fields (``strict=True``...); ``same_host_collectives`` defaults
            to True here (shared-memory all-reduces between the workers).

    Returns:
        A ``Parallelized`` handle: ``.generate(...)``, ``.forward(...)``, ``.plans``, ``.close()``.

    Raises:
        WorkerError: a worker failed while loading or sharding (its traceback included).
    """
    world_size, dtype = _aliases(world_size, num_gpus, dtype, fp16)
    backend = resolve_backend(world_size, backend)
    if backend == "gloo":  # CPU ranks, on this host by construction: shared-memory collectives
        options.setdefault("same_host_collectives", True)
    resolve_config(None, options).check_for_generation()  # a bad option is the caller's error, before any worker
    made = None
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        path = str(model)
        import transformers
        config = transformers.AutoConfig.from_pretrained(path)
        try:
            generation_config = transformers.GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = transformers.GenerationConfig.from_model_config(config)
    elif hasattr(model, "save_pretrained") and hasattr(model, "config"):
        made = path = tempfile.mkdtemp(prefix="autotp-", dir=tmpdir)
        try:
            model.save_pretrained(path)
        except BaseException:
            shutil.rmtree(made, ignore_errors=True)
            raise
        config, generation_config = model.config, getattr(model, "generation_config", None)
    else:
        raise TypeError(f"autotp.parallelize takes a Hugging Face model (with save_pretrained) or a checkpoint "
                        f"path, got {type(model).__name__}; for other modules use autotp.shard under torchrun")
    payload = {"path": path, "dtype": dtype, "options": options}
    # the host's cores split between the workers, unless the user chose a thread count
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world_size))
    try:
        pool = WorkerPool(world_size, _Rank, payload, backend=backend, timeout_s=timeout_s,
                          env={"OMP_NUM_THREADS": threads})
    finally:  # the workers have read their slices once the pool is up: the copy is no longer needed
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return Parallelized(pool, config, generation_config)

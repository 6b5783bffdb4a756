"""Shard-on-load: each rank reads only its slices of a safetensors checkpoint.

``autotp.from_pretrained(path, world_size=N)`` builds the model from its config
with parameters on the ``meta`` device (no memory, no initialization), gives
each parameter an *uninitialized* CPU tensor for capture -- ``torch.empty``
pages are never touched, so they never become resident -- captures and plans
the generation steps, and then fills each rank's shards from the files through
the ``load`` hook of the lowering: a ``Shard(d)`` parameter reads only the bytes
of its slice (positional reads straight into the local tensor, one per
contiguous run; no ``mmap``, whose touched pages would count toward the rank's
resident memory), a replicated one is read whole.  Peak resident memory per rank is its shards plus one read buffer, where
every peer first loads the whole model on every rank.

The safetensors format is read directly (an 8-byte header length, a JSON
header of ``dtype``/``shape``/``data_offsets``, then the bytes), so this path
needs neither ``safetensors`` nor ``mmap``.
"""
from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["from_pretrained", "SafetensorsReader", "init_empty_parameters"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsReader:
    """Index of the tensors in a checkpoint directory (or one ``.safetensors`` file), read by slices.

    Example::

        >>> r = SafetensorsReader("gpt2-dir")
        >>> r.read("h.0.mlp.c_fc.weight", 1, torch.arange(0, 1536)).shape   # columns 0..1535 only
        torch.Size([768, 1536])
    """

    def __init__(self, path: str):
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            else:
                files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
            files = [os.path.join(path, p) for p in files]
        else:
            files = [path]
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}: save the model with "
                                    "model.save_pretrained(path) (safe_serialization is the default)")
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int]] = {}
        self.bytes_read = 0  # what this reader has read of tensor data (the shard-on-load claim)
        for file in files:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which autotp cannot read")
                self.entries[name] = (file, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + info["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, or its rows ``index`` along ``dim``: positional reads of exactly
        those bytes (one per contiguous run per outer row), no mapping of the file."""
        file, dtype, shape, start = self.entries[name]
        if dim is None:
            dim, index = 0, torch.arange(shape[0]) if shape else None
        if not shape:
            out = torch.empty((), dtype=dtype)
            self._pread(file, [(start, out.view(torch.uint8).numpy().reshape(-1))])
            return out
        outer = math.prod(shape[:dim])
        n = shape[dim]
        row = dtype.itemsize * math.prod(shape[dim + 1:])
        out = torch.empty((*shape[:dim], len(index), *shape[dim + 1:]), dtype=dtype)
        dst = out.view(torch.uint8).numpy().reshape(outer, len(index) * row) if out.numel() else None
        reads, runs = [], _runs(index)
        for o in range(outer if dst is not None else 0):
            at = 0
            for a, b in runs:
                reads.append((start + (o * n + a) * row, dst[o, at * row: (at + b - a) * row]))
                at += b - a
        self._pread(file, reads)
        return out

    def _pread(self, file: str, reads: list) -> None:
        fd = os.open(file, os.O_RDONLY)
        try:
            for offset, buf in reads:
                view, got = memoryview(buf).cast("B"), 0
                while got < len(view):
                    k = os.preadv(fd, [view[got:]], offset + got)
                    if k <= 0:
                        raise IOError(f"{file}: unexpected end of file at byte {offset + got}")
                    got += k
                self.bytes_read += len(view)
        finally:
            os.close(fd)


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    idx = index.tolist()
    runs, a = [], None
    for i, v in enumerate(idx):
        if a is None:
            a = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            runs.append((a, v + 1))
            a = None
    return runs


@contextmanager
def init_empty_parameters():
    """Create modules with parameters on ``meta`` (no memory, no initialization); buffers stay
    real, since non-persistent ones (rotary ``inv_freq``) are computed, not loaded."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize_empty(model: nn.Module) -> None:
    """Give every meta parameter an uninitialized CPU tensor (tied parameters stay one tensor).
    Its pages are never written, so they cost address space, not resident memory."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]


def checkpoint_loader(model: nn.Module, reader: SafetensorsReader):
    """The lowering's ``load(name, dim, index, pad)`` reading from ``reader``.

    Tied parameters are found under any of their names (``save_pretrained`` writes one);
    a parameter missing from the checkpoint is an error, a buffer missing from it (computed
    at construction) keeps the model's own value.
    """
    from .placements import pad_zeros

    aliases: dict[int, list[str]] = {}
    kinds: dict[int, torch.Tensor] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
        kinds[id(t)] = t
    by_name = {n: i for i, names in aliases.items() for n in names}

    def load(name: str, dim, index, pad):
        key = by_name.get(name)
        if key is None:
            raise KeyError(f"{name} is not a parameter or buffer of {type(model).__name__}")
        target = kinds[key]
        found = next((n for n in aliases[key] if n in reader), None)
        if found is None:
            if not isinstance(target, nn.Parameter):
                return None
            raise KeyError(f"parameter {name} is not in the checkpoint (looked for {aliases[key]}); is it the "
                           f"checkpoint of a {type(model).__name__}?")
        if reader.shape(found) != tuple(target.shape):
            raise ValueError(f"{found}: the checkpoint holds shape {reader.shape(found)}, the model expects "
                             f"{tuple(target.shape)}; the config and the weights disagree")
        t = reader.read(found) if dim is None else pad_zeros(reader.read(found, dim, index), dim, pad)
        return t.to(target.dtype)

    return load


def from_pretrained(path: str, world_size: int | None = None, *, group=None, dtype: torch.dtype | None = None,
                    model_class=None, **options):
    """Load a Hugging Face checkpoint directory straight into shards, for ``generate()``.

    Call on every rank (under torchrun, or as ``autotp.parallelize(path, ...)``).

    Args:
        path: a directory written by ``save_pretrained`` (``config.json`` + safetensors).
        world_size: the TP degree; must equal the group's size.
        group: the process group (default: the world).
        dtype: the parameters' dtype (default: the config's ``dtype``, else float32).
        model_class: the class to build (default: ``AutoModelForSeq2SeqLM`` for encoder-decoder
            configs, else ``AutoModelForCausalLM``).
        options: ``ShardConfig`` fields.

    Returns:
        This rank's model, as ``autotp.shard_for_generation`` returns it, with
        ``autotp_load_stats``: the tensor bytes this rank read and the checkpoint's.
    """
    import transformers

    from .generation import shard_for_generation

    hf_config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        model_class = (transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder
                       else transformers.AutoModelForCausalLM)
    dtype = dtype or getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    reader = SafetensorsReader(path)
    with init_empty_parameters():
        model = model_class.from_config(hf_config, dtype=dtype)
    model.eval()
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
    materialize_empty(model)
    sharded = shard_for_generation(model, world_size, group=group, load=checkpoint_loader(model, reader), **options)
    sharded.autotp_load_stats = {"bytes_read": reader.bytes_read,
                                 "checkpoint_bytes": sum(math.prod(e[2]) * e[1].itemsize for e in reader.entries.values())}
    return sharded

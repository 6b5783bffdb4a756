"""How a sharded module's tensors are stored: the layout shared by ``autotp.checkpoint`` and ``autotp.hf_export``.

See ``autotp/checkpoint.py`` for the table of placements and their stored forms.  Also here: the
checkpoint directory's index as JSON (``INDEX_FILE``) and the DCP reader, writer and planner that
use it, so that loading a checkpoint never unpickles anything read from its files.
"""
from __future__ import annotations

import json
import numbers
import os

import torch
import torch.distributed as dist

from .placements import Placement, Shard, pad_zeros, placement_index, shard_index, take_shard
from .plan import ParamPlan


def _stored_shape(global_shape: list[int], pl: Placement) -> list[int]:
    """Shape a tensor is stored with: the global shape, dim d split into (P, N/P) for ``S(d, chunks=P)``."""
    if isinstance(pl, Shard) and pl.chunks > 1:
        d, n = pl.dim, global_shape[pl.dim]
        return [*global_shape[:d], pl.chunks, n // pl.chunks, *global_shape[d + 1:]]
    return list(global_shape)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


class _Layout:
    """Where this rank's tensors sit in the TP group: rank, world size, the 1-D mesh DTensors live on."""

    def __init__(self, sharded, device: torch.device):
        self.rank, self.world = sharded.rank, sharded.world_size
        self.group = sharded.group
        self.device = device
        self._mesh = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            self._mesh = DeviceMesh.from_group(self.group or dist.group.WORLD, self.device.type)
        return self._mesh

    def to_stored(self, local: torch.Tensor, pl: Placement, global_shape: list[int]):
        """This rank's local tensor -> what DCP saves (a DTensor over the TP mesh, or a plain tensor)."""
        if not isinstance(pl, Shard):
            return local
        if pl.pieces:
            return self._whole(local, pl, global_shape)
        d, n = pl.dim, global_shape[pl.dim]
        shape = _stored_shape(global_shape, pl)
        if pl.chunks == 1:
            index, _ = shard_index(n, self.world, self.rank)
            piece = local.narrow(d, 0, len(index))  # padding is not part of the tensor
            dim = d
        else:
            lshape = list(local.shape)
            piece = local.reshape([*lshape[:d], pl.chunks, lshape[d] // pl.chunks, *lshape[d + 1:]])
            dim = d + 1  # (..., chunk, block, ...): rank r holds block r of every chunk
        if not self.distributed:
            return piece.reshape(shape)
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import Shard as DShard

        return DTensor.from_local(piece, self.mesh, [DShard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))

    def _whole(self, local: torch.Tensor, pl: Shard, global_shape: list[int]) -> torch.Tensor:
        """A parameter held in pieces (no DTensor layout mixes sharded and whole rows), stored whole:
        every rank's local tensor gathered (one all-gather) and put back at its global rows."""
        gathered = [torch.empty_like(local) for _ in range(self.world)] if self.distributed else [local]
        if self.distributed:
            dist.all_gather(gathered, local.contiguous(), group=self.group)
        whole = local.new_empty(global_shape)
        for rank, part in enumerate(gathered):
            whole.index_copy_(pl.dim, placement_index(pl, global_shape[pl.dim], self.world, rank)[0].to(local.device),
                              part)
        return whole

    def from_stored(self, stored, pl: Placement, local_shape: list[int]) -> torch.Tensor:
        """Inverse of ``to_stored``: this rank's local tensor, zero padding re-added."""
        from torch.distributed.tensor import DTensor

        t = stored.to_local() if isinstance(stored, DTensor) else stored
        if not isinstance(pl, Shard):
            return t
        if pl.pieces:
            return take_shard(t, pl.dim, *placement_index(pl, t.shape[pl.dim], self.world, self.rank))
        if pl.chunks > 1:
            return t.reshape(local_shape)  # (..., P, block, ...) -> (..., P * block, ...)
        return pad_zeros(t, pl.dim, local_shape[pl.dim] - t.shape[pl.dim])

    def cut(self, full: torch.Tensor, pl: Placement) -> torch.Tensor:
        """This rank's local tensor cut from the global one (where the stored form changed)."""
        if not isinstance(pl, Shard):
            return full
        return take_shard(full, pl.dim, *placement_index(pl, full.shape[pl.dim], self.world, self.rank))


def _entries(sharded) -> dict[str, tuple[torch.Tensor, ParamPlan]]:
    """``{name: (local tensor, plan entry)}`` for every tensor of the plan that the rank's module holds."""
    out = {}
    for name, info in sharded.plan.parameters.items():
        t = sharded.module
        for part in name.split("."):
            t = getattr(t, part, None)
        if not isinstance(t, torch.Tensor):
            continue  # dropped from the rank's graph (never read)
        assert list(t.shape) == list(info.local_shape), (name, list(t.shape), info.local_shape)
        out[name] = (t, info)
    return out


def _data_parallel_mesh(entries):
    """The data-parallel ``DeviceMesh`` when FSDP2 (``fully_shard``) holds this rank's tensors as
    DTensors sharded over it (2-D: autotp on the TP group, FSDP across); else ``None``."""
    from torch.distributed.tensor import DTensor

    for t, _ in entries.values():
        if isinstance(t, DTensor):
            return t.device_mesh
    return None


def _whole(t: torch.Tensor) -> torch.Tensor:
    """This TP rank's tensor, gathered over the data-parallel mesh if FSDP2 shards it (a collective)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (this TP rank's whole tensor) laid out as ``param`` is: FSDP2's data-parallel shard of
    it for a DTensor parameter (cut locally: every data-parallel replica read the same value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def _device(entries) -> torch.device:
    for t, _ in entries.values():
        return t.device
    return torch.device("cpu")


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# ----------------------------------------------------------------------------- the checkpoint directory
#
# DCP writes its index (which tensor chunk lies in which file, at which byte offset) as a pickle,
# ``.metadata``, and its reader unpickles that file: loading an untrusted checkpoint with plain DCP
# runs whatever the file says.  autotp writes the same index as JSON (``INDEX_FILE``, together
# with autotp's own metadata) and loads through a reader that is handed the index decoded from
# that JSON: ``.metadata`` is written for other DCP tools but never read, and no stored object is
# ever unpickled (the index has no way to say "pickled object"; the planner refuses one anyway).
# The tensors themselves are read by DCP with ``torch.load(weights_only=True)``.

INDEX_FILE = "autotp.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _torch_attr(name, kind: type, what: str):
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise ValueError(f"{what} {name!r} is not a torch.{kind.__name__}")
    return value


def _index_to_json(md) -> dict:
    """DCP's ``Metadata`` (what ``.metadata`` pickles) as JSON data."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):  # autotp saves tensors only
            raise AssertionError(f"autotp.checkpoint: {fqn!r} would be stored as a pickled object")
        p = m.properties
        tensors[fqn] = {"kind": "tensor", "dtype": _dtype_name(p.dtype), "size": list(m.size),
                        "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in m.chunks],
                        "layout": str(p.layout).replace("torch.", ""), "requires_grad": bool(p.requires_grad),
                        "memory_format": str(p.memory_format).replace("torch.", ""),
                        "pin_memory": bool(p.pin_memory)}
    storage = [{"fqn": idx.fqn, "offset": None if idx.offset is None else list(idx.offset), "index": idx.index,
                "file": info.relative_path, "start": int(info.offset), "length": int(info.length),
                "transforms": list(getattr(info, "transform_descriptors", None) or [])}
               for idx, info in md.storage_data.items()]
    planner = md.planner_data
    planner = {k: list(v) for k, v in planner.items()} if isinstance(planner, dict) else None
    sm = md.storage_meta
    return {"version": getattr(md, "version", None), "tensors": tensors, "storage": storage,
            "planner_data": planner, "save_id": getattr(sm, "save_id", None) if sm is not None else None}


def _index_from_json(doc, path: str):
    """DCP's ``Metadata`` built from ``_index_to_json``'s data, every field checked (ValueError otherwise)."""
    from dataclasses import fields

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    where = f"checkpoint at {path!r}: {INDEX_FILE}"

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{where} is corrupt: {what}")

    def ints(v, what: str) -> list[int]:
        need(isinstance(v, list) and all(type(i) is int and i >= 0 for i in v),
             f"{what} is {v!r}, not a list of non-negative ints")
        return v

    need(isinstance(doc, dict), "its 'dcp' entry is not an object")
    need(isinstance(doc.get("tensors"), dict) and isinstance(doc.get("storage"), list),
         "the 'dcp' entry has no 'tensors' object or no 'storage' list")
    state = {}
    for fqn, m in doc["tensors"].items():
        need(isinstance(m, dict), f"the entry of {fqn!r} is not an object")
        if m.get("kind") != "tensor":
            raise ValueError(f"{where} says {fqn!r} is stored as {m.get('kind')!r}, not as a tensor: autotp "
                             "checkpoints hold tensors only and autotp never unpickles stored objects; refusing "
                             "to load it (it was not written by autotp.checkpoint.save)")
        size = ints(m.get("size"), f"the size of {fqn!r}")
        chunks = m.get("chunks")
        need(isinstance(chunks, list) and all(isinstance(c, dict) for c in chunks), f"the chunks of {fqn!r}")
        chunks = [ChunkStorageMetadata(offsets=torch.Size(ints(c.get("offsets"), f"a chunk offset of {fqn!r}")),
                                       sizes=torch.Size(ints(c.get("sizes"), f"a chunk size of {fqn!r}")))
                  for c in chunks]
        need(all(len(c.offsets) == len(size) and len(c.sizes) == len(size) for c in chunks),
             f"a chunk of {fqn!r} has another rank than its size {size}")
        need(all(isinstance(m.get(k), bool) for k in ("requires_grad", "pin_memory")),
             f"requires_grad / pin_memory of {fqn!r} are not booleans")
        try:
            props = TensorProperties(dtype=_torch_attr(m.get("dtype"), torch.dtype, "dtype"),
                                     layout=_torch_attr(m.get("layout"), torch.layout, "layout"),
                                     requires_grad=m["requires_grad"],
                                     memory_format=_torch_attr(m.get("memory_format"), torch.memory_format,
                                                               "memory format"),
                                     pin_memory=m["pin_memory"])
        except ValueError as e:
            raise ValueError(f"{where} is corrupt: {fqn!r}: {e}") from None
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=chunks)

    has_transforms = "transform_descriptors" in {f.name for f in fields(_StorageInfo)}
    storage = {}
    for e in doc["storage"]:
        need(isinstance(e, dict) and isinstance(e.get("fqn"), str), f"a storage entry is {e!r}")
        fqn, name = e["fqn"], e.get("file")
        need(fqn in state, f"a storage entry names {fqn!r}, which is not among its tensors")
        # a plain file name in the checkpoint directory: no path leads outside it
        need(isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
             and "/" not in name and "\\" not in name and "\0" not in name,
             f"the storage entry of {fqn!r} names the file {name!r}, not a file of the checkpoint directory")
        offset = None if e.get("offset") is None else torch.Size(ints(e["offset"], f"the offset of {fqn!r}"))
        index = e.get("index")
        need(index is None or type(index) is int, f"the index of {fqn!r} is {index!r}")
        start, length = e.get("start"), e.get("length")
        need(type(start) is int and type(length) is int and start >= 0 and length >= 0,
             f"the byte range of {fqn!r} is {start!r}, {length!r}")
        transforms = e.get("transforms") or []
        need(isinstance(transforms, list) and all(isinstance(t, str) for t in transforms),
             f"the transforms of {fqn!r} are {transforms!r}")
        kw = {"transform_descriptors": transforms} if has_transforms else {}
        if transforms and not has_transforms:
            raise ValueError(f"{where}: {fqn!r} is stored with transforms {transforms}, which this torch cannot read")
        storage[MetadataIndex(fqn=fqn, offset=offset, index=index)] = _StorageInfo(
            relative_path=name, offset=start, length=length, **kw)

    planner = doc.get("planner_data")
    if planner is not None:
        need(isinstance(planner, dict) and all(isinstance(v, list) and all(type(p) in (str, int) for p in v)
                                               for v in planner.values()), "its planner data")
        planner = {k: tuple(v) for k, v in planner.items()}
    save_id = doc.get("save_id")
    kw = {"planner_data": planner, "storage_data": storage}
    names = {f.name for f in fields(Metadata)}
    if "storage_meta" in names:
        kw["storage_meta"] = StorageMeta(checkpoint_id=path, save_id=save_id if isinstance(save_id, str) else None)
    if "version" in names and isinstance(doc.get("version"), str):
        kw["version"] = doc["version"]
    return Metadata(state_dict_metadata=state, **kw)


def _check_files(path: str, md, saved_world: int) -> None:
    """Every file the index points into exists and is long enough: a clear error instead of DCP's per-rank
    tracebacks (or a read of whatever bytes a short file has)."""
    ends: dict[str, int] = {}
    for info in md.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    files = sorted(ends)
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    todo = ("copy the whole checkpoint directory (every .distcp file and autotp.json), or load an earlier "
            "checkpoint")
    if missing:
        raise FileNotFoundError(
            f"checkpoint at {path!r} is incomplete: shard file{'s' if len(missing) > 1 else ''} {_few(missing, 8)} "
            f"{'are' if len(missing) > 1 else 'is'} missing (the save at world size {saved_world} wrote "
            f"{len(files)} file{'s' if len(files) > 1 else ''}: {_few(files, 8)}); {todo}")
    for f in files:
        size = os.path.getsize(os.path.join(path, f))
        if size < ends[f]:
            raise ValueError(f"checkpoint at {path!r} is truncated: shard file {f!r} has {size} bytes, its index "
                             f"needs {ends[f]}; {todo}")


def _writer(path: str, meta: dict):
    """A DCP ``FileSystemWriter`` that also writes ``INDEX_FILE``: ``meta`` plus DCP's index, as JSON."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
            super().set_up_storage_writer(is_coordinator, *args, **kwargs)
            index = os.path.join(path, INDEX_FILE)
            if is_coordinator and os.path.exists(index):
                os.remove(index)  # a half-written save must not look like a checkpoint under the old index

        def finish(self, metadata, results) -> None:
            super().finish(metadata, results)  # fills metadata.storage_data; writes DCP's own .metadata
            text = json.dumps({**meta, "dcp": _index_to_json(metadata)}, allow_nan=True)
            tmp = os.path.join(path, INDEX_FILE + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(path, INDEX_FILE))

    return Writer(path)


def _reader(path: str, md):
    """A DCP ``FileSystemReader`` handed the index ``md`` (from ``INDEX_FILE``): ``.metadata`` is never read."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(md, "storage_meta", None) is not None:
                md.storage_meta.load_id = self.load_id
            return md

    return Reader(path)


def _planner():
    """DCP's default load planner, refusing stored objects (DCP would ``torch.load(weights_only=False)`` them)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; autotp checkpoints "
                             "hold tensors only and autotp never unpickles stored objects")

    return Planner()


def _check_index(path: str, meta: dict, md) -> None:
    """Every tensor ``load`` will ask DCP for is in DCP's index with the shape autotp's metadata gives it."""
    wanted = {f"model.{name}": p["stored_shape"] for name, p in meta["parameters"].items()}
    for name, kinds in ((meta.get("optimizer") or {}).get("state") or {}).items():
        for key, kd in kinds.items():
            if kd["kind"] == "param":
                wanted[f"optim.{name}.{key}"] = meta["parameters"][name]["stored_shape"]
            elif kd["kind"] == "replicated":
                wanted[f"optim.{name}.{key}"] = kd["shape"]
    for fqn, shape in wanted.items():
        m = md.state_dict_metadata.get(fqn)
        if m is None or list(m.size) != list(shape):
            raise ValueError(f"checkpoint at {path!r}: {INDEX_FILE} is corrupt: its index "
                             f"{'lacks ' + repr(fqn) if m is None else f'gives {fqn!r} the shape {list(m.size)}'}, "
                             f"which its metadata says is stored with shape {list(shape)}")


# ----------------------------------------------------------------------------- values as JSON
#
# Everything but tensors is stored as JSON in INDEX_FILE.  The user's ``extra`` must be plain JSON
# data, so that load returns exactly what was saved.  Optimizer hyperparameters and non-tensor
# optimizer state may also hold tuples (Adam's ``betas``) and small tensors (a tensor ``lr``):
# those are written tagged, every dict as {"dict": ...}, a tuple as {"tuple": [...]}, a tensor as
# {"tensor": {...}}, so that decoding is unambiguous and exact.

_JSON_KINDS = "dicts with str keys, lists, str, int, float, bool and None"


def _type_name(value) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_plain_json(value, where: str, stack: tuple = ()) -> None:
    """Raise a ValueError naming the first part of ``value`` that would not come back from JSON as it is."""
    if value is None or type(value) in (bool, int, float, str):
        return
    if id(value) in stack:
        raise ValueError(f"{where} contains itself; it must be JSON data ({_JSON_KINDS})")
    if type(value) is list:
        for i, v in enumerate(value):
            _check_plain_json(v, f"{where}[{i}]", (*stack, id(value)))
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise ValueError(f"{where} has the key {k!r} ({type(k).__name__}); JSON keys are strings, so it "
                                 f"would come back as {json.dumps(str(k))}: use str keys")
            _check_plain_json(v, f"{where}[{k!r}]", (*stack, id(value)))
        return
    hint = {tuple: "; a tuple would come back as a list: pass a list"}.get(type(value), "")
    raise ValueError(f"{where} is a {_type_name(value)}, which autotp.checkpoint "
                     f"cannot store: it must be JSON data ({_JSON_KINDS}), stored as JSON so that loading a "
                     f"checkpoint never unpickles anything{hint}")


def _encode(value, where: str):
    """``value`` (an optimizer hyperparameter or non-tensor state) as tagged JSON data; ValueError if it cannot be."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
    if isinstance(value, torch.Tensor) and not value.is_complex() and value.layout == torch.strided:
        t = value.detach()
        return {"tensor": {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "device": t.device.type,
                           "data": t.cpu().reshape(-1).tolist()}}
    raise ValueError(f"{where} is a {_type_name(value)}, which autotp.checkpoint cannot store (JSON data, tuples "
                     "and real tensors only)")


def _decode(value, device: torch.device):
    """Inverse of ``_encode``; tensors saved off the CPU come back on ``device``."""
    if isinstance(value, list):
        return [_decode(v, device) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or next(iter(value)) not in ("tuple", "dict", "tensor"):
        raise ValueError(f"{INDEX_FILE} is corrupt: {value!r} is not an encoded value")
    (kind, v), = value.items()
    if kind == "tuple" and isinstance(v, list):
        return tuple(_decode(x, device) for x in v)
    if kind == "dict" and isinstance(v, dict):
        return {k: _decode(x, device) for k, x in v.items()}
    if kind == "tensor" and isinstance(v, dict) and isinstance(v.get("data"), list):
        dtype = getattr(torch, str(v.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{INDEX_FILE} is corrupt: a stored tensor has dtype {v.get('dtype')!r}")
        t = torch.tensor(v["data"], dtype=dtype).reshape(v.get("shape"))
        return t if v.get("device") == "cpu" else t.to(device)
    raise ValueError(f"{INDEX_FILE} is corrupt: {value!r} is not an encoded value")

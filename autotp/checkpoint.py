"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), and a consolidated Hugging Face export.

``save`` / ``load`` write and read one DCP checkpoint (a directory: ``autotp.json``, DCP's
``.metadata`` and one ``__{rank}_0.distcp`` file per rank) in which every sharded tensor is a ``DTensor`` on a
1-D ``DeviceMesh`` of the TP group.  DCP then reshards by itself: a checkpoint saved at
world size 4 loads at world size 2 (or 1, or 8), each rank reading only the byte ranges
of the pieces it now holds.  What each autotp placement is stored as::

    placement          this rank's local tensor            stored under the parameter's name
    R                  the whole tensor                    plain tensor, global shape
    S(d)               ceil(N/world) rows, tail zero-pad   DTensor Shard(d), global shape; padding dropped
                                                           (DTensor's uneven Shard = autotp's ceil blocks)
    S(d,chunks=P)      block r of each of P chunks         DTensor Shard(d+1) of the global tensor viewed
                                                           as [..., P, N/P, ...] (same bytes, same order)
    S(d,pieces=...)    block r of each sharded run, the    plain tensor, global shape, gathered whole (no
                       whole runs whole                    DTensor layout mixes sharded and whole rows)

The stored tensor of ``S(d, chunks=P)`` is the global tensor reshaped, so
``stored.reshape(global_shape)`` is the model's own weight.  Where a parameter's stored
form differs between the saved and the current world size (a fused projection sharded
with chunks at one world size and left replicated at another), ``load`` reads it whole
and cuts this rank's slice.

Optimizer state is stored the same way, by parameter name: a state tensor of the
parameter's local shape (Adam's ``exp_avg``, ``exp_avg_sq``; SGD's momentum) takes the
parameter's layout, a 0-dim one (``step``) is replicated.

Everything that is not a tensor is JSON, in ``autotp.json`` (checkpoint format 2): the
format and autotp version, the world size, ``step``, the model's fingerprint (parameter
names, global shapes, dtypes, placements), the optimizer's class, param groups,
hyperparameters and non-tensor state, the user's ``extra`` (which must be JSON data), and
DCP's index of which bytes of which file hold each tensor.  ``load`` reads only that file
and the tensors (DCP reads those with ``torch.load(weights_only=True)``): nothing from the
files is unpickled, so loading an untrusted checkpoint cannot run code.  DCP's own
``.metadata`` (a pickle) is written for other DCP tools and never read.  A format-1
checkpoint (older autotp, metadata pickled) is refused with an error that says so.

``load`` checks, on every rank and before reading any tensor, and raises on every rank
when one fails: the format, the fingerprint (naming the first parameter that differs),
the optimizer's class and param groups, and that every shard file the index names exists
and is long enough (naming a missing one).

``full_state_dict`` gathers the global tensors (a collective; every rank gets them) and
``export_hf`` writes them as a Hugging Face checkpoint (``config.json`` +
``model.safetensors``) that ``from_pretrained`` loads into the unsharded model.

Example (on every rank)::

    sharded = autotp.shard(model, 4, example_inputs=(ids,), example_kwargs={"labels": ids})
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    ...
    autotp.checkpoint.save("ckpt/step100", sharded, opt, step=100)
    # later, at any world size:
    info = autotp.checkpoint.load("ckpt/step100", sharded, opt)   # {"step": 100, "extra": None, "world_size": 4}
    autotp.checkpoint.export_hf(sharded, model, "hf/step100")     # AutoModelForCausalLM.from_pretrained("hf/step100")
"""
from __future__ import annotations

import json
import numbers
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .hf_export import export_hf, full_state_dict
from .placements import Placement, Shard
from .storage import (INDEX_FILE, _check_files, _check_index, _check_plain_json, _data_parallel_mesh, _decode,
                      _device, _dtype_name, _encode, _entries, _few, _index_from_json, _Layout, _like, _planner,
                      _reader, _stored_shape, _whole, _writer)
from .version import __version__

__all__ = ["save", "load", "full_state_dict", "export_hf"]

FORMAT = 2  # bump when the stored layout changes; load refuses newer formats (and format 1: pickled metadata)
_META = "autotp"


def _fingerprint(entries) -> dict[str, dict]:
    return {name: {"placement": repr(info.placement), "global_shape": list(info.global_shape),
                   "dtype": str(t.dtype).replace("torch.", ""),
                   "stored_shape": _stored_shape(list(info.global_shape), info.placement)}
            for name, (t, info) in entries.items()}


# ----------------------------------------------------------------------------- optimizer state


def _optimizer_names(optimizer, entries) -> list[list[str]]:
    """Parameter names of each param group, in the optimizer's order."""
    by_id = {id(t): name for name, (t, _) in entries.items()}
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        names = []
        for p in g["params"]:
            if id(p) not in by_id:
                raise ValueError(
                    f"optimizer param group {i} holds a tensor of shape {list(p.shape)} that is not a parameter "
                    "of the sharded module; build the optimizer over sharded.parameters()"
                )
            names.append(by_id[id(p)])
        groups.append(names)
    return groups


def _state_kind(key: str, value, param: torch.Tensor, pl: Placement, name: str) -> str:
    """``"param"``: laid out like the parameter; ``"replicated"``: identical on every rank (``step``, or
    any state of a replicated parameter); ``"object"``: not a tensor, kept in the metadata entry."""
    if not isinstance(value, torch.Tensor):
        return "object"
    if value.dim() > 0 and value.shape == param.shape:
        return "param"
    if value.dim() == 0 or not isinstance(pl, Shard):
        return "replicated"
    raise ValueError(
        f"optimizer state {key!r} of parameter {name!r} has shape {list(value.shape)}, neither the parameter's "
        f"local shape {list(param.shape)} nor a scalar; autotp.checkpoint shards elementwise optimizer states "
        "only (Adam, AdamW, SGD momentum, ...)"
    )


# ----------------------------------------------------------------------------- save / load


def _dcp_kwargs(layout: _Layout) -> dict:
    if layout.distributed:
        return {"process_group": layout.group}
    return {"no_dist": True}


def _directory(path, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"autotp.checkpoint.{what}: path must be a directory path (str or os.PathLike), "
                        f"got a {type(path).__name__}")
    return os.fspath(path)


def save(path, sharded, optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None,
         extra=None) -> None:
    """Save this rank's shards (and the optimizer state) as one DCP checkpoint at ``path``.

    Collective: call on every rank of the TP group with the same ``path`` (a directory on a
    filesystem every rank can reach).  2-D (data x tensor parallel): under FSDP2 (``fully_shard``
    on the data-parallel mesh) call it on every rank -- each tensor is gathered over the
    data-parallel replicas and replica 0's TP group writes; under DDP (every replica holds the
    same tensors) call it on one replica's ranks only.  ``load`` is called on every rank.

    Args:
        path: checkpoint directory (created; files in it are overwritten).
        sharded: the ``ShardedModule`` from ``autotp.shard``.
        optimizer: optional optimizer over ``sharded.parameters()``; its state is saved by
            parameter name, sharded like the parameters.  Its hyperparameters and non-tensor
            state must be JSON data, tuples or tensors (those of torch's optimizers are).
        step: optional training step (an int), returned by ``load``.
        extra: optional JSON data (dicts with str keys, lists, str, int, float, bool, None:
            a data-loader position, a scheduler's ``state_dict()``...), the same on every rank
            (rank 0's copy is stored); returned by ``load`` exactly as given.

    Raises:
        ValueError: ``extra`` is not JSON data (the message names the offending part, e.g.
            ``extra['sched'][0] is a tuple``), ``step`` is not an int, or an optimizer
            hyperparameter cannot be stored.
    """
    path = _directory(path, "save")
    _check_plain_json(extra, "extra")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"step must be an int or None, got {step!r} ({type(step).__name__})")
        step = int(step)
    entries = _entries(sharded)
    layout = _Layout(sharded, _device(entries))
    meta = {"format": FORMAT, "autotp_version": __version__, "world_size": sharded.world_size, "step": step,
            "parameters": _fingerprint(entries), "optimizer": None}
    dp_mesh = _data_parallel_mesh(entries)  # FSDP2 across data-parallel replicas: gather, replica 0 writes
    model_sd = {}
    for name, (t, info) in entries.items():
        model_sd[name] = layout.to_stored(_whole(t.detach()), info.placement,
                                          list(info.global_shape))
    state_dict = {"model": model_sd}
    if optimizer is not None:
        groups = _optimizer_names(optimizer, entries)
        params = {name: t for name, (t, _) in entries.items()}
        state, kinds = {}, {}
        for group_names, group in zip(groups, optimizer.param_groups):
            for name, p in zip(group_names, group["params"]):
                if p not in optimizer.state:
                    continue
                info = entries[name][1]
                pl = info.placement
                st, kd = {}, {}
                for key, value in optimizer.state[p].items():
                    kind = _state_kind(key, value, params[name], pl, name)
                    if kind == "param":
                        st[key] = layout.to_stored(_whole(value.detach()), pl, list(info.global_shape))
                        kd[key] = {"kind": kind, "dtype": _dtype_name(value.dtype)}
                    elif kind == "replicated":
                        st[key] = value.detach()
                        kd[key] = {"kind": kind, "dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
                    else:
                        kd[key] = {"kind": kind,
                                   "value": _encode(value, f"optimizer state {key!r} of parameter {name!r}")}
                if st:
                    state[name] = st
                kinds[name] = kd
        hyper = [{k: _encode(v, f"optimizer param group {i}'s {k!r}") for k, v in g.items() if k != "params"}
                 for i, g in enumerate(optimizer.param_groups)]
        meta["optimizer"] = {"class": type(optimizer).__name__, "param_groups": [
            {"params": names, "hyper": h} for names, h in zip(groups, hyper)], "state": kinds}
        state_dict["optim"] = state
    meta["extra"] = extra
    if dp_mesh is not None and dp_mesh.get_local_rank() != 0:
        return  # another data-parallel replica holds the same tensors and writes them
    os.makedirs(path, exist_ok=True)
    dcp.save(state_dict, storage_writer=_writer(path, meta), **_dcp_kwargs(layout))


def _check_fingerprint(path, saved: dict, here: dict) -> None:
    """Raise a ValueError naming the first parameter whose name or global shape differs."""
    where = f"checkpoint at {os.fspath(path)!r} was saved from a different model"
    missing = [n for n in here if n not in saved]
    unknown = [n for n in saved if n not in here]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"parameter(s) {_few(missing)} of this model are not in it")
        if unknown:
            parts.append(f"it has parameter(s) {_few(unknown)} this model lacks")
        raise ValueError(f"{where}: {'; '.join(parts)}")
    for name, info in here.items():
        if saved[name]["global_shape"] != info["global_shape"]:
            raise ValueError(f"{where}: parameter {name!r} has global shape {saved[name]['global_shape']} there, "
                             f"{info['global_shape']} here")


def _refuse_unreadable(path: str) -> None:
    """No ``INDEX_FILE``: say whether this is no checkpoint, an older autotp's, or another program's."""
    dcp_index = os.path.join(path, ".metadata")
    if not os.path.exists(dcp_index):
        raise FileNotFoundError(f"no checkpoint at {path!r} (no {INDEX_FILE} or .metadata file); "
                                "write one with autotp.checkpoint.save")
    with open(dcp_index, "rb") as f:
        raw = f.read()  # searched as bytes, never unpickled
    if b"autotp.meta" in raw:
        raise ValueError(
            f"checkpoint at {path!r} was written by an older autotp (checkpoint format 1, which stored its metadata "
            f"pickled) and cannot be loaded safely: reading it means unpickling data from the files, which can run "
            f"arbitrary code. Save it again with this autotp ({__version__}, format {FORMAT}); if you trust the "
            f"file, load it with the autotp that wrote it and export its weights with autotp.checkpoint.export_hf "
            f"(safetensors), which autotp.from_pretrained reads")
    raise ValueError(f"{path!r} is not an autotp checkpoint: a torch.distributed.checkpoint without autotp's "
                     f"{_META!r} entry (no {INDEX_FILE}); autotp.checkpoint.load reads checkpoints written by "
                     "autotp.checkpoint.save (and never DCP's pickled .metadata)")


def _read_meta(path: str) -> tuple[dict, object]:
    """autotp's metadata and DCP's index from ``INDEX_FILE``, checked, and the shard files checked to exist."""
    index = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index):
        _refuse_unreadable(path)
    try:
        with open(index, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint at {path!r}: {INDEX_FILE} is not valid JSON ({e}); the save that wrote it "
                         "did not finish, or the file was damaged") from None
    if not isinstance(meta, dict) or type(meta.get("format")) is not int:
        raise ValueError(f"checkpoint at {path!r}: {INDEX_FILE} has no checkpoint format; it was not written by "
                         "autotp.checkpoint.save")
    if meta["format"] > FORMAT:
        raise ValueError(f"checkpoint at {path!r} has format {meta['format']} (autotp "
                         f"{meta.get('autotp_version')}); this autotp ({__version__}) reads format {FORMAT}: "
                         "upgrade autotp")
    if meta["format"] < FORMAT:
        raise ValueError(f"checkpoint at {path!r} has format {meta['format']}, written by an older autotp; this "
                         f"autotp ({__version__}) reads format {FORMAT}: save it again with this autotp")
    _check_meta(path, meta)
    md = _index_from_json(meta.get("dcp"), path)
    _check_index(path, meta, md)
    _check_files(path, md, meta["world_size"])
    return meta, md


def _check_meta(path: str, meta: dict) -> None:
    """The fields ``load`` reads have the types ``save`` writes (a hand-made or damaged file is a clear error)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"checkpoint at {path!r}: {INDEX_FILE} is corrupt: {what}")

    def shape(v) -> bool:
        return isinstance(v, list) and all(type(i) is int and i >= 0 for i in v)

    need(type(meta.get("world_size")) is int and meta["world_size"] >= 1, "no world size")
    need(meta.get("step") is None or type(meta["step"]) is int, "the step is not an int")
    params = meta.get("parameters")
    need(isinstance(params, dict) and all(isinstance(p, dict) and shape(p.get("global_shape"))
                                          and shape(p.get("stored_shape")) for p in params.values()),
         "its parameters have no global or stored shapes")
    opt = meta.get("optimizer")
    if opt is None:
        return
    need(isinstance(opt, dict) and isinstance(opt.get("class"), str), "its optimizer entry has no class")
    groups = opt.get("param_groups")
    need(isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("hyper"), dict) and isinstance(g.get("params"), list)
        and all(isinstance(n, str) and n in params for n in g["params"]) for g in groups),
         "its optimizer param groups")
    state = opt.get("state")
    in_groups = {n for g in groups for n in g["params"]}
    need(isinstance(state, dict) and all(n in in_groups and isinstance(kinds, dict) for n, kinds in state.items()),
         "its optimizer state names parameters that are in none of its param groups")
    for name, kinds in state.items():
        for key, kd in kinds.items():
            need(isinstance(kd, dict) and kd.get("kind") in ("param", "replicated", "object"),
                 f"optimizer state {key!r} of {name!r}")
            if kd["kind"] != "object":
                need(isinstance(getattr(torch, str(kd.get("dtype")), None), torch.dtype),
                     f"optimizer state {key!r} of {name!r} has dtype {kd.get('dtype')!r}")
            if kd["kind"] == "replicated":
                need(shape(kd.get("shape")), f"optimizer state {key!r} of {name!r} has no shape")


def _on_every_rank(layout: _Layout, path: str, fn):
    """``fn()``, raising on every rank of the group when it raised on any: no rank goes on alone into
    DCP's collectives (and hangs there) because another could not read its filesystem."""
    try:
        result, error = fn(), None
    except Exception as e:  # re-raised below, after the ranks agree
        result, error = None, e
    if layout.distributed:
        failed = torch.zeros(layout.world, dtype=torch.int32, device=layout.device)
        failed[layout.rank] = int(error is not None)
        dist.all_reduce(failed, group=layout.group)
        if error is None and bool(failed.any()):
            ranks = failed.nonzero().flatten().tolist()
            raise RuntimeError(f"checkpoint at {path!r} cannot be loaded: rank(s) {ranks} of the TP group failed "
                               "to read it (their errors say why)")
    if error is not None:
        raise error
    return result


def load(path, sharded, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by ``save`` into ``sharded`` (and ``optimizer``), in place.

    Collective: call on every rank of the TP group.  The checkpoint may come from any world
    size: DCP reads each rank's slice of the saved shards (resharding).  Nothing read from
    the files is unpickled: autotp's metadata and DCP's index are JSON (``autotp.json``), the
    tensors are read with ``torch.load(weights_only=True)``.  The checks below run on every
    rank before any tensor is read, and every rank raises when one of them fails on any rank
    (the others with a RuntimeError naming the ranks that failed): no rank is left waiting.

    Args:
        path: the directory ``save`` wrote.
        sharded: a ``ShardedModule`` of the same model (names and global shapes are checked;
            a dtype may differ, the values are cast).
        optimizer: optional optimizer over ``sharded.parameters()``, built like the saved one
            (same param groups); its state and hyperparameters are replaced by the saved ones.

    Returns:
        ``{"step": ..., "extra": ..., "world_size": <world size it was saved at>}``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``, or one of its shard files is missing
            (the message names it).
        ValueError: the checkpoint is from a different model (a parameter's name or global
            shape differs), is not an autotp checkpoint, was written by an older autotp
            (format 1 pickled its metadata: it is refused, never unpickled), is truncated or
            corrupt, or has no optimizer state when ``optimizer`` is given.
        RuntimeError: another rank of the group raised one of these.
    """
    path = _directory(path, "load")
    entries = _entries(sharded)
    layout = _Layout(sharded, _device(entries))
    here = _fingerprint(entries)

    def check():
        meta, md = _read_meta(path)
        _check_fingerprint(path, meta["parameters"], here)
        if optimizer is not None and meta.get("optimizer") is None:
            raise ValueError(f"checkpoint at {path!r} holds no optimizer state (saved without an optimizer); "
                             "call load(path, sharded) without one")
        if optimizer is not None and meta["optimizer"]["class"] != type(optimizer).__name__:
            raise ValueError(f"checkpoint at {path!r} holds the state of a {meta['optimizer']['class']}, "
                             f"not of a {type(optimizer).__name__}; build the optimizer the way the saved one was "
                             "built")
        decoded = None
        if optimizer is not None:
            _check_optimizer_groups(path, meta["optimizer"]["param_groups"], _optimizer_names(optimizer, entries))
            decoded = _decode_optimizer(path, meta["optimizer"], layout.device)
        return meta, md, decoded

    meta, md, decoded = _on_every_rank(layout, path, check)
    saved = meta["parameters"]

    def target(name: str, dtype: torch.dtype):
        """An empty load target for ``name``: this rank's stored form, or the saved form read whole."""
        t, info = entries[name]
        if saved[name]["stored_shape"] == here[name]["stored_shape"]:
            return layout.to_stored(torch.zeros(t.shape, dtype=dtype, device=t.device),
                                    info.placement, here[name]["global_shape"])
        return torch.zeros(saved[name]["stored_shape"], dtype=dtype, device=t.device)

    def local(name: str, loaded) -> torch.Tensor:
        t, info = entries[name]
        pl = info.placement
        if saved[name]["stored_shape"] == here[name]["stored_shape"]:
            return _like(layout.from_stored(loaded, pl, list(t.shape)), t)
        return _like(layout.cut(loaded.reshape(here[name]["global_shape"]), pl), t)

    state_dict = {"model": {name: target(name, t.dtype) for name, (t, _) in entries.items()}}
    opt_meta = meta.get("optimizer") if optimizer is not None else None
    if opt_meta is not None:
        state_dict["optim"] = {}
        for name, kinds in opt_meta["state"].items():
            st = {}
            for key, kd in kinds.items():
                if kd["kind"] == "param":
                    st[key] = target(name, getattr(torch, kd["dtype"]))
                elif kd["kind"] == "replicated":
                    st[key] = torch.zeros(kd["shape"], dtype=getattr(torch, kd["dtype"]), device=layout.device)
            if st:
                state_dict["optim"][name] = st
    dcp.load(state_dict, storage_reader=_reader(path, md), planner=_planner(), **_dcp_kwargs(layout))

    with torch.no_grad():
        for name, (t, _) in entries.items():
            t.copy_(local(name, state_dict["model"][name]))
    if opt_meta is not None:
        _load_optimizer(optimizer, entries, opt_meta, decoded, state_dict["optim"], local)
    return {"step": meta.get("step"), "extra": meta.get("extra"), "world_size": meta["world_size"]}


def _check_optimizer_groups(path: str, saved_groups: list, groups: list[list[str]]) -> None:
    if len(saved_groups) != len(groups) or any(sorted(s["params"]) != sorted(g) for s, g in zip(saved_groups, groups)):
        raise ValueError(
            f"checkpoint at {path!r} was saved with an optimizer whose param groups hold "
            f"{[len(s['params']) for s in saved_groups]} parameters, this one's hold {[len(g) for g in groups]} "
            "(or other names); build the optimizer the way the saved one was built"
        )


def _decode_optimizer(path: str, opt_meta: dict, device: torch.device) -> tuple[list[dict], dict]:
    """The saved hyperparameters of each param group, and the non-tensor state ``{(name, key): value}``."""
    try:
        hyper = [{k: _decode(v, device) for k, v in g["hyper"].items()} for g in opt_meta["param_groups"]]
        objects = {(name, key): _decode(kd["value"], device) for name, kinds in opt_meta["state"].items()
                   for key, kd in kinds.items() if kd["kind"] == "object"}
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ValueError(f"checkpoint at {path!r}: {INDEX_FILE} is corrupt: its optimizer hyperparameters or state "
                         f"cannot be decoded ({e})") from None
    return hyper, objects


def _load_optimizer(optimizer, entries, opt_meta, decoded, loaded, local) -> None:
    """Hand the loaded state to ``optimizer.load_state_dict`` in the current optimizer's parameter order."""
    hyper, objects = decoded
    groups = _optimizer_names(optimizer, entries)
    index = {name: i for i, name in enumerate(n for g in groups for n in g)}
    state = {}
    for name, kinds in opt_meta["state"].items():
        st = {}
        for key, kd in kinds.items():
            if kd["kind"] == "param":
                st[key] = local(name, loaded[name][key])
            elif kd["kind"] == "replicated":
                st[key] = loaded[name][key]
            else:
                st[key] = objects[(name, key)]
        state[index[name]] = st
    param_groups = [{**h, "params": [index[n] for n in g]} for h, g in zip(hyper, groups)]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})

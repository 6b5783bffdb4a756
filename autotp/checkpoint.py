"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), and a consolidated Hugging Face export.

``save`` / ``load`` write and read one DCP checkpoint (a directory: ``.metadata`` and one
``__{rank}_0.distcp`` file per rank) in which every sharded tensor is a ``DTensor`` on a
1-D ``DeviceMesh`` of the TP group.  DCP then reshards by itself: a checkpoint saved at
world size 4 loads at world size 2 (or 1, or 8), each rank reading only the byte ranges
of the pieces it now holds.  What each autotp placement is stored as::

    placement          this rank's local tensor            stored under the parameter's name
    R                  the whole tensor                    plain tensor, global shape
    S(d)               ceil(N/world) rows, tail zero-pad   DTensor Shard(d), global shape; padding dropped
                                                           (DTensor's uneven Shard = autotp's ceil blocks)
    S(d,chunks=P)      block r of each of P chunks         DTensor Shard(d+1) of the global tensor viewed
                                                           as [..., P, N/P, ...] (same bytes, same order)

The stored tensor of ``S(d, chunks=P)`` is the global tensor reshaped, so
``stored.reshape(global_shape)`` is the model's own weight.  Where a parameter's stored
form differs between the saved and the current world size (a fused projection sharded
with chunks at one world size and left replicated at another), ``load`` reads it whole
and cuts this rank's slice.

Optimizer state is stored the same way, by parameter name: a state tensor of the
parameter's local shape (Adam's ``exp_avg``, ``exp_avg_sq``; SGD's momentum) takes the
parameter's layout, a 0-dim one (``step``) is replicated.  An ``"autotp"`` entry holds
the model's fingerprint (parameter names, global shapes, dtypes, placements), the world
size, the autotp version, ``step`` and ``extra``; ``load`` checks the fingerprint first
and names the first parameter that differs.

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

import os
import pickle

import torch
import torch.distributed.checkpoint as dcp

from .hf_export import export_hf, full_state_dict
from .placements import Placement, Shard
from .storage import _device, _entries, _few, _Layout, _stored_shape
from .version import __version__

__all__ = ["save", "load", "full_state_dict", "export_hf"]

FORMAT = 1  # bump when the stored layout changes; load refuses newer formats
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


def save(path, sharded, optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None,
         extra=None) -> None:
    """Save this rank's shards (and the optimizer state) as one DCP checkpoint at ``path``.

    Collective: call on every rank of the TP group with the same ``path`` (a directory on a
    filesystem every rank can reach).

    Args:
        path: checkpoint directory (created; files in it are overwritten).
        sharded: the ``ShardedModule`` from ``autotp.shard``.
        optimizer: optional optimizer over ``sharded.parameters()``; its state is saved by
            parameter name, sharded like the parameters.
        step: optional training step, returned by ``load``.
        extra: optional picklable object (data-loader position, scheduler state...), the same
            on every rank (one rank's copy is stored); returned by ``load``.
    """
    entries = _entries(sharded)
    layout = _Layout(sharded, _device(entries))
    meta = {"format": FORMAT, "autotp_version": __version__, "world_size": sharded.world_size, "step": step,
            "parameters": _fingerprint(entries), "optimizer": None}
    model_sd = {}
    for name, (t, info) in entries.items():
        model_sd[name] = layout.to_stored(t.detach(), info.placement,
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
                        st[key] = layout.to_stored(value.detach(), pl, list(info.global_shape))
                        kd[key] = {"kind": kind, "dtype": str(value.dtype).replace("torch.", "")}
                    elif kind == "replicated":
                        st[key] = value.detach()
                        kd[key] = {"kind": kind, "dtype": str(value.dtype).replace("torch.", ""),
                                   "shape": list(value.shape)}
                    else:
                        kd[key] = {"kind": kind, "value": value}
                if st:
                    state[name] = st
                kinds[name] = kd
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        meta["optimizer"] = {"class": type(optimizer).__name__, "param_groups": [
            {"params": names, "hyper": h} for names, h in zip(groups, hyper)], "state": kinds}
        state_dict["optim"] = state
    state_dict[_META] = {"meta": pickle.dumps(meta), "extra": pickle.dumps(extra)}
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(path, exist_ok=True)
    dcp.save(state_dict, checkpoint_id=path, **_dcp_kwargs(layout))


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


def _read_meta(path, layout: _Layout) -> tuple[dict, object]:
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r} (no .metadata file); "
                                "write one with autotp.checkpoint.save")
    from torch.distributed.checkpoint import DefaultLoadPlanner

    holder = {_META: {"meta": None, "extra": None}}  # stored as two entries, "autotp.meta" and "autotp.extra"
    dcp.load(holder, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True), **_dcp_kwargs(layout))
    if not isinstance(holder[_META]["meta"], bytes):
        raise ValueError(f"{os.fspath(path)!r} is a torch.distributed.checkpoint without autotp's {_META!r} entry; "
                         "autotp.checkpoint.load reads checkpoints written by autotp.checkpoint.save")
    meta = pickle.loads(holder[_META]["meta"])
    if meta.get("format", 0) > FORMAT:
        raise ValueError(f"checkpoint at {os.fspath(path)!r} has format {meta['format']} (autotp "
                         f"{meta.get('autotp_version')}); this autotp ({__version__}) reads format <= {FORMAT}: "
                         "upgrade autotp")
    return meta, pickle.loads(holder[_META]["extra"])


def load(path, sharded, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by ``save`` into ``sharded`` (and ``optimizer``), in place.

    Collective: call on every rank of the TP group.  The checkpoint may come from any world
    size: DCP reads each rank's slice of the saved shards (resharding).

    Args:
        path: the directory ``save`` wrote.
        sharded: a ``ShardedModule`` of the same model (names and global shapes are checked;
            a dtype may differ, the values are cast).
        optimizer: optional optimizer over ``sharded.parameters()``, built like the saved one
            (same param groups); its state and hyperparameters are replaced by the saved ones.

    Returns:
        ``{"step": ..., "extra": ..., "world_size": <world size it was saved at>}``.

    Raises:
        ValueError: the checkpoint is from a different model (a parameter's name or global
            shape differs), is not an autotp checkpoint, or has no optimizer state when
            ``optimizer`` is given.
    """
    entries = _entries(sharded)
    layout = _Layout(sharded, _device(entries))
    meta, extra = _read_meta(path, layout)
    saved = meta["parameters"]
    here = _fingerprint(entries)
    _check_fingerprint(path, saved, here)
    if optimizer is not None and meta.get("optimizer") is None:
        raise ValueError(f"checkpoint at {os.fspath(path)!r} holds no optimizer state (saved without an optimizer); "
                         "call load(path, sharded) without one")
    if optimizer is not None and meta["optimizer"]["class"] != type(optimizer).__name__:
        raise ValueError(f"checkpoint at {os.fspath(path)!r} holds the state of a {meta['optimizer']['class']}, "
                         f"not of a {type(optimizer).__name__}; build the optimizer the way the saved one was built")

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
            return layout.from_stored(loaded, pl, list(t.shape))
        return layout.cut(loaded.reshape(here[name]["global_shape"]), pl)

    state_dict = {"model": {name: target(name, t.dtype) for name, (t, _) in entries.items()}}
    opt_meta = meta.get("optimizer") if optimizer is not None else None
    if opt_meta is not None:
        state_dict["optim"] = {}
        for name, kinds in opt_meta["state"].items():
            st = {}
            for key, kd in kinds.items():
                dtype = getattr(torch, kd.get("dtype", "float32"))
                if kd["kind"] == "param":
                    st[key] = target(name, dtype)
                elif kd["kind"] == "replicated":
                    st[key] = torch.zeros(kd["shape"], dtype=dtype, device=layout.device)
            if st:
                state_dict["optim"][name] = st
    dcp.load(state_dict, checkpoint_id=path, **_dcp_kwargs(layout))

    with torch.no_grad():
        for name, (t, _) in entries.items():
            t.copy_(local(name, state_dict["model"][name]))
    if opt_meta is not None:
        _load_optimizer(path, optimizer, entries, opt_meta, state_dict["optim"], local)
    return {"step": meta.get("step"), "extra": extra, "world_size": meta["world_size"]}


def _load_optimizer(path, optimizer, entries, opt_meta, loaded, local) -> None:
    """Hand the loaded state to ``optimizer.load_state_dict`` in the current optimizer's parameter order."""
    groups = _optimizer_names(optimizer, entries)
    saved_groups = opt_meta["param_groups"]
    if len(saved_groups) != len(groups) or any(sorted(s["params"]) != sorted(g) for s, g in zip(saved_groups, groups)):
        raise ValueError(
            f"checkpoint at {os.fspath(path)!r} was saved with an optimizer whose param groups hold "
            f"{[len(s['params']) for s in saved_groups]} parameters, this one's hold {[len(g) for g in groups]} "
            "(or other names); build the optimizer the way the saved one was built"
        )
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
                st[key] = kd["value"]
        state[index[name]] = st
    param_groups = [{**s["hyper"], "params": [index[n] for n in g]} for s, g in zip(saved_groups, groups)]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})

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
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .placements import Placement, Shard, pad_zeros, parse_placement, shard_index, take_shard

__all__ = ["save", "load", "full_state_dict", "export_hf"]

FORMAT = 1  # bump when the stored layout changes; load refuses newer formats
_META = "autotp"


# ----------------------------------------------------------------------------- layout


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

    def from_stored(self, stored, pl: Placement, local_shape: list[int]) -> torch.Tensor:
        """Inverse of ``to_stored``: this rank's local tensor, zero padding re-added."""
        from torch.distributed.tensor import DTensor

        t = stored.to_local() if isinstance(stored, DTensor) else stored
        if not isinstance(pl, Shard):
            return t
        if pl.chunks > 1:
            return t.reshape(local_shape)  # (..., P, block, ...) -> (..., P * block, ...)
        return pad_zeros(t, pl.dim, local_shape[pl.dim] - t.shape[pl.dim])

    def cut(self, full: torch.Tensor, pl: Placement) -> torch.Tensor:
        """This rank's local tensor cut from the global one (where the stored form changed)."""
        if not isinstance(pl, Shard):
            return full
        return take_shard(full, pl.dim, *shard_index(full.shape[pl.dim], self.world, self.rank, pl.chunks))


def _entries(sharded) -> dict[str, tuple[torch.Tensor, dict]]:
    """``{name: (local tensor, plan entry)}`` for every tensor of the plan that the rank's module holds."""
    out = {}
    for name, info in sharded.plan.parameters.items():
        t = sharded.module
        for part in name.split("."):
            t = getattr(t, part, None)
        if not isinstance(t, torch.Tensor):
            continue  # dropped from the rank's graph (never read)
        assert list(t.shape) == list(info["local_shape"]), (name, list(t.shape), info["local_shape"])
        out[name] = (t, info)
    return out


def _device(entries) -> torch.device:
    for t, _ in entries.values():
        return t.device
    return torch.device("cpu")


def _fingerprint(entries) -> dict[str, dict]:
    return {name: {"placement": info["placement"], "global_shape": [int(s) for s in info["global_shape"]],
                   "dtype": str(t.dtype).replace("torch.", ""),
                   "stored_shape": _stored_shape([int(s) for s in info["global_shape"]], parse_placement(info["placement"]))}
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
    meta = {"format": FORMAT, "autotp_version": _version(), "world_size": sharded.world_size, "step": step,
            "parameters": _fingerprint(entries), "optimizer": None}
    model_sd = {}
    for name, (t, info) in entries.items():
        model_sd[name] = layout.to_stored(t.detach(), parse_placement(info["placement"]),
                                          [int(s) for s in info["global_shape"]])
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
                pl = parse_placement(info["placement"])
                st, kd = {}, {}
                for key, value in optimizer.state[p].items():
                    kind = _state_kind(key, value, params[name], pl, name)
                    if kind == "param":
                        st[key] = layout.to_stored(value.detach(), pl, [int(s) for s in info["global_shape"]])
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


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


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
                         f"{meta.get('autotp_version')}); this autotp ({_version()}) reads format <= {FORMAT}: "
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
                                    parse_placement(info["placement"]), here[name]["global_shape"])
        return torch.zeros(saved[name]["stored_shape"], dtype=dtype, device=t.device)

    def local(name: str, loaded) -> torch.Tensor:
        t, info = entries[name]
        pl = parse_placement(info["placement"])
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


# ----------------------------------------------------------------------------- consolidated export


def full_state_dict(sharded) -> dict[str, torch.Tensor]:
    """Every tensor of ``sharded`` gathered to its global value, keyed by the plan's names.

    Collective (one all-gather per sharded tensor): call on every rank; every rank gets the
    whole dict.  Padding is stripped and chunked layouts restored, so the result is the
    unsharded model's ``state_dict()`` (one name per tied tensor, e.g. GPT-2's
    ``lm_head.weight``) with the current values.

    Example::

        >>> sd = autotp.checkpoint.full_state_dict(sharded)
        >>> sd["transformer.h.0.attn.c_attn.weight"].shape   # S(1,chunks=3) over the ranks
        torch.Size([64, 192])
    """
    from torch.distributed.tensor import DTensor

    entries = _entries(sharded)
    layout = _Layout(sharded, _device(entries))
    out = {}
    for name, (t, info) in entries.items():
        shape = [int(s) for s in info["global_shape"]]
        stored = layout.to_stored(t.detach(), parse_placement(info["placement"]), shape)
        if isinstance(stored, DTensor):
            stored = stored.full_tensor()
        out[name] = stored.reshape(shape).clone()
    return out


def export_hf(sharded, model_or_config, path) -> None:
    """Write a consolidated Hugging Face checkpoint of ``sharded`` at ``path``.

    ``config.json`` and ``model.safetensors`` (split in shards with an index above 5 GB),
    loadable with ``AutoModelForCausalLM.from_pretrained(path)`` (or the model's class).
    Collective: call on every rank; rank 0 writes.

    Args:
        sharded: the ``ShardedModule``.
        model_or_config: the Hugging Face model that was sharded (any device, ``meta`` too)
            or its config (then an ``AutoModelForCausalLM`` is built on ``meta`` to learn the
            state-dict names).  It gives the names the checkpoint must have, tied names
            included (GPT-2's ``transformer.wte.weight`` is ``lm_head.weight``).
        path: output directory.
    """
    full = full_state_dict(sharded)
    model = model_or_config
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    state, taken_from_model = _hf_state_dict(full, model)
    rank = sharded.rank
    error = None
    if rank == 0:
        try:
            from huggingface_hub import save_torch_state_dict

            if taken_from_model:
                warnings.warn(f"export_hf: {_few(taken_from_model)} are not part of the sharded module (its forward "
                              "never reads them); exported from the model as they are", stacklevel=2)
            os.makedirs(path, exist_ok=True)
            model.config.save_pretrained(path)
            save_torch_state_dict(state, path, max_shard_size="5GB")
        except Exception as e:  # reported on every rank, not left to hang the others
            error = e
    if sharded.world_size > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=dist.get_global_rank(sharded.group, 0) if sharded.group else 0,
                                   group=sharded.group)
        if box[0] is not None and error is None:
            raise RuntimeError(f"export_hf failed on rank 0: {box[0]}")
    if error is not None:
        raise error


def _hf_state_dict(full: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's ``state_dict`` names filled from ``full``; tied aliases get their own copy."""
    aliases: dict[int, list[str]] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        aliases.setdefault(id(t), []).append(name)
    names_of = {n: names for names in aliases.values() for n in names}
    own = model.state_dict(keep_vars=True)
    state, from_model, missing = {}, [], []
    for key, t in own.items():
        src = next((n for n in names_of.get(key, [key]) if n in full), None)
        if src is not None:
            state[key] = full[src] if src == key else full[src].clone()  # safetensors refuses shared storage
        elif t.device.type != "meta":
            state[key] = t.detach().clone()
            from_model.append(key)
        else:
            missing.append(key)
    if missing:
        raise ValueError(
            f"export_hf: the model's state-dict entries {_few(missing)} are in neither the sharded module "
            f"(names {_few(sorted(full))}) nor the model (it is on the meta device); pass the model with its weights"
        )
    shapes = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        raise ValueError(f"export_hf: {k!r} has shape {list(state[k].shape)} in the sharded module but "
                         f"{list(own[k].shape)} in the model; pass the model (or config) that was sharded")
    return state, from_model


def _version() -> str:
    from . import __version__

    return __version__

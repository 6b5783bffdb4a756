"""A sharded module's tensors gathered whole, and written as a Hugging Face checkpoint."""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .storage import _device, _entries, _few, _Layout

__all__ = ["full_state_dict", "export_hf"]


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
        shape = list(info.global_shape)
        stored = layout.to_stored(t.detach(), info.placement, shape)
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

"""A static, preallocated KV cache sharded by heads, and the decode step that writes into it.

``ShardConfig(static_cache=True)`` captures a third generation graph beside prefill and
decode::

    static_decode(input_ids, attention_mask[B, L], position_ids, offset, past=(k_0, v_0, ...)) -> (last logits,)

where every ``k_i``/``v_i`` is this rank's ``[batch, heads / world, L, head_dim]`` buffer of a
cache of ``L`` positions (the generation's maximum length), ``offset`` a 0-dim tensor (the
tokens already cached) and the new keys and values are written *in place* at
``offset + arange(new)`` (``index_copy_``): no ``cat`` and no new cache tensor per token, and
one graph (one compilation) for every step of a generation -- the shapes are the same at
every step, sized by ``L``, whatever the step's position.  Attention reads the whole buffer
under a mask that hides the positions not written yet (Hugging Face's static-cache mask).

The analysis places the buffers as declared (the prefill's cache placements: ``Shard(1)``,
the heads, where attention is head-parallel) and checks that nothing redistributes a tensor
written in place (``patterns.in_place_hazards``): the buffers are written where they live.

At run time (``static_step``), a ``transformers`` ``StaticCache`` (``generate(...,
cache_implementation="static")``, the default with ``static_cache=True``) is filled by the
prefill graph -- its keys and values copied into freshly allocated local buffers of the
cache's ``max_cache_len`` -- and advanced by the static decode graph.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.export import Dim


__all__ = ["StaticCausalLMStep", "capture_static_decode", "is_static_cache", "static_step"]


@functools.lru_cache(maxsize=None)
def _static_step_layer_class():
    from transformers.cache_utils import CacheLayerMixin, StaticLayer

    class StaticStepLayer(StaticLayer):
        """A static layer over given buffers: ``update`` writes at ``offset + arange(new)``, in place."""

        def __init__(self, keys, values, offset):
            CacheLayerMixin.__init__(self)
            self.max_cache_len = keys.shape[2]
            self.keys, self.values, self.cumulative_length = keys, values, offset
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            at = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
            self.keys.index_copy_(2, at, key_states)
            self.values.index_copy_(2, at, value_states)
            return self.keys, self.values

    return StaticStepLayer


def _static_cache(past: tuple, offset):
    from transformers.cache_utils import Cache

    layer_cls = _static_step_layer_class()
    cache = Cache.__new__(Cache)
    Cache.__init__(cache, layers=[layer_cls(past[i], past[i + 1], offset) for i in range(0, len(past), 2)])
    return cache


class StaticCausalLMStep(nn.Module):
    """One decode step of a causal LM writing into static buffers (see the module docstring)."""

    def __init__(self, model: nn.Module, last_logits_only: bool):
        super().__init__()
        self.model = model
        self.last_logits_only = last_logits_only

    def forward(self, input_ids, attention_mask, position_ids, offset, past):
        kwargs = {"logits_to_keep": 1} if self.last_logits_only else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=_static_cache(past, offset),
                         use_cache=True, **kwargs)
        return (out.logits if self.last_logits_only else out.logits[:, -1:],)


def capture_static_decode(model: nn.Module, present: list, uses_positions: bool, last_logits_only: bool, export):
    """Capture ``model``'s static decode step; ``present``: the prefill's cache values (their
    heads and head sizes).  Dynamic in batch, new tokens and cache length."""
    device = present[0].device
    batch, new, length = 2, 2, 8  # (2 new tokens: a dim of example size 1 would be specialised)
    batch_d, new_d, length_d = Dim("batch", min=1), Dim("new", min=1), Dim("cache_len", min=2)
    ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    pos = torch.arange(3, 3 + new, device=device).repeat(batch, 1) if uses_positions else None
    offset = torch.tensor(3, device=device)
    past = tuple(torch.zeros(batch, int(v.shape[1]), length, int(v.shape[3]), dtype=v.dtype, device=device)
                 for v in present)
    specs = ({0: batch_d, 1: new_d}, {0: batch_d, 1: length_d}, {0: batch_d, 1: new_d} if uses_positions else None,
             None, tuple({0: batch_d, 2: length_d} for _ in past))
    return export(StaticCausalLMStep(model, last_logits_only), (ids, mask, pos, offset, past), specs)


def is_static_cache(cache) -> bool:
    """Is ``cache`` a ``transformers`` static cache (layers of ``StaticLayer``)?"""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and any(isinstance(layer, StaticLayer) for layer in layers)


def _check_layers(cache, n: int) -> None:
    from transformers.cache_utils import StaticLayer

    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if kinds or len(cache.layers) < n:
        raise ValueError(f"autotp's static cache holds full-attention layers only (StaticLayer, {n} of them); this "
                         f"cache has {len(cache.layers)} layers{', of ' + ', '.join(kinds) if kinds else ''}. Use "
                         f"the dynamic cache (generate without cache_implementation='static')")


def static_step(steps, cache, input_ids, attention_mask, position_ids):
    """Run one step of a generation whose ``cache`` is a ``StaticCache``: the prefill graph on
    the first step (its keys and values copied into new local buffers), else ``static_decode``.
    Returns the last position's logits."""
    n = steps.num_layers
    _check_layers(cache, n)
    layers = cache.layers[:n]
    if "static_decode" not in steps.run:
        raise ValueError("this model was sharded without a static decode step; pass static_cache=True to "
                         "shard_for_generation / from_pretrained / parallelize, or generate with the dynamic cache")
    if not layers[0].is_initialized:
        logits, *present = steps.run["prefill"](input_ids, attention_mask, position_ids)
        length = layers[0].max_cache_len
        if present[0].shape[2] > length:
            raise ValueError(f"the prompt ({present[0].shape[2]} tokens) is longer than the static cache "
                             f"({length} positions); raise max_cache_len (generate's max_length)")
        offset = torch.tensor(present[0].shape[2], device=present[0].device)
        for layer, k, v in zip(layers, present[0::2], present[1::2]):
            layer.keys = k.new_zeros(k.shape[0], k.shape[1], length, k.shape[3])
            layer.values = v.new_zeros(v.shape[0], v.shape[1], length, v.shape[3])
            layer.keys[:, :, : k.shape[2]] = k
            layer.values[:, :, : v.shape[2]] = v
            layer.batch_size, layer.num_heads = k.shape[:2]
            layer.k_head_dim, layer.v_head_dim = k.shape[3], v.shape[3]
            layer.device, layer.is_initialized = k.device, True
            if k.is_cuda:  # fixed addresses: compiled with CUDA graphs, the step replays instead of re-recording
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            layer.cumulative_length = offset  # one counter for every layer, advanced once per step
        return logits
    offset = layers[0].cumulative_length
    length = layers[0].max_cache_len
    new = input_ids.shape[1]
    if int(offset) + new > length:
        raise ValueError(f"the static cache is full: {int(offset)} cached + {new} new tokens > its {length} "
                         f"positions; raise max_cache_len (generate's max_length)")
    if attention_mask.shape[1] < length:  # the mask covers the whole buffer: positions not written yet hidden
        attention_mask = torch.nn.functional.pad(attention_mask, (0, length - attention_mask.shape[1]))
    past = []
    for layer in layers:
        past += [layer.keys, layer.values]
    (logits,) = steps.run["static_decode"](input_ids, attention_mask, position_ids, offset, tuple(past))
    offset.add_(new)
    return logits

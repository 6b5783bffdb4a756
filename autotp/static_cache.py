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
written in place where the write is seen elsewhere (``patterns.mutated_args``, ``write_visible``):
the buffers are written where they live.  An encoder-decoder (T5) passes its prefill's
cross-attention keys and values after its self-attention buffers (``StaticSeq2SeqStep``).

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

__all__ = ["StaticCausalLMStep", "StaticSeq2SeqStep", "capture_static_decode", "is_static_cache", "static_step",
           "static_seq2seq_step"]


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


class StaticSeq2SeqStep(nn.Module):
    """One decoder step of an encoder-decoder model (T5) over static self-attention buffers::

        (decoder_input_ids, encoder_hidden_states, attention_mask, offset, past=(self k/v buffers..., cross k/v...))
            -> (last logits,)

    The cross-attention keys and values are the prefill's, passed in unchanged."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, offset, past):
        from transformers.cache_utils import EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        from .steps import _step_cache

        n = self.num_layers
        cache = EncoderDecoderCache(_static_cache(past[: 2 * n], offset), _step_cache(n, past[2 * n:]))
        for i in range(n):
            cache.is_updated[i] = True  # cross-attention: reuse the given keys and values
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                         attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, cache=cache,
                         use_cache=True)
        return (out.logits[:, -1:],)


def capture_static_decode(model: nn.Module, present: list, uses_positions: bool, last_logits_only: bool, export,
                          encoder_decoder: tuple | None = None):
    """Capture ``model``'s static decode step; ``present``: the prefill's cache values (their
    heads and head sizes; an encoder-decoder's self-attention ones, then its cross-attention
    ones).  ``encoder_decoder``: ``(num_layers, encoder hidden states example)`` for T5.
    Dynamic in batch, new tokens and cache (and source) length."""
    device = present[0].device
    batch, new, length, source = 2, 2, 8, 5  # (2 new tokens: a dim of example size 1 would be specialised)
    batch_d, new_d, length_d = Dim("batch", min=1), Dim("new", min=1), Dim("cache_len", min=2)
    ids = torch.zeros(batch, new, dtype=torch.long, device=device)
    offset = torch.tensor(3, device=device)

    def zeros(v, n):
        return torch.zeros(batch, int(v.shape[1]), n, int(v.shape[3]), dtype=v.dtype, device=device)

    if encoder_decoder is not None:
        (n, example), source_d = encoder_decoder, Dim("source", min=2)
        hidden = torch.zeros(batch, source, int(example.shape[-1]), device=device, dtype=example.dtype)
        mask = torch.ones(batch, source, dtype=torch.long, device=device)
        past = tuple(zeros(v, length) for v in present[: 2 * n]) + tuple(zeros(v, source) for v in present[2 * n:])
        specs = ({0: batch_d, 1: new_d}, {0: batch_d, 1: source_d}, {0: batch_d, 1: source_d}, None,
                 tuple({0: batch_d, 2: length_d} for _ in range(2 * n)) + tuple({0: batch_d, 2: source_d}
                                                                               for _ in range(2 * n)))
        return export(StaticSeq2SeqStep(model, n), (ids, hidden, mask, offset, past), specs)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    pos = torch.arange(3, 3 + new, device=device).repeat(batch, 1) if uses_positions else None
    past = tuple(zeros(v, length) for v in present)
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


def _require_static_decode(steps) -> None:
    if "static_decode" not in steps.run:
        raise ValueError("this model was sharded without a static decode step; pass static_cache=True to "
                         "shard_for_generation / from_pretrained / parallelize, or generate with the dynamic cache")


def _fill(layers, present) -> None:
    """The prefill's keys and values copied into new buffers of each layer's ``max_cache_len``."""
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


def _buffers(layers, new: int) -> tuple:
    """``(offset, length, (k_0, v_0, ...))`` for a decode step writing ``new`` tokens."""
    offset, length = layers[0].cumulative_length, layers[0].max_cache_len
    if int(offset) + new > length:
        raise ValueError(f"the static cache is full: {int(offset)} cached + {new} new tokens > its {length} "
                         f"positions; raise max_cache_len (generate's max_length)")
    past = []
    for layer in layers:
        past += [layer.keys, layer.values]
    return offset, length, tuple(past)


def static_step(steps, cache, input_ids, attention_mask, position_ids):
    """Run one step of a generation whose ``cache`` is a ``StaticCache``: the prefill graph on
    the first step (its keys and values copied into new local buffers), else ``static_decode``.
    Returns the last position's logits."""
    n = steps.num_layers
    layers = cache.layers[:n]
    if not layers[0].is_initialized:  # (the cache's layers are checked once, here, not at every step)
        _check_layers(cache, n)
        _require_static_decode(steps)
        logits, *present = steps.run["prefill"](input_ids, attention_mask, position_ids)
        _fill(layers, present)
        return logits
    offset, length, past = _buffers(layers, input_ids.shape[1])
    if attention_mask.shape[1] < length:  # the mask covers the whole buffer: positions not written yet hidden
        attention_mask = torch.nn.functional.pad(attention_mask, (0, length - attention_mask.shape[1]))
    (logits,) = steps.run["static_decode"](input_ids, attention_mask, position_ids, offset, past)
    offset.add_(input_ids.shape[1])
    return logits


def static_seq2seq_step(steps, cache, decoder_input_ids, hidden, attention_mask, store_cross):
    """``static_step`` for an encoder-decoder model: ``cache`` an ``EncoderDecoderCache`` whose
    self-attention cache is static; the cross-attention keys and values are the prefill's
    (``store_cross(cache, present)`` puts them in its cross-attention cache)."""
    n = steps.num_layers
    layers = cache.self_attention_cache.layers[:n]
    if not layers[0].is_initialized:
        _check_layers(cache.self_attention_cache, n)
        _require_static_decode(steps)
        logits, *present = steps.run["prefill"](decoder_input_ids, hidden, attention_mask)
        _fill(layers, present[: 2 * n])
        store_cross(cache, present[2 * n:])
        return logits
    offset, _, past = _buffers(layers, decoder_input_ids.shape[1])
    cross = []
    for layer in cache.cross_attention_cache.layers[:n]:
        cross += [layer.keys, layer.values]
    (logits,) = steps.run["static_decode"](decoder_input_ids, hidden, attention_mask, offset, past + tuple(cross))
    offset.add_(decoder_input_ids.shape[1])
    return logits

"""The generation steps as modules torch.export can capture: the KV cache as explicit tensors.

A Hugging Face model's cache is a Python object the model mutates; these wrappers
build it from graph inputs and return what it holds as graph outputs (``CausalLMStep``,
``Seq2SeqStep``), so ``capture_steps`` can export a prefill and a decode graph, dynamic in
batch, prompt and cache length.  ``autotp.generation`` plans, lowers and runs them.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.export import Dim

from .capture import CaptureError, export_graph
from .patterns import output_leaves

__all__ = ["CausalLMStep", "Seq2SeqStep", "EncoderStep", "capture_steps"]


def _cache_classes():
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    return Cache, DynamicCache, DynamicLayer


@functools.lru_cache(maxsize=None)
def _step_layer_class():
    _, _, DynamicLayer = _cache_classes()

    class StepLayer(DynamicLayer):
        """A cache layer whose first ``update`` stores the states as they are (no ``cat`` with an
        empty tensor, which would put a constant in the graph)."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.device = key_states.device
                self.keys, self.values, self.is_initialized = key_states, value_states, True
                return self.keys, self.values
            return super().update(key_states, value_states)

    return StepLayer


def _num_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"):
        n = getattr(text, name, None)
        if isinstance(n, int):
            return n
    raise ValueError(f"cannot tell the number of layers of {type(config).__name__}: it has no num_hidden_layers")


def _step_cache(num_layers: int, past: tuple):
    """A ``DynamicCache`` of ``num_layers`` step layers holding ``past`` = (k_0, v_0, k_1, v_1, ...)."""
    Cache, DynamicCache, _ = _cache_classes()
    StepLayer = _step_layer_class()
    layers = [StepLayer() for _ in range(num_layers)]
    for i, layer in enumerate(layers[: len(past) // 2]):
        layer.update(past[2 * i], past[2 * i + 1])
    cache = DynamicCache.__new__(DynamicCache)
    Cache.__init__(cache, layers=layers)
    return cache


def _flat(cache) -> list:
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


class CausalLMStep(nn.Module):
    """One generation step of a causal LM with the KV cache as tensors (see the module docstring)."""

    def __init__(self, model: nn.Module, num_layers: int, last_logits_only: bool):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.last_logits_only = last_logits_only

    def forward(self, input_ids, attention_mask, position_ids, past=()):
        cache = _step_cache(self.num_layers, past)
        kwargs = {"logits_to_keep": 1} if self.last_logits_only else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, **kwargs)
        logits = out.logits if self.last_logits_only else out.logits[:, -1:]
        return (logits, *_flat(cache))


class Seq2SeqStep(nn.Module):
    """One decoder step of an encoder-decoder model (T5)::

        (decoder_input_ids, encoder_hidden_states, attention_mask, past=(self k/v..., cross k/v...))
            -> (last logits, self k'/v'...,  cross k/v... on the first step only)

    The cross-attention keys and values are computed once, on the first step, and
    passed back in afterwards (Hugging Face's ``is_updated``)."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, past=()):
        from transformers.cache_utils import EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        n = self.num_layers
        cache = EncoderDecoderCache(_step_cache(n, past[: 2 * n]), _step_cache(n, past[2 * n:]))
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                         attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, cache=cache,
                         use_cache=True)
        present = _flat(cache.self_attention_cache)
        if not past:
            present += _flat(cache.cross_attention_cache)
        return (out.logits[:, -1:], *present)


class EncoderStep(nn.Module):
    """An encoder-decoder model's encoder: ``(input_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


def _export(module, args, dynamic_shapes):
    inner = module.encoder if isinstance(module, EncoderStep) else module.model
    return export_graph(module, args, dynamic_shapes=dynamic_shapes,
                        what=f"the generation step of {type(inner).__name__}",
                        hint=lambda e: "autotp.shard(model, ..., example_kwargs={'use_cache': False}) shards the "
                                       "forward without a cache")


def _check_present(model, present, n_layers: int, what: str) -> None:
    if any(v.dim() != 4 for v in present) or len(present) != 2 * n_layers:
        raise CaptureError(f"{type(model).__name__}: expected {n_layers} layers of [batch, heads, seq, head_dim] "
                           f"{what} keys and values, got {[tuple(v.shape) for v in present]}")


def _zeros_like_cache(present, batch: int, length: int, device) -> tuple:
    return tuple(torch.zeros(batch, int(v.shape[1]), length, int(v.shape[3]), dtype=v.dtype, device=device)
                 for v in present)


def _last_logits_only(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def capture_steps(model: nn.Module, *, example_batch: int = 2, example_prompt: int = 4, example_past: int = 5):
    """Capture the generation steps of ``model``.

    Returns ``(encoder_gm or None, prefill_gm, decode_gm, num_layers, past_at)`` where
    ``past_at`` is the flat input position of the first cache tensor in the decode step.
    """
    n = _num_layers(model.config)
    device = next(model.parameters()).device
    batch, seq, past_len = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=1)
    ids = torch.zeros(example_batch, example_prompt, dtype=torch.long, device=device)
    mask = torch.ones(example_batch, example_prompt, dtype=torch.long, device=device)
    if getattr(model.config, "is_encoder_decoder", False):
        src = Dim("source", min=1)
        encoder = _export(EncoderStep(model.get_encoder()), (ids, mask), ({0: batch, 1: src}, {0: batch, 1: src}))
        hidden = output_leaves(encoder)[0].meta["val"]
        enc_h = torch.zeros(example_batch, example_prompt, int(hidden.shape[-1]), dtype=hidden.dtype, device=device)
        step = Seq2SeqStep(model, n)
        dec_ids = ids[:, :2].clone()
        specs = ({0: batch, 1: seq}, {0: batch, 1: src}, {0: batch, 1: src})
        prefill = _export(step, (dec_ids, enc_h, mask), specs)
        present = [x.meta["val"] for x in output_leaves(prefill)[1:]]
        _check_present(model, present[: 2 * n], n, "self-attention")
        _check_present(model, present[2 * n:], n, "cross-attention")
        past = (_zeros_like_cache(present[: 2 * n], example_batch, example_past, device)
                + _zeros_like_cache(present[2 * n:], example_batch, example_prompt, device))
        past_specs = tuple({0: batch, 2: past_len} for _ in range(2 * n)) + tuple({0: batch, 2: src}
                                                                                  for _ in range(2 * n))
        decode = _export(step, (dec_ids[:, :1].clone(), enc_h, mask, past), ({0: batch}, *specs[1:], past_specs))
        return encoder, prefill, decode, n, 3
    accepts = inspect.signature(model.forward).parameters
    step = CausalLMStep(model, n, _last_logits_only(model))
    pos, pos_spec = None, None
    if "position_ids" in accepts:  # a tensor of its own: export would alias two inputs that are one tensor
        pos = torch.arange(example_prompt, device=device).repeat(example_batch, 1)
        pos_spec = {0: batch, 1: seq}
    prefill = _export(step, (ids, mask, pos), ({0: batch, 1: seq}, {0: batch, 1: seq}, pos_spec))
    present = [x.meta["val"] for x in output_leaves(prefill)[1:]]
    _check_present(model, present, n, "self-attention")
    past = _zeros_like_cache(present, example_batch, example_past, device)
    mask = torch.ones(example_batch, example_past + example_prompt, dtype=torch.long, device=device)
    decode = _export(step, (ids, mask, pos, past),
                     ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, pos_spec, tuple({0: batch, 2: past_len} for _ in past)))
    return None, prefill, decode, n, 2 + (pos is not None)

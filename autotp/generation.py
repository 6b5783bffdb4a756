"""Generation on a sharded model: ``generate()`` with a KV cache sharded by heads.

A Hugging Face model's cache is a Python object (``DynamicCache``) that the
model mutates, so it cannot be a graph input as it is.  autotp captures the
model's *generation step* instead, with the cache as explicit tensors::

    step(input_ids, attention_mask, position_ids, past=(k_0, v_0, ..., k_{n-1}, v_{n-1}))
        -> (logits of the last position, k'_0, v'_0, ..., k'_{n-1}, v'_{n-1})

where ``k'_i = cat(k_i, new keys)``.  Two graphs are captured, both with
dynamic batch and sequence: *prefill* (no past) and *decode* (past of any
length >= 1).  Both go through the same analysis as ``autotp.shard``; the
decode graph declares its past inputs with the placements the prefill graph's
present outputs have -- ``Shard(1)``, the heads dim, wherever the attention is
head-parallel -- and both return the cache as each rank's shard
(``local_outputs``), so a rank caches only its heads: 1/world_size of the
unsharded cache, and nothing about the cache is ever communicated.  The two
graphs share one set of local parameters.

The result is the model's own class with ``forward`` replaced
(``ShardedForGeneration``): Hugging Face's ``generate`` runs on it unchanged --
greedy, sampling, beam search (its ``reorder_cache`` index-selects the local
shards along the batch dim), left padding -- and every rank takes identical
decisions because the logits it sees are the same all-gathered tensor.
"""
from __future__ import annotations

import copy
import functools
import time

import torch
from torch import nn
from torch.export import Dim

from .capture import CaptureError, export_graph
from .config import ShardConfig, resolve_config
from .patterns import get_attr, output_leaves
from .pipeline import check_plans_agree, compiled, join_ranks, lower_graph, lowering_context, plan_graph
from .groups import check_same_inputs

__all__ = ["shard_for_generation", "plan_generation", "ShardedForGeneration", "ShardedSeq2SeqForGeneration", "CausalLMStep",
           "Seq2SeqStep"]


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


def capture_steps(model: nn.Module, *, example_batch: int = 2, example_prompt: int = 4, example_past: int = 5):
    """Capture the generation steps of ``model``.

    Returns ``(encoder_gm or None, prefill_gm, decode_gm, num_layers, past_at)`` where
    ``past_at`` is the flat input position of the first cache tensor in the decode step.
    """
    import inspect

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
    step = CausalLMStep(model, n, "logits_to_keep" in accepts)
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


class GenerationSteps(nn.Module):
    """This rank's lowered graphs (sharing parameters) and their plans.

    ``prefill`` / ``decode``: the decoder steps; ``encoder``: an encoder-decoder model's
    encoder (else ``None``); ``cache_placements``: the placement of each cache tensor the
    prefill step returns (self-attention keys and values, then cross-attention ones)."""

    def __init__(self, encoder, prefill, decode, *, plans: dict, cache_placements: list, num_layers: int,
                 uses_positions: bool, timings: dict):
        super().__init__()
        self.encoder = encoder
        self.prefill = prefill
        self.decode = decode
        self.plans = plans
        self.cache_placements = cache_placements
        self.num_layers = num_layers
        self.uses_positions = uses_positions
        self.timings = timings
        # what forward calls: the graphs, or their torch.compile wrappers (ShardConfig.compile); plain
        # attributes, so parameter names stay the graphs' own
        object.__setattr__(self, "run", {"encoder": encoder, "prefill": prefill, "decode": decode})


def _param_names(model: nn.Module, gm) -> dict[str, str]:
    """Graph attribute -> the model's own name (the step wrappers add a prefix)."""
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), name)
    return {n.target: names.get(id(get_attr(gm, n.target)), n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def _plan_steps(model: nn.Module, world_size: int, config: ShardConfig):
    """Capture and plan the generation steps: ``(graphs {name: (gm, plan)}, cache placements,
    num_layers, past_at, timings)``.  The decode step's past is declared with the placements
    the prefill step returns its present with."""
    t0 = time.perf_counter()
    encoder, prefill, decode, n, past_at = capture_steps(model)
    t1 = time.perf_counter()

    def plan(gm, **kw):
        return plan_graph(gm, world_size, config, param_names=_param_names(model, gm), **kw)

    n_pre = len(output_leaves(prefill)) - 1  # self (and cross) keys and values
    p_pre = plan(prefill, local_outputs=set(range(1, 1 + n_pre)))
    cache_pl = p_pre.outputs[1:]
    p_dec = plan(decode, input_placements={past_at + i: p for i, p in enumerate(cache_pl)},
                 local_outputs=set(range(1, 1 + 2 * n)))
    if p_dec.outputs[1:] != cache_pl[: 2 * n]:
        raise AssertionError(f"decode step returns its cache as {p_dec.outputs[1:]} but prefill as {cache_pl[:2 * n]}")
    graphs = {"prefill": (prefill, p_pre), "decode": (decode, p_dec)}
    if encoder is not None:
        graphs["encoder"] = (encoder, plan(encoder))
    return graphs, cache_pl, n, past_at, {"capture_s": t1 - t0, "analyze_s": time.perf_counter() - t1}


def plan_generation(model: nn.Module, world_size: int, *, config: ShardConfig | None = None, **options) -> dict:
    """What ``shard_for_generation`` would do over ``world_size`` ranks, decided in this process.

    Returns:
        ``{"prefill": Plan, "decode": Plan}`` (and ``"encoder"`` for encoder-decoders);
        ``print(plans["decode"].summary())`` shows one decode step's placements and collectives.
    """
    config = resolve_config(config, options)
    config.check_for_generation()
    was_training = model.training
    model.eval()
    try:
        graphs = _plan_steps(model, world_size, config)[0]
    finally:
        model.train(was_training)
    return {name: p for name, (_, p) in graphs.items()}


def build_steps(model: nn.Module, ranks, *, config: ShardConfig, load=None):
    """Capture, plan and lower the generation steps of ``model`` for one rank."""
    graphs, cache_pl, n, past_at, timings = _plan_steps(model, ranks.world_size, config)
    check_plans_agree({name: p for name, (_, p) in graphs.items()}, ranks)
    t0 = time.perf_counter()
    shared: dict = {}
    lowered = {name: lower_graph(gm, lowering_context(p, ranks, config, load=load, shared=shared), config)
               for name, (gm, p) in graphs.items()}
    timings["lower_s"] = time.perf_counter() - t0  # with the reading of shards on load
    steps = GenerationSteps(lowered.get("encoder"), lowered["prefill"], lowered["decode"],
                            plans={name: p for name, (_, p) in graphs.items()}, cache_placements=cache_pl,
                            num_layers=n, uses_positions=past_at == 3 and "encoder" not in graphs, timings=timings)
    for name, gm in lowered.items():
        steps.run[name] = compiled(gm, config, dynamic=True)  # one compilation for every batch and length
    return steps


class ShardedForGeneration:
    """Mixed in before a Hugging Face model class: ``forward`` runs this rank's lowered steps.

    Everything else -- ``generate``, ``prepare_inputs_for_generation``, ``config``,
    ``generation_config``, ``device``, ``can_generate`` -- is the model class's own.
    ``forward`` returns the *last position's* logits (all that generation reads);
    use ``autotp.shard`` for whole-sequence logits.
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=True, return_dict=True, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        _reject_unsupported(kwargs)
        if input_ids is None:
            raise ValueError("the sharded generation model needs input_ids")
        _, DynamicCache, DynamicLayer = _cache_classes()
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = DynamicCache()
        if attention_mask is None:
            past_len = cache.get_seq_length()
            attention_mask = torch.ones(input_ids.shape[0], past_len + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        steps = self.autotp_steps
        if not steps.uses_positions:
            position_ids = None
        elif position_ids is None:  # as the model makes them (generate passes its own, padding-aware)
            start = cache.get_seq_length()
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
        self._check_inputs((input_ids, attention_mask, position_ids))
        n = steps.num_layers
        if cache.get_seq_length() == 0:
            out = steps.run["prefill"](input_ids, attention_mask, position_ids)
        else:
            out = steps.run["decode"](input_ids, attention_mask, position_ids, tuple(_flat(cache)[: 2 * n]))
        _store(cache, out[1:], n, DynamicLayer)
        return CausalLMOutputWithPast(logits=out[0], cache=cache if use_cache else None)

    def _check_inputs(self, tensors: tuple) -> None:
        """On the first call, check every rank got the same inputs (see ``ShardConfig.check_inputs``)."""
        if not self._autotp_checked:
            check_same_inputs(tuple(t for t in tensors if t is not None), {}, self.autotp_group)
            self._autotp_checked = True


class _ShardedEncoder(nn.Module):
    """What ``get_encoder()`` returns: runs this rank's lowered encoder graph."""

    def __init__(self, graph, owner, run=None):
        super().__init__()
        self.graph = graph
        self._owner = [owner]  # not a submodule: no cycle in .modules()
        self._run = [run if run is not None else graph]  # the graph or its compiled wrapper

    def forward(self, input_ids=None, attention_mask=None, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        if input_ids is None:
            raise ValueError("the sharded encoder needs input_ids (inputs_embeds is not supported)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._owner[0]._check_inputs((input_ids, attention_mask))
        return BaseModelOutput(last_hidden_state=self._run[0](input_ids, attention_mask))


class ShardedSeq2SeqForGeneration(ShardedForGeneration):
    """The encoder-decoder variant (T5): ``get_encoder()`` runs the sharded encoder once per
    ``generate``, and ``forward`` runs the decoder steps with an ``EncoderDecoderCache`` whose
    self- and cross-attention layers hold this rank's heads."""

    def get_encoder(self, *args, **kwargs):
        return self.autotp_encoder

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None, cache=None,
                past_key_values=None, use_cache=True, return_dict=True, **kwargs):
        from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
        from transformers.modeling_outputs import Seq2SeqLMOutput

        _reject_unsupported(kwargs)
        if decoder_input_ids is None:
            raise ValueError("the sharded generation model needs decoder_input_ids (generate() passes them)")
        if encoder_outputs is None:
            encoder_outputs = self.autotp_encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self._check_inputs((decoder_input_ids, hidden, attention_mask))
        steps, n = self.autotp_steps, self.autotp_steps.num_layers
        if cache.self_attention_cache.get_seq_length() == 0:
            out = steps.run["prefill"](decoder_input_ids, hidden, attention_mask)
            _store(cache.cross_attention_cache, out[1 + 2 * n:], n, DynamicLayer)
            for i in range(n):
                cache.is_updated[i] = True
        else:
            past = _flat(cache.self_attention_cache)[: 2 * n] + _flat(cache.cross_attention_cache)[: 2 * n]
            out = steps.run["decode"](decoder_input_ids, hidden, attention_mask, tuple(past))
        _store(cache.self_attention_cache, out[1: 1 + 2 * n], n, DynamicLayer)
        return Seq2SeqLMOutput(logits=out[0], cache=cache if use_cache else None, encoder_last_hidden_state=hidden)


def _reject_unsupported(kwargs: dict) -> None:
    unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in ("output_attentions",
                                                                                      "output_hidden_states"))
    if unsupported:
        raise ValueError(f"the sharded generation model takes token ids, attention masks and a cache; got also "
                         f"{unsupported}. Drop them, or use autotp.shard(model, ...) for other forward arguments")


def _store(cache, present, n: int, layer_cls) -> None:
    """Put a step's returned keys and values into ``cache`` (plain layers: a window is the mask's job)."""
    if len(cache.layers) != n or any(type(layer) is not layer_cls for layer in cache.layers):
        cache.layers = [layer_cls() for _ in range(n)]
    for i, layer in enumerate(cache.layers):
        layer.keys, layer.values = present[2 * i], present[2 * i + 1]
        layer.device, layer.is_initialized = layer.keys.device, True


def shard_for_generation(model: nn.Module, world_size: int | None = None, *, group=None,
                         config: ShardConfig | None = None, load=None, **options):
    """Shard a Hugging Face causal LM for ``generate()`` and return this rank's model.

    Call it on every rank (under torchrun, or inside ``autotp.parallelize``'s workers).

    Args:
        model: a Hugging Face ``...ForCausalLM`` (any model whose forward takes ``input_ids``,
            ``attention_mask`` and a ``cache``); parameters may be on ``meta`` when ``load`` is given.
        world_size: the TP degree; must equal the group's size.
        group: the process group (default: the world).
        config / options: a ``ShardConfig`` or its fields (``strict=True``).
        load: ``load(name, dim, index, pad)`` for shard-on-load (see ``autotp.from_pretrained``).

    Returns:
        An instance of the model's own class (``generate``, ``config``... work as usual) whose
        forward runs this rank's shards; ``.autotp_steps.plans`` holds the prefill and decode plans.
    """
    config = resolve_config(config, options)
    config.check_for_generation()
    ranks = join_ranks(world_size, group, config)
    was_training = model.training
    model.eval()
    try:
        steps = build_steps(model, ranks, config=config, load=load)
    finally:
        model.train(was_training)
    cls = type(model)
    mixin = ShardedSeq2SeqForGeneration if steps.encoder is not None else ShardedForGeneration
    shell_cls = type(f"AutoTP{cls.__name__}", (mixin, cls), {"__module__": __name__})
    shell = shell_cls.__new__(shell_cls)
    nn.Module.__init__(shell)
    for name, value in vars(model).items():  # config, generation_config and the class's plain attributes
        if not name.startswith("_") and not isinstance(value, (nn.Module, torch.Tensor)):
            object.__setattr__(shell, name, copy.copy(value) if name == "generation_config" else value)
    shell.config = model.config
    shell.autotp_steps = steps
    if steps.encoder is not None:
        shell.autotp_encoder = _ShardedEncoder(steps.encoder, shell, steps.run["encoder"])
    shell.autotp_group, shell.autotp_comm = ranks.group, ranks.comm
    shell.autotp_rank, shell.autotp_world_size = ranks.rank, ranks.world_size
    shell._autotp_checked = not config.check_inputs or ranks.world_size == 1
    for m in shell.modules():  # inference: dropout off (the lowered graphs' dropouts follow .training)
        m.training = False
    return shell

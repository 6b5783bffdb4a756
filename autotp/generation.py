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
import time

import torch
from torch import nn

from .config import ShardConfig, resolve_config
from .patterns import get_attr, output_leaves
from .pipeline import check_plans_agree, compiled, join_ranks, lower_graph, lowering_context, plan_graph
from .groups import check_same_inputs
from .static_cache import capture_static_decode, is_static_cache, static_seq2seq_step, static_step
from .steps import CausalLMStep, Seq2SeqStep, _cache_classes, _export, _flat, _last_logits_only, capture_steps

__all__ = ["shard_for_generation", "plan_generation", "ShardedForGeneration", "ShardedSeq2SeqForGeneration", "CausalLMStep",
           "Seq2SeqStep"]


class GenerationSteps(nn.Module):
    """This rank's lowered graphs (sharing parameters) and their plans.

    ``prefill`` / ``decode``: the decoder steps; ``encoder``: an encoder-decoder model's
    encoder (else ``None``); ``cache_placements``: the placement of each cache tensor the
    prefill step returns (self-attention keys and values, then cross-attention ones)."""

    def __init__(self, encoder, prefill, decode, *, plans: dict, cache_placements: list, num_layers: int,
                 uses_positions: bool, timings: dict, static_decode=None):
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
        if static_decode is not None:
            self.static_decode = static_decode
            self.run["static_decode"] = static_decode


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
    if config.static_cache:  # the buffers declared as the prefill returns its cache: each rank its heads
        present = [x.meta["val"] for x in output_leaves(prefill)[1:]]
        hidden = [x.meta["val"] for x in prefill.graph.nodes if x.op == "placeholder"][1]
        static = capture_static_decode(model, present, past_at == 3 and encoder is None, _last_logits_only(model),
                                       lambda m, a, specs: _export(m, a, specs),
                                       encoder_decoder=(n, hidden) if encoder is not None else None)
        graphs["static_decode"] = (static, plan(static, input_placements={past_at + 1 + i: p
                                                                          for i, p in enumerate(cache_pl)}))
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
                            num_layers=n, uses_positions=past_at == 3 and "encoder" not in graphs, timings=timings,
                            static_decode=lowered.get("static_decode"))
    for name, gm in lowered.items():
        if config.compile and name in ("decode", "static_decode"):  # (see _CompiledStep)
            # the static decode step's shapes are the same at every step of a generation: CUDA graphs replay it
            cuda_graphs = name == "static_decode" and any(t.is_cuda for t in gm.parameters())
            steps.run[name] = _CompiledStep(compiled(gm, config, dynamic=True,
                                                     mode="reduce-overhead" if cuda_graphs else None), name, timings)
    return steps


class _CompiledStep:
    """A decode step under ``torch.compile``, the first call at each new input shape timed into
    ``timings["compile_s"]`` (``{"decode@[3, 1]": seconds}``: mostly compilation).  Only the decode
    steps are compiled: they run once per token, while the prefill (and an encoder) run once per
    ``generate`` and would cost as much compilation as the decode step for little gain."""

    def __init__(self, inner, name: str, timings: dict):
        self.inner, self.name, self.seen = inner, name, set()
        self.compile_s = timings.setdefault("compile_s", {})

    def __call__(self, *args):
        key = tuple(args[0].shape)
        if key in self.seen:
            return self.inner(*args)
        t0 = time.perf_counter()
        out = self.inner(*args)
        self.seen.add(key)
        self.compile_s[f"{self.name}@{list(key)}"] = time.perf_counter() - t0
        return out


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
        if is_static_cache(cache):
            return CausalLMOutputWithPast(logits=static_step(steps, cache, input_ids, attention_mask, position_ids),
                                          cache=cache if use_cache else None)
        n = steps.num_layers
        if cache.get_seq_length() == 0:
            out = steps.run["prefill"](input_ids, attention_mask, position_ids)
        else:
            out = steps.run["decode"](input_ids, attention_mask, position_ids, tuple(_flat(cache)[: 2 * n]))
        _store(cache, out[1:], n, DynamicLayer)
        return CausalLMOutputWithPast(logits=out[0], cache=cache if use_cache else None)

    def _valid_auto_compile_criteria(self, *args, **kwargs) -> bool:
        return False  # generate() must not compile this forward: the steps are compiled (or not) by autotp

    def create_masks_for_generate(self, *, attention_mask=None, **kwargs):
        return attention_mask  # (a static cache's 4-D mask: the steps take the 2-D one and build their own)

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
        if is_static_cache(cache.self_attention_cache):
            logits = static_seq2seq_step(steps, cache, decoder_input_ids, hidden, attention_mask, _store_cross)
            return Seq2SeqLMOutput(logits=logits, cache=cache if use_cache else None, encoder_last_hidden_state=hidden)
        if cache.self_attention_cache.get_seq_length() == 0:
            out = steps.run["prefill"](decoder_input_ids, hidden, attention_mask)
            _store_cross(cache, out[1 + 2 * n:])
        else:
            past = _flat(cache.self_attention_cache)[: 2 * n] + _flat(cache.cross_attention_cache)[: 2 * n]
            out = steps.run["decode"](decoder_input_ids, hidden, attention_mask, tuple(past))
        _store(cache.self_attention_cache, out[1: 1 + 2 * n], n, DynamicLayer)
        return Seq2SeqLMOutput(logits=out[0], cache=cache if use_cache else None, encoder_last_hidden_state=hidden)


def _store_cross(cache, present) -> None:
    """The prefill's cross-attention keys and values, kept for every later step (``is_updated``)."""
    _, _, DynamicLayer = _cache_classes()
    n = len(present) // 2
    _store(cache.cross_attention_cache, present, n, DynamicLayer)
    for i in range(n):
        cache.is_updated[i] = True


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
    if config.static_cache:
        shell.generation_config.cache_implementation = "static"
    shell.autotp_steps = steps
    if steps.encoder is not None:
        shell.autotp_encoder = _ShardedEncoder(steps.encoder, shell, steps.run["encoder"])
    shell.autotp_group, shell.autotp_comm = ranks.group, ranks.comm
    shell.autotp_rank, shell.autotp_world_size = ranks.rank, ranks.world_size
    shell._autotp_checked = not config.check_inputs or ranks.world_size == 1
    for m in shell.modules():  # inference: dropout off (the lowered graphs' dropouts follow .training)
        m.training = False
    return shell

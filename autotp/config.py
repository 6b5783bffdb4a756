"""``ShardConfig``: the options of every entry point, validated where they are made."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

__all__ = ["ShardConfig", "resolve_config"]


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """Options of ``shard`` / ``plan`` / ``shard_for_generation`` / ``from_pretrained`` / ``parallelize``.

    Attributes:
        strict: raise instead of replicating a layer that cannot be sharded
            (e.g. ``num_heads (6) is not divisible by world_size (4)``).
        dynamic: let batch and sequence length vary between calls (the first two dims of
            every tensor input); otherwise the sharded module accepts the example shapes only.
            Generation steps are always captured dynamic.
        check_inputs: on the first call, verify every rank got the same inputs (2 small
            all-reduces); differing inputs silently corrupt results in every TP library.
        gather_outputs: gather sharded outputs (the logits) so every rank returns the whole
            value. ``False`` returns this rank's vocab slice instead -- for training loops that
            only read the loss, it saves the ``[batch, seq, vocab]`` all-gather.
        activation_checkpointing: recompute each transformer block (each element of a module
            list) in backward instead of storing its activations.
        same_host_collectives: when every rank runs on this host (CPU ranks, gloo), take the
            all-reduces, all-gathers and (sequence parallelism's) reduce-scatters through shared
            memory (``autotp.samehost``): microseconds instead of gloo's ~1 ms each for small
            messages, memory bandwidth for large ones. Ignored where it does not apply.
        seed: base seed of the per-rank generators that draw dropout masks on sharded
            activations (rank r draws from ``seed + 7919 * (r + 1)``); ``None`` takes
            ``torch.initial_seed()`` when the model is sharded.
        timeout_s: seconds any one collective of the sharded model may wait for the other
            ranks before raising ``autotp.CollectiveError`` (naming the collective; the
            same-host transport also names the ranks that did not arrive).  ``None``: 60 s
            for same-host collectives, the process group's own timeout for c10d ones
            (torch's default is 30 minutes; a rank that *dies* is noticed at once by gloo).
            On NCCL ranks the process group's timeout always applies.
        compile: ``torch.compile`` the lowered graphs (whole: the collectives are traceable ops,
            ``autotp/traceable.py``) -- ``shard``'s module, and the decode steps of
            ``shard_for_generation`` / ``from_pretrained`` / ``parallelize``, dynamic in batch
            and length (the prefill, once per ``generate``, stays eager); with ``static_cache`` on
            a GPU, with CUDA graphs (``mode="reduce-overhead"``).  The first call at each shape
            pays the compilation (``timings["compile_s"]``).
        device: the device this rank runs on (``"cuda:1"``, ``torch.device("cuda", 1)``, ``"cpu"``).
            ``None``: ``cuda:{torch.cuda.current_device()}`` on NCCL ranks (torchrun's
            ``LOCAL_RANK``, set when autotp initialises the group), else where the model's
            tensors are.  The model may be captured on another device (CPU, or ``meta`` with
            a loader): parameters are copied to ``device`` one local shard at a time, and every
            device constant of the graph (``arange(device=...)``...) is retargeted to it.
        kernels: let lowering swap matched patterns for the fused kernels of ``csrc/`` where they
            were compiled (``autotp.kernels.available()``); the plan's ``fusions`` lists what was
            swapped.  ``False`` (or the environment variable ``AUTOTP_KERNELS=0``) keeps the
            composite graph.
        reuse_blocks: capture each distinct repeated block (a transformer layer) once and reuse
            its graph for the identical ones (``autotp.regions``: identity proven from what each
            block computes, never from names); the graph and the plan are the ones a whole
            capture makes.  Static shapes only; anything it does not cover is captured whole.
        static_cache: generation also captures a decode step over a preallocated KV cache
            (``autotp.static_cache``): each rank's heads in buffers of the generation's maximum
            length, written in place at the position index -- no ``cat`` per token, one graph
            (one compilation) for every step.  ``generate()`` then uses it by default
            (``generation_config.cache_implementation = "static"``); a ``DynamicCache`` still works.
        sequence_parallel: shard the regions between the parallel blocks (residual adds, norms,
            dropouts) along the sequence (``autotp.sequence_regions``, Megatron-LM's sequence
            parallelism): each all-reduce after a row-parallel linear becomes a reduce-scatter and
            an all-gather before the next column-parallel one -- the same bytes, and 1/world of
            those activations per rank.  Dropout there draws each rank's own stream (results
            equal the unsharded model's in distribution, not bitwise); without dropout, exact.
            ``shard`` / ``plan`` with static shapes only (not ``dynamic``, not generation).

    Raises:
        ValueError: a field of the wrong type, or options that contradict each other.
    """

    strict: bool = False
    dynamic: bool = False
    check_inputs: bool = True
    gather_outputs: bool = True
    activation_checkpointing: bool = False
    same_host_collectives: bool = False
    seed: int | None = None
    timeout_s: float | None = None
    compile: bool = False
    device: object = None  # str | torch.device | None; kept as given, checked below
    kernels: bool = True
    reuse_blocks: bool = True
    static_cache: bool = False
    sequence_parallel: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError(f"ShardConfig.seed must be an int or None, got {value!r}")
            elif f.name == "timeout_s":
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not value > 0):
                    raise ValueError(f"ShardConfig.timeout_s must be a positive number of seconds or None, "
                                     f"got {value!r}")
            elif f.name == "device":
                if value is not None:
                    import torch
                    try:
                        torch.device(value)
                    except (RuntimeError, TypeError) as e:
                        raise ValueError(f"ShardConfig.device must be a torch.device, a device string such as "
                                         f"'cuda:0', or None; got {value!r} ({e})") from None
            elif not isinstance(value, bool):
                raise ValueError(f"ShardConfig.{f.name} must be True or False, got {value!r} "
                                 f"({type(value).__name__})")
        if self.sequence_parallel and self.dynamic:
            raise ValueError("sequence_parallel=True needs static shapes (the gather before each column-parallel "
                             "linear trims the padding of the sequence length it was planned for); drop dynamic=True, "
                             "or sequence_parallel")

    def check_for_generation(self) -> None:
        """Raise where an option contradicts generation (which reads whole logits, in eval mode)."""
        if not self.gather_outputs:
            raise ValueError("gather_outputs=False contradicts generation: generate() reads the whole last-position "
                             "logits on every rank; drop gather_outputs=False (it is for loss-only training loops)")
        if self.activation_checkpointing:
            raise ValueError("activation_checkpointing=True contradicts generation: it recomputes activations in "
                             "backward, and generation runs no backward; drop it")
        if self.sequence_parallel:
            raise ValueError("sequence_parallel=True is for shard() (training, or one forward at a fixed shape): "
                             "generation's steps are dynamic in length, and a decode step's one token per sequence "
                             "has nothing to shard; drop it for generation")


def resolve_config(config: ShardConfig | None, options: dict) -> ShardConfig:
    """The config of a call that takes ``config=`` or its fields as keywords -- not both.

    Raises:
        ValueError: both given, an unknown option name (with the valid ones), or a bad value.
    """
    names = [f.name for f in dataclasses.fields(ShardConfig)]
    unknown = [k for k in options if k not in names]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, n=1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"unknown autotp option(s) {', '.join(hints)}; the options are {', '.join(names)}")
    if config is not None:
        if not isinstance(config, ShardConfig):
            raise ValueError(f"config must be an autotp.ShardConfig, got {type(config).__name__}")
        if options:
            raise ValueError(f"pass either config=ShardConfig(...) or keyword options, not both (got config= and "
                             f"{', '.join(sorted(options))}); put them in the config: "
                             f"dataclasses.replace(config, {', '.join(f'{k}=...' for k in sorted(options))})")
        return config
    return ShardConfig(**options)

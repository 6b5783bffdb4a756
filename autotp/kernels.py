"""The compiled kernels of ``csrc/``: what was built, and whether lowering may use them.

``setup.py`` builds three optional extensions against the installed torch:

* ``autotp._C`` (``csrc/kernels.cpp``): CPU kernels registered with the dispatcher as
  ``torch.ops.autotp_kernels.*`` -- the vocab-parallel cross-entropy's statistics and
  gradient, the masked vocab-parallel embedding, bias+GeLU and SiLU*mul;
* ``autotp._C_cuda`` (``csrc/kernels.cu``): their CUDA implementations, built when torch is
  a CUDA build and ``nvcc`` is found;
* ``autotp._samehost`` (``csrc/samehost.cpp``): the same-host collectives' shared-memory
  transport with acquire/release atomics, and the fused all-reduce + residual + norm.

An extension that did not build leaves autotp on the composite ops it replaces, with one
logged notice.  ``available()`` says what is there; ``ShardConfig(kernels=False)`` or the
environment variable ``AUTOTP_KERNELS=0`` keeps lowering on the composite graph even so.
"""
from __future__ import annotations

import importlib
import logging
import os

__all__ = ["available", "enabled", "extension"]

log = logging.getLogger("autotp.kernels")

_EXTENSIONS = {"cpu": "autotp._C", "cuda": "autotp._C_cuda", "samehost": "autotp._samehost"}
_loaded: dict[str, object] = {}
_noticed = False


def extension(kind: str):
    """The imported extension module for ``kind`` (``"cpu"``, ``"cuda"``, ``"samehost"``), or ``None``."""
    if kind not in _loaded:
        if kind == "cuda" and extension("cpu") is None:  # the CPU extension defines the ops the CUDA one implements
            _loaded[kind] = None
            return None
        try:
            _loaded[kind] = importlib.import_module(_EXTENSIONS[kind])
        except ImportError as e:
            _loaded[kind] = None
            _notice(kind, e)
        else:
            if kind == "cpu":
                from .ops import register
                register()  # fakes and autograd of torch.ops.autotp_kernels.*
    return _loaded[kind]


def _notice(kind: str, error: Exception) -> None:
    global _noticed
    if kind == "cuda":
        import torch
        if not torch.cuda.is_available():
            return  # nothing to say on a machine without a GPU
    if not _noticed:
        _noticed = True
        log.warning("autotp: the compiled kernels (%s) are not available (%s); using the composite ops. Build them "
                    "with 'pip install --no-build-isolation -e .' (a C++ compiler, and nvcc for CUDA)",
                    _EXTENSIONS[kind], error)


def available() -> dict[str, bool]:
    """Which compiled extensions are importable: ``{"cpu": ..., "cuda": ..., "samehost": ...}``."""
    return {kind: extension(kind) is not None for kind in _EXTENSIONS}


def enabled(requested: bool = True) -> bool:
    """Whether lowering may swap patterns for kernels: ``requested`` (``ShardConfig.kernels``)
    and not ``AUTOTP_KERNELS=0``.  Each fusion pass still checks that its kernel was built."""
    return bool(requested) and os.environ.get("AUTOTP_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")

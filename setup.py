from setuptools import find_packages, setup

setup(
    name="genllava_jax",
    version="0.1.0",
    description="GenLLaVA (understand, generate and edit images) in pure JAX for TPU pods",
    python_requires=">=3.10",
    packages=find_packages(include=["genllava_jax*", "convert*", "launch*", "configs*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "pillow",
        "grain>=0.2",
        "tokenizers",
        "transformers>=4.50",  # AutoTokenizer and config classes; needs no torch
    ],
    entry_points={"console_scripts": [
        "genllava-chat=genllava_jax.cli:main_chat",
        "genllava-generate=genllava_jax.cli:main_generate",
        "genllava-edit=genllava_jax.cli:main_edit",
        "genllava-sd=genllava_jax.sd:main",
    ]},
    extras_require={
        # Oracles for the tests and the torch side of the converters. torch is pinned exactly: a bare `torch`
        # would pull a multi-GB CUDA build on these machines.
        "torch": ["torch==2.13.0", "transformers>=4.50", "diffusers>=0.30", "safetensors>=0.4"],
        # libtpu for the TPU fit check (launch/aot.py, compile-only on any machine); pinned with the jax it matches
        "tpu": ["jax[tpu]==0.10.2"],
        "dev": ["pytest", "pytest-xdist", "hypothesis", "tensorboardX"],
    },
)

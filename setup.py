"""metajudge: self-improving alignment (Self-Rewarding, Meta-Rewarding, Temporal Self-Rewarding) in JAX."""

from setuptools import find_packages, setup

setup(
    name="metajudge",
    version="0.1.0",
    description="Self-rewarding, meta-rewarding and temporally anchored DPO for Llama-family models in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["models*", "attention_kernels*", "metajudge*", "experiments*", "benchmarks*"]),
    package_data={"metajudge.prompt_data": ["*.jsonl"]},
    install_requires=[
        "jax>=0.6.1,<0.12",
        "flax>=0.12.0,<0.14",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "grain>=0.2.10,<0.3",
        "transformers>=4.51,<6",
        "sentencepiece>=0.2.0",
        "safetensors>=0.5",
        "gguf>=0.16",
        "huggingface_hub>=0.30",
        "numpy>=1.26,<3",
        "scipy>=1.11",
        "ml_dtypes>=0.5",
        "jinja2>=3.1",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "tpu": ["jax[tpu]>=0.6.1,<0.12"],
        "cuda": ["jax[cuda12]>=0.6.1,<0.12"],
        "tfds": ["tensorflow-datasets>=4.9"],
        "wandb": ["wandb>=0.19"],
        # The peers the benchmarks compare against (make bench): HF transformers on torch, TRL's DPOTrainer.
        "bench": ["torch==2.13.0", "accelerate>=1.0", "trl>=1.0,<2", "datasets>=3.0"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0", "accelerate>=1.0",
                "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                # the logging tests: W&B offline, and TensorBoard's own reader of the event files
                "wandb>=0.19", "tensorboard>=2.16"],
    },
)

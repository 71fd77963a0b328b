"""speechlm_jax: align speech to a text LLM in JAX/Flax (MTBI, SALAD, VoiceTextBlender)."""

from setuptools import find_packages, setup

setup(
    name="speechlm_jax",
    version="0.1.0",
    description="Speech LLMs in JAX/Flax NNX that close the text-speech understanding gap.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["speechlm_jax", "speechlm_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.30",
        "grain>=0.2.14",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "numpy>=2.0",
        "ml-dtypes>=0.5",
        "transformers>=4.57",
        "tokenizers>=0.21",
        "jinja2>=3.1",  # transformers' chat templates
        "safetensors>=0.5",
        "librosa>=0.10.2",
        "soundfile>=0.12",
        "soxr>=0.5",
        "jiwer>=3.1",
        "scipy>=1.11",  # the selection study's paired t-tests (and librosa's)
        "tensorflow-datasets>=4.9.9",
        "pyarrow>=15",  # Hugging Face datasets' Arrow and Parquet files (data/hf_source.py)
        "importlib_resources>=6",
        "array-record>=0.8.1",
        "espeakng-loader>=0.2.4",
        "matplotlib>=3.9",
        "tensorboardX>=2.6.2",
        "tensorboard>=2.16",
        "tqdm>=4.66",
        # Object stores: gs:// through fsspec (storage.py); orbax writes arrays through tensorstore.
        "etils[epath]>=1.7",
        "fsspec>=2024.6",
        "gcsfs>=2024.6",
    ],
    extras_require={
        # libtpu: runs on TPU VMs, and lets `speechlm-compile` compile for a TPU topology on any machine.
        "tpu": ["jax[tpu]>=0.10.2"],
        # `speechlm-eval --voicebench`: local copies of the VoiceBench subsets (datasets reads
        # their Parquet shards or save_to_disk folders) and IFEval's checkers.
        "bench": ["datasets>=4.4.2", "if-verifiable==0.1.2"],
        # Weights & Biases beside TensorBoard (`train.wandb.project`; offline by default).
        "wandb": ["wandb==0.31.0"],
        # The references the tests compare against. torch is the CPU build that
        # ships with the development image for Python 3.11; on newer Pythons the
        # test suite needs a CPU torch installed by hand (see README).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            "ruff==0.17.6",
            "hypothesis>=6.100",
            "scikit-learn>=1.4",
            "peft>=0.17",
            # The writers of the Hugging Face, Lhotse and NeMo sources' files.
            "datasets>=3.0",
            "lhotse>=1.24",
            # A local Cloud Storage server the object-store tests run against.
            "gcp-storage-emulator>=2024.8",
            "google-cloud-storage>=2.18",
            "torch==2.13.0; python_version < '3.12'",
            # The VoiceBench tests (the `bench` extra).
            "datasets>=4.4.2",
            "if-verifiable==0.1.2",
            "wandb==0.31.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "speechlm-train=speechlm_jax.train.main:main",
            "speechlm-synth=speechlm_jax.data.synth_cli:main",
            "speechlm-generate=speechlm_jax.evaluation.targets:main",
            "speechlm-eval=speechlm_jax.evaluation.main:main",
            "speechlm-convert=speechlm_jax.convert.main:main",
            "speechlm-select=speechlm_jax.selection.main:main",
            "speechlm-demo=speechlm_jax.demo.main:main",
            "speechlm-compile=speechlm_jax.train.compile_aot:main",
        ]
    },
)

"""Test configuration: every test process sees 8 simulated CPU devices.

The flags must be set before jax is first imported, so they live here and not in
a fixture. Single-device tests simply use `jax.devices()[0]`.

The suite compiles thousands of tiny programs and runs each for milliseconds, so its
programs skip the CPU backend's expensive LLVM passes (what `train.fast_compile` does for
a run's step) and, where this XLA still has them, use the CPU backend's older loop
emitters, which compile faster than its fusion emitters (tests/losses: 121 s with neither,
86 s with the first, 60 s with both, `-n 2`). The console commands the tests start inherit
the flags (xdist's workers too: the controller sets them first).
"""

import os
import subprocess
import sys


def _xla_flags() -> str:
    flags = "--xla_force_host_platform_device_count=8"
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    legacy = "--xla_cpu_use_fusion_emitters=false"  # gone from newer XLA, which aborts on an unknown flag
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    known = subprocess.run(probe, env={**os.environ, "XLA_FLAGS": legacy, "JAX_PLATFORMS": "cpu"}, capture_output=True)
    return f"{flags} {legacy}" if known.returncode == 0 else flags


if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _xla_flags()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Fixtures shared by several test folders. Tests never import one another (nor helper
# modules): what they share lives here, or in their folder's conftest.py. The imports of
# the package stay inside the fixtures, so a run of one folder loads only what it uses.

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# -- The trainer's tiny TTS corpus, tiny recipe configs and XLA cache (train/, scale/) ------


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from speechlm_jax.toyworld.corpus import build_tiny_corpus

    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"), train_sentences=12, heldout_sentences=4)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent XLA cache for the trainer tests: the same program compiles once per session.

    The train/ and scale/ conftests turn it on for every test of theirs.
    """
    path = tmp_path_factory.mktemp("xla_cache")
    previous = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


@pytest.fixture
def tiny_config(tiny_corpus: Path, compilation_cache: Path):
    """`tiny_config(recipe, **train)`: the recipe's `:tiny` variant, quiet, with the shared XLA cache."""
    from speechlm_jax.configs import asr, mtbi, salad, vtb

    recipes = {"asr": asr, "mtbi": mtbi, "salad": salad, "vtb": vtb}

    def make(recipe: str, **train: object):
        config = recipes[recipe].get_config(f"tiny,data_dir={tiny_corpus}")
        config.train.progress_bar = False
        config.train.eval_every = 0
        config.train.fast_compile = True
        config.train.compilation_cache = str(compilation_cache)
        for key, value in train.items():
            config.train[key] = value
        return config

    return make


# -- Tiny random transformers LLMs of every supported family (models/, selection/, generation) --
# Each family exercises its own switches (llama3 RoPE scaling + GQA, Qwen2 q/k/v biases, Qwen3
# q/k norms, Gemma 3 sliding window smaller than the test sequences, soft-capping, local RoPE base).

LLM_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


@pytest.fixture(scope="session")
def llm_families() -> tuple[str, ...]:
    """Every LLM family the tiny transformers models come in."""
    return LLM_FAMILIES


@pytest.fixture(params=LLM_FAMILIES)
def llm_family(request: pytest.FixtureRequest) -> str:
    """Runs the test once per LLM family (test ids `[llama]`, `[qwen2]`, ...)."""
    return request.param


@pytest.fixture(scope="session")
def hf_config():
    """`hf_config(family, *, tied)`: a tiny transformers config of `family` with tied or untied embeddings."""
    import transformers

    common = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Larger than HF's 0.02 so that greedy decoding of a random model does not just repeat one token.
        initializer_range=0.15,
    )

    def make(family: str, *, tied: bool) -> transformers.PretrainedConfig:
        kw = dict(common, tie_word_embeddings=tied)
        if family == "llama":
            rope = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
            return transformers.LlamaConfig(**kw, rope_parameters=rope)
        if family == "qwen2":
            return transformers.Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        if family == "qwen3":
            return transformers.Qwen3Config(
                **kw, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
            )
        if family == "gemma3":
            # The sqrt(d) embedding scale already makes Gemma's activations large: HF's default init.
            kw["initializer_range"] = 0.02
            return transformers.Gemma3TextConfig(
                **kw,
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=5,
                layer_types=["sliding_attention", "full_attention"],
                attn_logit_softcapping=20.0,
                final_logit_softcapping=8.0,
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                },
            )
        raise ValueError(family)

    return make


@pytest.fixture(scope="session")
def save_hf_model(hf_config):
    """`save_hf_model(family, directory, *, tied, seed=0, **save_kwargs)`: a random tiny transformers
    model, saved with `save_pretrained` and returned.

    Float32, eval mode, eager attention (the exact reference numerics). Norm weights are
    randomised too (HF initialises them to the identity), so a mapping error on any of them
    shows in the logits.
    """
    import torch
    import transformers

    def save(family: str, directory: Path, *, tied: bool, seed: int = 0, **save_kwargs) -> transformers.PreTrainedModel:
        torch.manual_seed(seed)
        config = hf_config(family, tied=tied)
        config._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.1 * torch.randn_like(param))
                elif name.endswith("bias"):
                    param.copy_(0.05 * torch.randn_like(param))
        model.save_pretrained(directory, **save_kwargs)
        return model

    return save


# -- A tiny random SpeechLM over the toy world's word tokenizer (evaluation/, selection/) ----

TOY_DOWNSAMPLE = 2


@pytest.fixture(scope="session")
def toy_tokenizer():
    """`toy_tokenizer(directory)`: the toy world's word tokenizer, built in `directory` and loaded."""
    from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
    from speechlm_jax.toyworld import all_words, register_toy_tasks

    def make(directory: Path):
        register_toy_tasks()
        return load_tokenizer(build_word_tokenizer(all_words(), directory))

    return make


@pytest.fixture(scope="session")
def toy_downsample() -> int:
    """The projector downsampling of `toy_speechlm` (a Scorer of it needs the same)."""
    return TOY_DOWNSAMPLE


@pytest.fixture(scope="session")
def toy_llm_config():
    """`toy_llm_config(vocab_size)`: the tiny Llama of `toy_speechlm` and `toy_base_llm`."""
    from speechlm_jax.models.llm import LLMConfig

    def make(vocab_size: int) -> LLMConfig:
        # Rounded up to a multiple of 8 so the vocab axis shards over a tensor axis of 2.
        return LLMConfig(
            model_type="llama",
            vocab_size=-(-vocab_size // 8) * 8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=False,
            eos_token_id=(2,),
            bos_token_id=1,
            pad_token_id=0,
        )

    return make


@pytest.fixture(scope="session")
def toy_speechlm(toy_llm_config):
    """`toy_speechlm(tok, seed=0)`: random weights, rank-4 LoRA on every linear (zero B: the
    adapter starts as the identity). A new model each call."""
    import jax.numpy as jnp
    from flax import nnx

    from speechlm_jax.models.lora import LoRAConfig
    from speechlm_jax.models.projector import ProjectorConfig
    from speechlm_jax.models.speechlm import build_speechlm
    from speechlm_jax.models.whisper import WhisperConfig

    encoder = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)

    def make(tok, seed: int = 0):
        return build_speechlm(
            encoder,
            ProjectorConfig(downsample=TOY_DOWNSAMPLE),
            toy_llm_config(len(tok)),
            LoRAConfig(rank=4),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            rngs=nnx.Rngs(seed),
        )

    return make


@pytest.fixture(scope="session")
def toy_base_llm(toy_llm_config):
    """`toy_base_llm(tok, seed=0)`: the random LLM of `toy_speechlm` alone, without adapters."""
    from flax import nnx

    from speechlm_jax.models.llm import DecoderLLM

    def make(tok, seed: int = 0):
        return DecoderLLM(toy_llm_config(len(tok)), rngs=nnx.Rngs(seed))

    return make


@pytest.fixture(scope="session")
def save_toy_hf_llama(toy_llm_config):
    """`save_toy_hf_llama(folder, tok, **config)`: a random 2-layer transformers Llama over the toy
    tokenizer `tok`, saved into `folder` (seeded); `config` overrides LlamaConfig fields."""
    import torch
    import transformers

    def make(folder: Path, tok, **config) -> Path:
        torch.manual_seed(0)
        fields = dict(
            vocab_size=toy_llm_config(len(tok)).vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**fields, **config}))
        model.save_pretrained(folder)
        return Path(folder)

    return make


# -- A Cloud Storage emulator for gs:// paths (test_storage.py; trainer runs on gs://) -------
# tools/gcs_emulator.py runs gcp-storage-emulator (with its fixes) as a subprocess on a free
# loopback port for the session; each test that asks for `gcs_bucket` gets a new empty bucket
# and the environment that points gcsfs, google-cloud-storage and tensorstore at the server
# (inherited by the subprocesses it starts). docs/storage.md says why each variable is needed.

GCS_EMULATOR_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gcs_emulator.py"


def _load_gcs_emulator_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gcs_emulator_tool", GCS_EMULATOR_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL (http://127.0.0.1:PORT) of a Cloud Storage emulator running for the session."""
    import select
    import subprocess
    import sys
    import time
    import urllib.request

    log = tmp_path_factory.mktemp("gcs_emulator") / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(GCS_EMULATOR_SCRIPT), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        # The script prints its URL once the socket listens (EOF if it died).
        line = process.stdout.readline() if select.select([process.stdout], [], [], 60)[0] else ""
        if not line.startswith("gcs-emulator listening on "):
            process.wait(10)
            raise RuntimeError(f"the Cloud Storage emulator did not start: {line!r} {log.read_text()[-2000:]}")
        url = line.split()[-1]
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.read() == b"OK":
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(scope="session")
def gcs_env(gcs_emulator: str) -> dict[str, str]:
    """The environment variables that point every Cloud Storage client at the session's emulator,
    for `subprocess.run(..., env=dict(os.environ, **gcs_env))` (`gcs_bucket` sets them already)."""
    return _load_gcs_emulator_tool().client_env(gcs_emulator)


def _fresh_gcs_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes this process's next gs:// access build new clients from the environment.

    gcsfs reads its `FSSPEC_GCS_*` defaults when fsspec is imported and picks its filesystem
    class when gcsfs is imported, and etils.epath and fsspec keep the filesystems they built:
    any of these may predate the test, so they are set and cleared here too.
    """
    import fsspec.config
    import gcsfs
    import gcsfs.core
    from etils.epath import backend
    from fsspec.registry import _registry  # (`fsspec.registry` is the read-only view of it)

    options = {"token": "anon", "use_listings_cache": False}
    monkeypatch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), **options})
    for protocol in gcsfs.core.GCSFileSystem.protocol:  # not the ZB/HNS filesystem (see gcs_emulator.py)
        monkeypatch.setitem(_registry, protocol, gcsfs.core.GCSFileSystem)
    monkeypatch.setattr(gcsfs, "GCSFileSystem", gcsfs.core.GCSFileSystem)
    for cls in {gcsfs.core.GCSFileSystem, *gcsfs.core.GCSFileSystem.__subclasses__()}:
        cls.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def gcs_bucket(gcs_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """ "gs://<new bucket>" on the session's emulator, with the clients' environment set for this
    test and the subprocesses it starts."""

    for key, value in gcs_env.items():
        monkeypatch.setenv(key, value)
    _fresh_gcs_clients(monkeypatch)
    yield _load_gcs_emulator_tool().create_bucket(gcs_env["STORAGE_EMULATOR_HOST"])
    # The clients built during the test point at the emulator: none outlives it.
    _fresh_gcs_clients(monkeypatch)

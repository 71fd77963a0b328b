"""Export: a SpeechLM (or its LLM alone) -> a folder transformers loads with an existing class.

The way out of the codebase (`docs/ARCHITECTURE.md`, `convert/`). `export_speechlm` writes
`VoxtralForConditionalGeneration` (see `convert.voxtral` for which models fit and why),
`export_llm` the LLM's own `*ForCausalLM`. A folder holds:

    config.json                  built as the transformers config object, then `save_pretrained`
    generation_config.json       bos / eos / pad of the LLM
    model.safetensors            or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                 when the tensors exceed `max_shard_size`; the legacy on-disk key
                                 layout `save_pretrained` writes, metadata {"format": "pt"}
    tokenizer files              the training tokenizer, loaded and saved by AutoTokenizer
    preprocessor_config.json     (SpeechLM) a WhisperFeatureExtractor for the encoder's window and mels
    adapter/                     (unmerged LoRA) a PEFT adapter onto this folder's model

There is no processor config: `VoxtralProcessor` only works with Mistral's own tokenizer
(mistral-common, audio token id fixed at 24). The exported folder is used as the class is:
`input_ids` with `config.audio_token_id` at the audio positions (`max_source_positions / k`
per window) and `input_features` from the folder's feature extractor. Audio longer than one
window is given as VoxtralProcessor gives it: the features of the whole clip padded to a
multiple of the window (`pad_to_multiple_of`, in samples), cut into windows along the batch
axis ([windows, mels, 2 * max_source_positions]), with the audio tokens of every window in
one run in `input_ids` (see `convert.voxtral` for the one difference, a partial last window).

Tensors come from the import tables run backwards: every rule's hook (identity, transpose,
conv kernel permutation) is its own inverse, so the HF key of one of our parameters is the
rule's key and the tensor the hook applied to our array (a scanned model's stacked parameters
are split into their layers first, `hf_import.per_layer`, so both forms write the same
folder). Before anything is written the
result is checked the way an import would read it: the config is parsed back into our
configs (they must equal the model's), an abstract model is built from it, and
`hf_import.plan_import` must find every tensor with the right shape and nothing extra.
The folder is assembled under a temporary name next to `out` and renamed at the end, so a
failure leaves nothing behind. The tensors of one export are gathered on the host together
(a model's size in host memory, plus the merged kernels in float32).

LoRA: with `merge_lora` the adapters are folded into the kernels on the host in float32
(W + A @ B * alpha / r); otherwise the base weights are written and the LLM's adapters go
to `adapter/` (`convert.peft_adapter`). Encoder adapters can only be exported merged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import transformers
from flax import nnx
from safetensors.numpy import save_file

from speechlm_jax import storage
from speechlm_jax.convert import peft_adapter, voxtral
from speechlm_jax.models.frontend import HOP_LENGTH
from speechlm_jax.models.hf_import import (
    LLM_IGNORED,
    LLM_TABLES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    WHISPER_TABLE,
    Rule,
    conv_kernel,
    keep,
    per_layer,
    plan_import,
    stacked_layers,
    transpose,
)
from speechlm_jax.models.llm import OWN_FIELDS, DecoderLLM, LLMConfig
from speechlm_jax.models.lora import linear_modules
from speechlm_jax.models.speechlm import SpeechLM, build_speechlm
from speechlm_jax.models.whisper import WhisperEncoder

DTYPES: dict[str, np.dtype] = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
DEFAULT_SHARD_SIZE = "5GB"
ADAPTER_DIR = "adapter"
# Hooks we can run backwards: each is its own inverse.
INVOLUTIONS = (keep, transpose, conv_kernel)
# Voxtral keeps the encoder's position table in float32 whatever the model dtype
# (`_keep_in_fp32_modules_strict`), and so does a bf16 export.
FP32_KEYS = re.compile(r".*embed_positions\.weight$")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes of a size like "5GB" (powers of ten, as transformers) or "512MiB"."""
    if isinstance(size, int):
        return size
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not found:
        raise ValueError(f"cannot read the size {size!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2) or "B"])


class _Shapes:
    """Keys and shapes of in-memory tensors, in the form `plan_import` reads a checkpoint."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)


def _host(variable: nnx.Variable) -> np.ndarray:
    return np.asarray(jax.device_get(variable.get_value()))


def merged_kernels(model: nnx.Module) -> dict[str, np.ndarray]:
    """{our kernel path: W + A @ B * scale in float32} for every Linear with an adapter."""
    merged = {}
    for path, linear in linear_modules(model):
        if linear.has_lora:
            a, b = (np.asarray(jax.device_get(v[...]), np.float32) for v in (linear.lora_a, linear.lora_b))
            kernel = np.asarray(jax.device_get(linear.kernel[...]), np.float32)
            merged[f"{path}/kernel"] = kernel + (a @ b) * np.float32(linear.lora_scale)
    return merged


def hf_tensors(
    model: nnx.Module, table: Sequence[Rule], *, merged: Mapping[str, np.ndarray], dtype: np.dtype
) -> dict[str, np.ndarray]:
    """{HF key: array} of every base parameter of `model` (adapters excluded), through `table` backwards.

    `merged` replaces kernels (merged adapters); arrays are cast to `dtype` except FP32_KEYS.
    """
    tensors: dict[str, np.ndarray] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))):
        ours = "/".join(str(p) for p in path)
        value = merged[ours] if ours in merged else _host(variable)
        stacked = stacked_layers(variable)
        for i, (layer_path, _) in enumerate(per_layer(ours, variable)):
            found = next(((rule, key) for rule in table if (key := rule.match(layer_path)) is not None), None)
            if found is None:
                raise ValueError(f"no mapping rule for parameter {layer_path}")
            rule, key = found
            if rule.hook not in INVOLUTIONS:
                raise ValueError(f"the hook {rule.hook.__name__} of {layer_path} has no known inverse")
            target = np.dtype(np.float32) if FP32_KEYS.fullmatch(key) else dtype
            tensors[key] = np.ascontiguousarray(rule.hook(value[i] if stacked else value).astype(target))
    return tensors


def write_safetensors(folder: Path, tensors: Mapping[str, np.ndarray], max_shard_size: str | int) -> list[str]:
    """Writes `tensors` as one file or as shards of at most `max_shard_size` bytes (a tensor larger
    than that gets a shard of its own) with the index transformers reads; returns the file names."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / SAFETENSORS_FILE, metadata=metadata)
        return [SAFETENSORS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata=metadata)
        weight_map.update({key: name for key in shard})
    index = {
        "metadata": {
            "total_parameters": int(sum(t.size for t in tensors.values())),
            "total_size": int(sum(t.nbytes for t in tensors.values())),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def exported(out: storage.PathLike) -> Any:
    """The path of the written folder: absolute `pathlib.Path` when local, the store's path otherwise."""
    return storage.path(out) if storage.is_remote(out) else Path(out).absolute()


@contextlib.contextmanager
def staged_folder(out: storage.PathLike) -> Iterator[Path]:
    """A temporary folder next to `out` that becomes `out` when the block succeeds, and vanishes when it fails.

    For `out` in an object store the folder is a local temporary one, uploaded when the block
    succeeds with its config.json last: a folder transformers would load appears only complete.
    """
    if storage.is_remote(out):
        target = storage.path(out)
        if target.exists():
            raise FileExistsError(f"{out} already exists; export writes a new folder")
        staging = Path(tempfile.mkdtemp(prefix="speechlm-export-"))
        try:
            yield staging
            storage.upload(staging, target, last="config.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists; export writes a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_tokenizer(tokenizer_dir: storage.PathLike | None, folder: Path) -> None:
    if tokenizer_dir:
        transformers.AutoTokenizer.from_pretrained(
            str(storage.local_copy(tokenizer_dir)), local_files_only=True
        ).save_pretrained(str(folder))


def _generation_config(llm: LLMConfig) -> transformers.GenerationConfig:
    eos = (
        None if not llm.eos_token_id else llm.eos_token_id[0] if len(llm.eos_token_id) == 1 else list(llm.eos_token_id)
    )
    return transformers.GenerationConfig(bos_token_id=llm.bos_token_id, eos_token_id=eos, pad_token_id=llm.pad_token_id)


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _check_llm_round_trip(llm: LLMConfig, text_config: Mapping[str, Any]) -> None:
    parsed = LLMConfig.from_hf(text_config)
    defaults = {f.name: f.default for f in dataclasses.fields(LLMConfig) if f.name in OWN_FIELDS}
    ours = dataclasses.replace(llm, **defaults)
    if parsed != ours:
        diffs = [f.name for f in dataclasses.fields(ours) if getattr(parsed, f.name) != getattr(ours, f.name)]
        raise ValueError(f"the written LLM config does not read back as the model's (fields {diffs})")


def _adapter_plan(llm: DecoderLLM, merge_lora: bool) -> bool:
    """Whether an unmerged export writes a PEFT adapter (the LLM has adapters and they are not merged)."""
    return not merge_lora and bool(peft_adapter.adapted_linears(llm))


def export_speechlm(
    model: SpeechLM,
    out: str | Path,
    *,
    audio_token_id: int,
    tokenizer_dir: str | Path | None = None,
    merge_lora: bool = False,
    dtype: str = "fp32",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Writes `model` as a VoxtralForConditionalGeneration folder at `out` (which must not exist).

    `audio_token_id` is the placeholder id whose positions take the audio embeddings (the
    training tokenizer's). Raises `voxtral.NotRepresentableError` (nothing written) when no
    transformers class matches the architecture, ValueError when tensors and config disagree.
    """
    np_dtype = _check_dtype(dtype)
    voxtral.check_representable(model)
    if not 0 <= audio_token_id < model.llm.config.vocab_size:
        raise ValueError(
            f"audio_token_id {audio_token_id} is outside the LLM's vocabulary of {model.llm.config.vocab_size}"
        )
    encoder_adapted = any(linear.has_lora for _, linear in linear_modules(model.encoder))
    if encoder_adapted and not merge_lora:
        raise ValueError(
            "the encoder has LoRA adapters; PEFT adapters are exported for the LLM only: use merge_lora (--merge-lora)"
        )
    config = voxtral.hf_config(model, audio_token_id)
    config.dtype = TORCH_DTYPE_NAMES[dtype]
    written = json.loads(config.to_json_string())
    _check_llm_round_trip(model.llm.config, written["text_config"])
    encoder_cfg, projector_cfg, llm_cfg = voxtral.configs_from_hf(written)
    table = voxtral.table(llm_cfg)

    merged = merged_kernels(model) if merge_lora else {}
    tensors = hf_tensors(model, table, merged=merged, dtype=np_dtype)
    if llm_cfg.tie_word_embeddings:
        tensors[voxtral.LM_HEAD_KEY] = tensors[voxtral.EMBED_KEY].copy()
    abstract = nnx.eval_shape(lambda: build_speechlm(encoder_cfg, projector_cfg, llm_cfg, None, rngs=nnx.Rngs(0)))
    ignore = (re.escape(voxtral.LM_HEAD_KEY),) if llm_cfg.tie_word_embeddings else ()
    plan_import(nnx.state(abstract), table, _Shapes(tensors), ignore=ignore)
    window_seconds = 2 * encoder_cfg.max_source_positions * HOP_LENGTH / 16000
    if window_seconds != int(window_seconds):
        raise ValueError(
            f"a {2 * encoder_cfg.max_source_positions}-frame window is not a whole number of seconds; "
            "WhisperFeatureExtractor cannot describe it"
        )
    write_adapter = _adapter_plan(model.llm, merge_lora)

    with staged_folder(out) as folder:
        config.save_pretrained(str(folder))
        _generation_config(llm_cfg).save_pretrained(str(folder))
        write_safetensors(folder, tensors, max_shard_size)
        _save_tokenizer(tokenizer_dir, folder)
        transformers.WhisperFeatureExtractor(
            feature_size=encoder_cfg.num_mel_bins,
            sampling_rate=16000,
            hop_length=HOP_LENGTH,
            chunk_length=int(window_seconds),
            n_fft=400,
        ).save_pretrained(str(folder))
        if write_adapter:
            (folder / ADAPTER_DIR).mkdir()
            peft_adapter.write_adapter(
                folder / ADAPTER_DIR,
                model.llm,
                module_name=voxtral.in_memory_module,
                base_model=storage.absolute(out),
                dtype=np_dtype,
                task_type=None,
            )
    return exported(out)


def export_llm(
    llm: DecoderLLM,
    out: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    merge_lora: bool = False,
    dtype: str = "fp32",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    keep_adapter: bool = True,
) -> Path:
    """Writes the LLM as its `*ForCausalLM` folder at `out` (which must not exist); unmerged
    adapters go to `out/adapter` as a PEFT adapter onto that model (or are left out with
    `keep_adapter=False`: the base model alone)."""
    np_dtype = _check_dtype(dtype)
    hf = llm.config.to_hf()
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.dtype = TORCH_DTYPE_NAMES[dtype]
    written = json.loads(config.to_json_string())
    _check_llm_round_trip(llm.config, written)
    llm_cfg = LLMConfig.from_hf(written)
    table = LLM_TABLES[llm_cfg.model_type]

    merged = merged_kernels(llm) if merge_lora else {}
    tensors = hf_tensors(llm, table, merged=merged, dtype=np_dtype)
    abstract = nnx.eval_shape(lambda: DecoderLLM(llm_cfg, rngs=nnx.Rngs(0)))
    plan_import(nnx.state(abstract), table, _Shapes(tensors), ignore=LLM_IGNORED)
    write_adapter = keep_adapter and _adapter_plan(llm, merge_lora)

    with staged_folder(out) as folder:
        config.save_pretrained(str(folder))
        _generation_config(llm_cfg).save_pretrained(str(folder))
        write_safetensors(folder, tensors, max_shard_size)
        _save_tokenizer(tokenizer_dir, folder)
        if write_adapter:
            (folder / ADAPTER_DIR).mkdir()
            peft_adapter.write_adapter(
                folder / ADAPTER_DIR,
                llm,
                module_name=peft_adapter.causal_lm_module,
                base_model=storage.absolute(out),
                dtype=np_dtype,
                task_type="CAUSAL_LM",
            )
    return exported(out)


def write_whisper_encoder(encoder: WhisperEncoder, folder: Path) -> None:
    """Writes the encoder into `folder` as a WhisperModel-layout checkpoint (`encoder.*` keys, fp32)
    that `hf_import.load_whisper_encoder` reads (a run's trained encoder as the next run's base)."""
    transformers.WhisperConfig(**encoder.config.to_hf()).save_pretrained(str(folder))
    tensors = hf_tensors(encoder, WHISPER_TABLE, merged={}, dtype=np.dtype(np.float32))
    write_safetensors(folder, tensors, DEFAULT_SHARD_SIZE)

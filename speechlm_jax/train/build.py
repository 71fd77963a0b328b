"""Builds the SpeechLM a config describes, directly in its shardings.

`config.model.llm` (and `config.model.encoder`) is a preset name (`models/presets.py`),
a local HF folder (its config.json), or a dict of HF config fields; `*_weights` names an
HF checkpoint folder to load, or "" for random initialisation (tests, the tiny variants).

To avoid ever holding a replicated or a second copy of a large model, the whole SpeechLM
is first built abstractly (`nnx.eval_shape`); the parts with pretrained weights are read
tensor by tensor into their shardings (`models.hf_import`), and only the remaining
parameters (projector, LoRA, any part without weights) are initialised, by one jitted
function whose outputs are exactly those parameters in their shardings (XLA drops the
initialisers of everything else).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from speechlm_jax import storage
from speechlm_jax.models import hf_import, presets
from speechlm_jax.models.frontend import SpecAugment
from speechlm_jax.models.llm import LLMConfig
from speechlm_jax.models.lora import LoRAConfig
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import LengthAdapter, SpeechLM, build_speechlm
from speechlm_jax.models.whisper import WhisperConfig
from speechlm_jax.sharding import Rules
from speechlm_jax.train import partitions


def _hf_fields(spec: Any, table: Mapping[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    if isinstance(spec, ml_collections.ConfigDict):
        return spec.to_dict()
    if isinstance(spec, Mapping):
        return dict(spec)
    if spec in table:
        return dict(table[spec])
    folder = storage.path(spec) / "config.json"
    if folder.is_file():
        return json.loads(folder.read_text())
    raise ValueError(
        f"model.{kind}={spec!r} is neither a preset ({', '.join(sorted(table))}) nor an HF folder with config.json"
    )


def llm_config(config: ml_collections.ConfigDict) -> LLMConfig:
    """The decoder's config: `model.llm` (preset | folder | HF fields) with the run's remat and attention."""
    return LLMConfig.from_hf(_hf_fields(config.model.llm, presets.LLM_PRESETS, "llm"), **llm_overrides(config))


def llm_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of `LLMConfig` the run sets (`llm.OWN_FIELDS`), not the HF config."""
    return dict(remat=config.model.remat, attention=config.model.attention, scan_layers=config.model.scan_layers)


def encoder_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of `WhisperConfig` the run sets (`whisper.OWN_FIELDS`), not the HF config."""
    return dict(attention=config.model.attention, scan_layers=config.model.scan_layers)


def encoder_config(config: ml_collections.ConfigDict) -> WhisperConfig:
    """The speech encoder's config from `model.encoder` (preset | folder | HF fields)."""
    return WhisperConfig.from_hf(
        _hf_fields(config.model.encoder, presets.WHISPER_PRESETS, "encoder"), **encoder_overrides(config)
    )


def projector_config(config: ml_collections.ConfigDict) -> ProjectorConfig:
    """`model.projector` as the models' ProjectorConfig (0 = default for hidden and width)."""
    p = config.model.projector
    return ProjectorConfig(
        kind=p.kind,
        downsample=p.downsample,
        hidden=p.hidden or None,
        activation=p.activation,
        use_bias=p.use_bias,
        width=p.width or None,
        ctc_blank=p.ctc_blank,
    )


def lora_configs(config: ml_collections.ConfigDict) -> tuple[LoRAConfig | None, LoRAConfig | None]:
    """(LLM adapters, encoder adapters) from `model.lora`; None where there are none."""
    lora = config.model.lora
    if lora.rank <= 0:
        return None, None
    llm = LoRAConfig(rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
    encoder = LoRAConfig(rank=lora.rank, alpha=lora.alpha, targets=lora.encoder_targets) if lora.encoder else None
    return llm, encoder


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SpeechLM:
    """A randomly initialised SpeechLM of `config` (adapters when `model.lora.rank` > 0), unsharded."""
    llm_lora, encoder_lora = lora_configs(config)
    adapter = config.model.length_adapter
    return build_speechlm(
        encoder_config(config),
        projector_config(config),
        llm_config(config),
        llm_lora,
        encoder_lora_cfg=encoder_lora,
        length_adapter=(
            LengthAdapter(adapter.blank_id, config.loss.chunk_size, adapter.output, adapter.temperature)
            if adapter.enabled
            else None
        ),
        augment=SpecAugment(**config.model.spec_augment),
        dtype=jnp.dtype(config.model.dtype),
        param_dtype=jnp.dtype(config.model.param_dtype),
        rngs=rngs,
    )


def abstract_model(config: ml_collections.ConfigDict) -> SpeechLM:
    """The SpeechLM of `config` with shapes only (no memory): for FLOP counts and shardings."""
    return nnx.eval_shape(lambda: create_model(config, nnx.Rngs(config.seed)))


def _loaded_parts(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules) -> dict[str, nnx.State]:
    """{"llm": state, "encoder": state} of the parts that have pretrained weights, placed in their shardings."""
    dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
    parts: dict[str, nnx.State] = {}
    if config.model.llm_weights:
        llm = hf_import.load_llm(
            config.model.llm_weights,
            dtype=dtype,
            param_dtype=param_dtype,
            mesh=mesh,
            rules=rules,
            **llm_overrides(config),
        )
        if llm.config != llm_config(config):
            raise ValueError(
                f"model.llm_weights={config.model.llm_weights!r} has config {llm.config}, not model.llm's "
                f"{llm_config(config)}"
            )
        parts["llm"] = nnx.state(llm)
    if config.model.encoder_weights:
        encoder = hf_import.load_whisper_encoder(
            config.model.encoder_weights,
            dtype=dtype,
            param_dtype=param_dtype,
            mesh=mesh,
            rules=rules,
            **encoder_overrides(config),
        )
        if encoder.config != encoder_config(config):
            raise ValueError(
                f"model.encoder_weights={config.model.encoder_weights!r} has config {encoder.config}, "
                f"not model.encoder's {encoder_config(config)}"
            )
        parts["encoder"] = nnx.state(encoder)
    return parts


def _path_strings(path: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def _prefixed_paths(state: nnx.State, prefix: str) -> set[tuple[str, ...]]:
    return {(prefix, *_path_strings(path)) for path, _ in nnx.to_flat_state(state)}


def build_model(
    config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, *, compiler_options: Mapping[str, Any] | None = None
) -> SpeechLM:
    """The SpeechLM of `config`, every parameter in the sharding its logical axes ask for."""
    abstract = abstract_model(config)
    graphdef, abstract_state = nnx.split(abstract)
    loaded = _loaded_parts(config, mesh, rules)
    loaded_paths = set().union(*(_prefixed_paths(s, name) for name, s in loaded.items())) if loaded else set()

    def is_fresh(path: tuple, _: Any) -> bool:
        return _path_strings(path) not in loaded_paths

    fresh_abstract = nnx.split(abstract, is_fresh, ...)[1]
    shardings = partitions.shardings(fresh_abstract, mesh, rules)
    fresh = jax.jit(
        lambda: nnx.split(create_model(config, nnx.Rngs(config.seed)), is_fresh, ...)[1],
        out_shardings=shardings,
        compiler_options=compiler_options,
    )()
    return nnx.merge(graphdef, fresh, *(nnx.State({name: state}) for name, state in loaded.items()))


def cast_floating(state: Any, dtype: Any) -> Any:
    """`state` with its floating arrays in `dtype` (the frozen base may be stored in bf16)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)

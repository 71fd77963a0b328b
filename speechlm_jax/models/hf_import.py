"""Import HF checkpoints (config.json + safetensors) into our NNX models, without torch.

A model family is described by a mapping table: a tuple of `Rule(ours, hf, hook)`
entries, where `ours` is a parameter path of our model state with `{name}`
placeholders (`layers/{i}/attn/q_proj/kernel`), `hf` the checkpoint key with the same
placeholders (`model.layers.{i}.self_attn.q_proj.weight`) and `hook` turns the HF
array into ours (e.g. `transpose` for torch's [out, in] Linear weights). One generic
loader, `load_state`, walks the abstract state of a model (`nnx.eval_shape`), finds
each parameter's tensor through the table, checks every shape *before* reading any
data (a checkpoint that does not fit the config fails naming the first mismatched
tensor, and listing missing and unexpected keys), then reads tensor by tensor and
places each one directly in its sharding when a mesh is given.

Safetensors are read with `safe_open(framework="numpy")`; bfloat16 (and float8)
tensors, which numpy cannot represent, are read as raw bytes from the file and
viewed with `ml_dtypes`. Single files and sharded checkpoints
(`model.safetensors.index.json`) are both supported.

The LLM tables (Llama, Qwen2, Qwen3, Gemma 3 text) are here; other families add
their own table and call `load_state`.

Scanned models (`scan_layers`) hold each layer parameter stacked, [layers, ...], under one
path without the layer index (`layers/attn/q_proj/kernel`). The tables stay per layer: such
a parameter is planned as its per-layer paths (`layers/{i}/attn/q_proj/kernel`), and loaded
as layer i's tensors stacked along the leading axis; export runs the same split backwards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open

from speechlm_jax import storage
from speechlm_jax.models.layers import LAYERS_AXIS
from speechlm_jax.models.llm import DecoderLLM, LLMConfig
from speechlm_jax.models.whisper import WhisperConfig, WhisperEncoder
from speechlm_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec, variable_axes

Hook = Callable[[Any], Any]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"

# Dtypes numpy has no type for: read from the raw bytes.
RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def keep(x: Any) -> Any:
    return x


def transpose(x: Any) -> Any:
    """torch Linear weight [out, in] -> our kernel [in, out]."""
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """One mapping entry: our parameter path pattern, the HF key pattern, and the array hook.

    Hooks use only array methods (`.T`, `.reshape`, `.transpose`) so that they run on
    numpy arrays and, for the shape check, on abstract jax values.
    """

    ours: str
    hf: str
    hook: Hook = keep

    def match(self, path: str) -> str | None:
        """The HF key for our `path`, or None when this rule does not cover it."""
        found = _pattern(self.ours).fullmatch(path)
        return self.hf.format(**found.groupdict()) if found else None


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>[^/]+)" for k, p in enumerate(parts))
    return re.compile(regex)


def _decoder_table(mlp_norm: str, sandwich: bool) -> tuple[Rule, ...]:
    layer = "layers/{i}"
    hf_layer = "model.layers.{i}"
    rules = [
        Rule("embed_tokens/embedding", "model.embed_tokens.weight"),
        Rule("norm/scale", "model.norm.weight"),
        Rule("lm_head/kernel", "lm_head.weight", transpose),
        Rule(f"{layer}/attn_norm/scale", f"{hf_layer}.input_layernorm.weight"),
        Rule(f"{layer}/mlp_norm/scale", f"{hf_layer}.{mlp_norm}.weight"),
        Rule(f"{layer}/attn/q_norm/scale", f"{hf_layer}.self_attn.q_norm.weight"),
        Rule(f"{layer}/attn/k_norm/scale", f"{hf_layer}.self_attn.k_norm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(Rule(f"{layer}/attn/{proj}/kernel", f"{hf_layer}.self_attn.{proj}.weight", transpose))
        rules.append(Rule(f"{layer}/attn/{proj}/bias", f"{hf_layer}.self_attn.{proj}.bias"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"{layer}/mlp/{proj}/kernel", f"{hf_layer}.mlp.{proj}.weight", transpose))
        rules.append(Rule(f"{layer}/mlp/{proj}/bias", f"{hf_layer}.mlp.{proj}.bias"))
    if sandwich:
        rules.append(Rule(f"{layer}/post_attn_norm/scale", f"{hf_layer}.post_attention_layernorm.weight"))
        rules.append(Rule(f"{layer}/post_mlp_norm/scale", f"{hf_layer}.post_feedforward_layernorm.weight"))
    return tuple(rules)


# Llama-style families name the pre-MLP norm `post_attention_layernorm`; Gemma 3 uses that
# name for the norm after attention and calls the pre-MLP one `pre_feedforward_layernorm`.
LLM_TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": _decoder_table("post_attention_layernorm", sandwich=False),
    "qwen2": _decoder_table("post_attention_layernorm", sandwich=False),
    "qwen3": _decoder_table("post_attention_layernorm", sandwich=False),
    "gemma3_text": _decoder_table("pre_feedforward_layernorm", sandwich=True),
}

# Checkpoint keys that carry no parameter of ours (old RoPE buffers; a tied lm_head copy).
LLM_IGNORED = (r".*rotary_emb\.inv_freq$",)
LLM_IGNORED_TIED = (r"^lm_head\.weight$",)

# Gemma 3 multimodal checkpoints (the 4B and larger) nest the text model; both layouts
# (original hub files and transformers >= 5 saves) map onto the text-only key names.
GEMMA3_MULTIMODAL_RENAMES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
GEMMA3_MULTIMODAL_IGNORED = (r"^(model\.)?(vision_tower|multi_modal_projector)\..*",)


class SafetensorsCheckpoint:
    """Lazy reader of one safetensors file or a sharded set (with its index).

    A file or folder in an object store is copied to local disk first (once per process), since
    tensors are read by offset from a memory-mapped or local file.
    """

    def __init__(self, path: storage.PathLike, *, renames: Sequence[tuple[str, str]] = ()):
        path = storage.local_copy(path)
        if path.is_dir():
            index = path / SAFETENSORS_INDEX
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({path / name for name in weight_map.values()})
            elif (path / SAFETENSORS_FILE).exists():
                files = [path / SAFETENSORS_FILE]
            else:
                raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}")
        else:
            files = [path]
        self._entries: dict[str, tuple[Path, str, dict[str, Any], int]] = {}
        for file in files:
            header, data_start = _read_header(file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                self._entries[_rename(key, renames)] = (file, key, info, data_start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][2]["shape"])

    def dtype(self, key: str) -> str:
        """The safetensors dtype name (F32, BF16, ...)."""
        return self._entries[key][2]["dtype"]

    def get(self, key: str) -> np.ndarray:
        file, stored_key, info, data_start = self._entries[key]
        raw = RAW_DTYPES.get(info["dtype"])
        if raw is None:
            with safe_open(str(file), framework="numpy") as f:
                return f.get_tensor(stored_key)
        begin, end = info["data_offsets"]
        data = np.fromfile(file, dtype=np.uint8, count=end - begin, offset=data_start + begin)
        return data.view(raw).reshape(info["shape"])


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _path_string(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _variable_value(variable: nnx.Variable) -> Any:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def stacked_layers(variable: nnx.Variable) -> int:
    """How many layers a parameter stacks on its leading axis (scanned models), 0 when it is one layer's."""
    axes = variable_axes(variable)
    return int(_variable_value(variable).shape[0]) if axes and axes[0] == LAYERS_AXIS else 0


def layer_paths(path: str, count: int) -> list[str]:
    """The per-layer paths of a stacked parameter: `llm/layers/attn/q_proj/kernel` ->
    [`llm/layers/0/attn/q_proj/kernel`, ...] (the index after the models' `layers` attribute)."""
    parts = path.split("/")
    at = parts.index("layers") + 1
    return ["/".join([*parts[:at], str(i), *parts[at:]]) for i in range(count)]


def per_layer(path: str, variable: nnx.Variable) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of each layer's part of a parameter: itself, or each layer of a stacked one."""
    shape = tuple(_variable_value(variable).shape)
    count = stacked_layers(variable)
    if not count:
        return [(path, shape)]
    return [(p, shape[1:]) for p in layer_paths(path, count)]


def plan_import(
    abstract_state: nnx.State,
    table: Sequence[Rule],
    checkpoint: SafetensorsCheckpoint,
    *,
    ignore: Iterable[str] = (),
) -> dict[str, tuple[str, Hook]]:
    """Our path -> (HF key, hook) for every parameter (per layer for stacked ones, `per_layer`);
    raises if the checkpoint does not fit.

    The error names the first tensor whose shape differs (checkpoint shape, shape after
    the hook, and ours), then the missing and unexpected keys.
    """
    ignored = [re.compile(p) for p in ignore]
    plan: dict[str, tuple[str, Hook]] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    available = set(checkpoint.keys())
    entries = [entry for path, v in nnx.to_flat_state(abstract_state) for entry in per_layer(_path_string(path), v)]
    for ours, want in entries:
        found = next(((key, rule.hook) for rule in table if (key := rule.match(ours)) is not None), None)
        if found is None:
            missing.append(f"{ours} (no mapping rule)")
            continue
        key, hook = found
        if key not in available:
            missing.append(f"{key} (for {ours})")
            continue
        stored = checkpoint.shape(key)
        got = tuple(jax.eval_shape(hook, jax.ShapeDtypeStruct(stored, jnp.float32)).shape)
        if got != want:
            mismatched.append(
                f"{key} -> {ours}: checkpoint shape {stored} (as ours {got}) but the model expects {want}"
            )
        plan[ours] = (key, hook)
    used = {key for key, _ in plan.values()}
    unexpected = sorted(k for k in available - used if not any(p.fullmatch(k) for p in ignored))
    if missing or mismatched or unexpected:
        lines = ["checkpoint does not fit the model config"]
        if mismatched:
            lines.append(f"first mismatched tensor: {mismatched[0]} ({len(mismatched)} mismatched in all)")
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        raise ValueError("; ".join(lines))
    return plan


def load_state(
    abstract_state: nnx.State,
    table: Sequence[Rule],
    checkpoint: SafetensorsCheckpoint,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    ignore: Iterable[str] = (),
) -> nnx.State:
    """Fills an abstract model state from a checkpoint, tensor by tensor.

    Each array takes the dtype of its abstract variable (the model's param_dtype). With a
    mesh, each is built directly in the NamedSharding its logical axes ask for
    (`jax.make_array_from_callback`), so no device ever holds a replicated copy.
    """
    plan = plan_import(abstract_state, table, checkpoint, ignore=ignore)
    flat = nnx.to_flat_state(abstract_state)
    loaded = []
    for path, variable in flat:
        spec = _variable_value(variable)
        layers = []
        for ours, _ in per_layer(_path_string(path), variable):
            key, hook = plan[ours]
            layers.append(np.asarray(hook(checkpoint.get(key))).astype(spec.dtype, copy=False))
        host = np.stack(layers) if stacked_layers(variable) else layers[0]
        if mesh is None:
            value = jnp.asarray(host)
        else:
            sharding = NamedSharding(mesh, logical_to_spec(variable_axes(variable), rules, host.shape, mesh))
            value = jax.make_array_from_callback(host.shape, sharding, lambda index, host=host: host[index])
        loaded.append((path, variable.replace(value)))
    return nnx.from_flat_state(loaded)


def read_hf_config(path: storage.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory (local or in an object store) as a dict."""
    return json.loads((storage.path(path) / "config.json").read_text())


def load_llm(
    path: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **config_overrides: Any,
) -> DecoderLLM:
    """A `DecoderLLM` with the weights of an HF checkpoint directory (Llama, Qwen2/3, Gemma 3).

    `dtype` is the compute dtype, `param_dtype` the dtype the weights are stored in;
    `config_overrides` set our own config fields (e.g. `remat="full"`).
    """
    hf_config = read_hf_config(path)
    config = LLMConfig.from_hf(hf_config, **config_overrides)
    renames: tuple[tuple[str, str], ...] = ()
    ignore = LLM_IGNORED + (LLM_IGNORED_TIED if config.tie_word_embeddings else ())
    if hf_config.get("model_type") == "gemma3":
        renames = GEMMA3_MULTIMODAL_RENAMES
        ignore += GEMMA3_MULTIMODAL_IGNORED
    checkpoint = SafetensorsCheckpoint(path, renames=renames)
    abstract = nnx.eval_shape(lambda: DecoderLLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = load_state(abstract_state, LLM_TABLES[config.model_type], checkpoint, mesh=mesh, rules=rules, ignore=ignore)
    return nnx.merge(graphdef, state)


def llm_config_from_checkpoint(path: str | Path, **overrides: Any) -> LLMConfig:
    """The `LLMConfig` of a checkpoint directory (reads only config.json)."""
    return LLMConfig.from_hf(read_hf_config(path), **overrides)


# ---------------------------------------------------------------------------------------
# Whisper encoder (speech side). Tables and loader for `speechlm_jax.models.whisper`;
# WhisperModel checkpoints store the encoder under `encoder.`,
# WhisperForConditionalGeneration under `model.encoder.`; the decoder is ignored.
# ---------------------------------------------------------------------------------------


def conv_kernel(x: Any) -> Any:
    """torch Conv1d weight [out, in, width] -> our kernel [width, in, out]."""
    return x.transpose(2, 1, 0)


WHISPER_TABLE: tuple[Rule, ...] = (
    Rule("conv1/kernel", "encoder.conv1.weight", conv_kernel),
    Rule("conv1/bias", "encoder.conv1.bias"),
    Rule("conv2/kernel", "encoder.conv2.weight", conv_kernel),
    Rule("conv2/bias", "encoder.conv2.bias"),
    Rule("embed_positions", "encoder.embed_positions.weight"),
    Rule("layers/{i}/attn/{proj}/kernel", "encoder.layers.{i}.self_attn.{proj}.weight", transpose),
    Rule("layers/{i}/attn/{proj}/bias", "encoder.layers.{i}.self_attn.{proj}.bias"),
    Rule("layers/{i}/attn_norm/scale", "encoder.layers.{i}.self_attn_layer_norm.weight"),
    Rule("layers/{i}/attn_norm/bias", "encoder.layers.{i}.self_attn_layer_norm.bias"),
    Rule("layers/{i}/mlp/{fc}/kernel", "encoder.layers.{i}.{fc}.weight", transpose),
    Rule("layers/{i}/mlp/{fc}/bias", "encoder.layers.{i}.{fc}.bias"),
    Rule("layers/{i}/mlp_norm/scale", "encoder.layers.{i}.final_layer_norm.weight"),
    Rule("layers/{i}/mlp_norm/bias", "encoder.layers.{i}.final_layer_norm.bias"),
    Rule("layer_norm/scale", "encoder.layer_norm.weight"),
    Rule("layer_norm/bias", "encoder.layer_norm.bias"),
)
WHISPER_RENAMES = (("model.encoder.", "encoder."),)
WHISPER_IGNORED = (r"^(?!encoder\.).*",)


def whisper_config_from_checkpoint(path: str | Path, **overrides: Any) -> WhisperConfig:
    """The encoder's `WhisperConfig` of a checkpoint directory (reads only config.json)."""
    return WhisperConfig.from_hf(read_hf_config(path), **overrides)


def load_whisper_encoder(
    path: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **config_overrides: Any,
) -> WhisperEncoder:
    """A `WhisperEncoder` with the encoder weights of a WhisperModel / WhisperForConditionalGeneration
    checkpoint directory; the fixed position table is imported too (see `whisper.sinusoids`).
    `config_overrides` set our own config fields (e.g. `attention="dot_product"`)."""
    config = whisper_config_from_checkpoint(path, **config_overrides)
    checkpoint = SafetensorsCheckpoint(path, renames=WHISPER_RENAMES)
    abstract = nnx.eval_shape(lambda: WhisperEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = load_state(abstract_state, WHISPER_TABLE, checkpoint, mesh=mesh, rules=rules, ignore=WHISPER_IGNORED)
    return nnx.merge(graphdef, state)

"""The LLM's LoRA adapters as a PEFT adapter folder, and back.

A PEFT LoRA adapter is `adapter_config.json` (peft_type LORA, r, lora_alpha, the target
module names, the base model's path) plus `adapter_model.safetensors` with, per adapted
module, `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r].
Ours are `lora_a` [in, r] and `lora_b` [r, out] with the update scaled by alpha / r, as
PEFT's (without rsLoRA), so the tensors are transposes and `lora_alpha` = scale * r.

`<module>` is the module's path in the model PEFT wraps: `model.layers.3.self_attn.q_proj`
in a `*ForCausalLM`, `model.language_model.layers.3.self_attn.q_proj` in Voxtral. The
caller says which with `module_name`, a function of the LLM checkpoint key of the adapted
kernel (`model.layers.3.self_attn.q_proj.weight`, from the LLM mapping table).
`target_modules` lists the full names, so PEFT adapts exactly those modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from speechlm_jax.models.hf_import import LLM_TABLES, SafetensorsCheckpoint, layer_paths
from speechlm_jax.models.layers import Linear
from speechlm_jax.models.llm import DecoderLLM
from speechlm_jax.models.lora import linear_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

ModuleName = Callable[[str], str]


def causal_lm_module(llm_key: str) -> str:
    """The module of an LLM checkpoint key inside `*ForCausalLM` (the key without `.weight`)."""
    return llm_key.rsplit(".", 1)[0]


def _kernel_key(llm: DecoderLLM, path: str) -> str:
    ours = f"{path}/kernel"
    for rule in LLM_TABLES[llm.config.model_type]:
        key = rule.match(ours)
        if key is not None:
            return key
    raise ValueError(f"no mapping rule for the adapted kernel {ours}")


def adapted_linears(llm: DecoderLLM) -> list[tuple[str, Linear]]:
    """(our module path, Linear) of every Linear of the LLM that carries an adapter."""
    return [(path, linear) for path, linear in linear_modules(llm) if linear.has_lora]


def rank_and_alpha(linears: list[tuple[str, Linear]]) -> tuple[int, float]:
    """The adapters' shared (r, lora_alpha); PEFT's single-config form needs them equal."""
    pairs = {(int(m.lora_a.shape[-1]), float(m.lora_scale) * int(m.lora_a.shape[-1])) for _, m in linears}
    if len(pairs) != 1:
        raise ValueError(f"the LLM adapters have different (rank, alpha) pairs {sorted(pairs)}; export them merged")
    return pairs.pop()


def adapter_tensors(
    llm: DecoderLLM, module_name: ModuleName, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], list[str]]:
    """({PEFT key: array in `dtype`}, target module names) of the LLM's adapters."""
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for path, linear in adapted_linears(llm):
        a, b = np.asarray(linear.lora_a[...]), np.asarray(linear.lora_b[...])
        # A scanned LLM's adapters are stacked [layers, ...]: one PEFT module per layer.
        layers = [(path, a, b)] if a.ndim == 2 else list(zip(layer_paths(path, a.shape[0]), a, b))
        for layer_path, a_i, b_i in layers:
            module = module_name(_kernel_key(llm, layer_path))
            modules.append(module)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_i.T.astype(dtype))
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_i.T.astype(dtype))
    return tensors, modules


def write_adapter(
    folder: Path, llm: DecoderLLM, *, module_name: ModuleName, base_model: str, dtype: np.dtype, task_type: str | None
) -> None:
    """Writes the LLM's adapters into `folder` (which must exist) as a PEFT LoRA adapter."""
    linears = adapted_linears(llm)
    if not linears:
        raise ValueError("the LLM has no LoRA adapters to export")
    rank, alpha = rank_and_alpha(linears)
    tensors, modules = adapter_tensors(llm, module_name, dtype)
    config = dict(
        peft_type="LORA",
        task_type=task_type,
        base_model_name_or_path=base_model,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=modules,
        bias="none",
        fan_in_fan_out=False,
        use_rslora=False,
        use_dora=False,
        init_lora_weights=True,
        modules_to_save=None,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def read_adapter(folder: str | Path, llm: DecoderLLM, *, module_name: ModuleName, rngs: nnx.Rngs) -> int:
    """Attaches the PEFT adapter in `folder` to `llm` (float32 adapters); returns how many modules it adapts.

    Raises when the adapter names a module the LLM does not have, or a tensor's shape does not fit.
    """
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(
            f"{folder} is not a plain LoRA adapter (peft_type {config.get('peft_type')!r}, rsLoRA/DoRA unsupported)"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder} uses per-module rank/alpha patterns, which our LoRAConfig does not express")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    checkpoint = SafetensorsCheckpoint(folder / ADAPTER_WEIGHTS)
    available = set(checkpoint.keys())
    used = set()
    for path, linear in linear_modules(llm):
        # A scanned LLM's Linear stacks every layer's: its adapter is each layer's, stacked.
        kernel_shape = linear.kernel[...].shape
        stacked = len(kernel_shape) == 3
        modules = [
            module_name(_kernel_key(llm, p)) for p in (layer_paths(path, kernel_shape[0]) if stacked else [path])
        ]
        keys = [(f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight") for m in modules]
        present = [a_key in available for a_key, _ in keys]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(
                f"the adapter adapts only some layers of {path}; a scanned LLM (model.scan_layers) adapts all or none"
            )
        want_a, want_b = (rank, linear.in_features), (linear.out_features, rank)
        for module, (a_key, b_key) in zip(modules, keys):
            if checkpoint.shape(a_key) != want_a or checkpoint.shape(b_key) != want_b:
                raise ValueError(
                    f"adapter tensors of {module} have shapes {checkpoint.shape(a_key)}, {checkpoint.shape(b_key)}; "
                    f"the model expects {want_a}, {want_b}"
                )
        linear.add_lora(rank, alpha, rngs=rngs)
        a = [np.asarray(checkpoint.get(a_key), np.float32).T for a_key, _ in keys]
        b = [np.asarray(checkpoint.get(b_key), np.float32).T for _, b_key in keys]
        linear.lora_a[...] = np.stack(a) if stacked else a[0]
        linear.lora_b[...] = np.stack(b) if stacked else b[0]
        used.update(key for pair in keys for key in pair)
    unknown = sorted(available - used)
    if unknown:
        raise ValueError(f"adapter tensors for modules the LLM does not have: {unknown[:5]}")
    return len(used) // 2

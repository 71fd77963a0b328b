"""Config checks that run before anything is built: unknown keys, bad values, the resolved file.

Recipes are `ml_collections` configs (`configs/<recipe>.py:<variant>`), locked so that
a typo cannot silently add a key. `ml_collections` only suggests a neighbour within
the last level of a dotted path; `check_overrides` looks at the whole flattened key
space, so `--config.optimiser.lr=1e-4` fails at start naming `optimizer.lr`.
`validate` checks the values that the trainer interprets as names (recipe, schedule,
trainable groups, mesh axes) so a wrong one fails before any weight is loaded.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from speechlm_jax.sharding import MESH_AXES

RECIPES = ("asr", "mtbi", "salad", "vtb")
# Stages that are not alignment recipes: text SFT of an LLM, CTC pretraining or alignment.
STAGE_RECIPES = ("text_sft", "ctc")
LOSSES = ("cross_entropy", "behavior_imitation", "salad", "ctc")
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")
TRAINABLE_GROUPS = ("projector", "lora", "encoder", "llm")
REMAT_POLICIES = ("none", "full", "dots_saveable")  # the LLM's per-layer policies (models/llm.py)
NONFINITE_ACTIONS = ("stop", "skip")


class ConfigError(ValueError):
    """A config key or value that cannot work; raised at start, before any weight is built."""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key path of a config, leaves and inner nodes alike."""
    keys = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, prefix=f"{path}."))
    return keys


def nearest_keys(key: str, config: ml_collections.ConfigDict, n: int = 3) -> list[str]:
    """The valid key paths closest to `key` (whole dotted path and last component alike)."""
    keys = flat_keys(config)
    close = difflib.get_close_matches(key, keys, n=n, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    return close[:n] if close else difflib.get_close_matches(key, keys, n=n, cutoff=0.0)


def has_key(config: ml_collections.ConfigDict, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def override_keys(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The dotted keys of `--config.a.b=v` / `--config.a.b v` command-line overrides."""
    keys = []
    for arg in argv:
        if arg.startswith(f"--{flag}."):
            keys.append(arg[len(flag) + 3 :].split("=", 1)[0])
    return keys


def check_overrides(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    """Raises ConfigError naming the nearest valid keys for every key the config lacks."""
    problems = [
        f"config key {key!r} does not exist; nearest valid keys: {', '.join(nearest_keys(key, config))}"
        for key in keys
        if not has_key(config, key)
    ]
    if problems:
        raise ConfigError("\n".join(problems))


def _one_of(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}={value!r} is not one of {tuple(allowed)}{hint}")


def trainable_groups(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.train.trainable` ("projector,lora") as a tuple of group names."""
    return tuple(g.strip() for g in config.train.trainable.split(",") if g.strip())


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the values the trainer interprets; raises ConfigError on the first bad one."""
    _one_of("recipe", config.recipe, RECIPES + STAGE_RECIPES)
    _one_of("loss.name", config.loss.name, LOSSES)
    _one_of("optimizer.schedule", config.optimizer.schedule, SCHEDULES)
    _one_of("model.remat", config.model.remat, REMAT_POLICIES)
    _one_of("train.nonfinite", config.train.nonfinite, NONFINITE_ACTIONS)
    groups = trainable_groups(config)
    if not groups:
        raise ConfigError("train.trainable names no group; use some of " + ",".join(TRAINABLE_GROUPS))
    for group in groups:
        _one_of("train.trainable", group, TRAINABLE_GROUPS)
        if not has_key(config, f"optimizer.lr.{group}"):
            raise ConfigError(f"group {group!r} trains but optimizer.lr.{group} is not set")
    if "lora" in groups and config.model.lora.rank <= 0:
        raise ConfigError("train.trainable has 'lora' but model.lora.rank is 0")
    for axis in config.mesh.keys():
        _one_of("mesh axis", axis, MESH_AXES)
    for name, mesh_axes in config.sharding_rules.items():
        for axis in mesh_axes_of(mesh_axes):
            _one_of(f"sharding_rules.{name}", axis, MESH_AXES)
    if not 0.0 <= config.loss.alpha <= 1.0:
        raise ConfigError(f"loss.alpha={config.loss.alpha} must lie in [0, 1]")
    if not 0.0 < config.loss.jsd_beta < 1.0:
        raise ConfigError(f"loss.jsd_beta={config.loss.jsd_beta} must lie in (0, 1)")
    if not 0.0 <= config.loss.label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing={config.loss.label_smoothing} must lie in [0, 1)")
    if config.loss.z_loss < 0.0:
        raise ConfigError(f"loss.z_loss={config.loss.z_loss} must not be negative")
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(f"train.batch_size={config.train.batch_size} does not divide into train.grad_accum={config.train.grad_accum} microbatches")


def mesh_axes_of(rule: str) -> tuple[str, ...]:
    """A rule's mesh axes from its config string: "fsdp", "data,fsdp", or "" (replicated)."""
    return tuple(a.strip() for a in rule.split(",") if a.strip())


def sharding_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The config's rules table in the form `speechlm_jax.sharding` takes."""
    rules = []
    for name, rule in config.sharding_rules.items():
        axes = mesh_axes_of(rule)
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules)


def write_resolved(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Writes the resolved config as `config.json` (and the ml_collections text) into the workdir."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    (workdir / "config.txt").write_text(str(config))
    return path


def read_resolved(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir (`write_resolved`)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a trainer workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/recipe.py[:arg]` the way `config_flags` does: the module's `get_config(arg)`."""
    path, _, arg = spec.partition(":") if ".py:" in spec else (spec, "", "")
    module_spec = importlib.util.spec_from_file_location(f"_speechlm_config_{Path(path).stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def config_flag_value(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of `--config=spec` or `--config spec` in argv, if present."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


@functools.cache
def config_flag() -> flags.FlagHolder:
    """The `--config configs/<recipe>.py:<variant>` absl flag, defined once per process.

    Every entry point that takes a recipe config (`speechlm-train`, `speechlm-compile`) shares
    it, so importing several of them in one process does not define the flag twice.
    """
    return config_flags.DEFINE_config_file("config", None, "recipe config: configs/<recipe>.py:<variant>", lock_config=True)

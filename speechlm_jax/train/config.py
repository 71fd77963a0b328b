"""Config checks that run before anything is built: unknown keys, bad values, the resolved file.

Recipes are `ml_collections` configs (`configs/<recipe>.py:<variant>`), locked so that
a typo cannot silently add a key. `ml_collections` only suggests a neighbour within
the last level of a dotted path; `check_overrides` looks at the whole flattened key
space, so `--config.optimiser.lr=1e-4` fails at start naming `optimizer.lr`.
`validate` checks the values that the trainer interprets as names (recipe, schedule,
trainable groups, mesh axes) so a wrong one fails before any weight is loaded.

The command line of `speechlm-train` and `speechlm-compile` (`parse_command_line`) takes the
forms `ml_collections.config_flags` took, parsed here with argparse beside it:

    --config path/to/recipe.py:variant[,k=v...]     the module's get_config("variant,k=v...")
    --config.a.b=VALUE  or  --config.a.b VALUE      an override, parsed against the field's type
    --config.a.b  /  --noconfig.a.b                 a bool field set to True / False

Values are read against the type of the value already there: bool (true/false, t/f, 1/0, any
case), int, float, str (as given); a tuple from a Python literal (`"(1, 2)"`, `"['a']"`) or a
bare string as a one-element tuple, repeated flags concatenating; lists via `ast.literal_eval`;
a nested dict (ConfigDict) from a dict literal; `None` (or `none`) where the field holds None
or is a placeholder;
a None field takes any Python literal, else the string. Overrides apply in command-line order
on the locked config, so an unknown key fails with the nearest valid keys.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from speechlm_jax import storage
from speechlm_jax.data.config import audio_limit_problem
from speechlm_jax.sharding import MESH_AXES

RECIPES = ("asr", "mtbi", "salad", "vtb")
# Stages that are not alignment recipes: text SFT of an LLM, CTC pretraining or alignment.
STAGE_RECIPES = ("text_sft", "ctc")
LOSSES = ("cross_entropy", "behavior_imitation", "salad", "ctc")
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")
TRAINABLE_GROUPS = ("projector", "lora", "encoder", "llm")
REMAT_POLICIES = ("none", "full", "dots_saveable")  # the LLM's per-layer policies (models/llm.py)
ATTENTION = ("einsum", "dot_product", "cudnn")  # the attention implementations (models/layers.py)
ADAPTER_OUTPUTS = ("frames", "embeddings")  # the length adapter's outputs (models/speechlm.py)
NONFINITE_ACTIONS = ("stop", "skip")
DIRECTIONS = ("forward", "reverse", "jsd")
PROJECTOR_KINDS = ("frame_stack", "conv")
DTYPES = ("float32", "bfloat16", "float16")
OVERLONG = ("drop", "split")
TEXT_LOSSES = ("response", "all")
CONVERSATION_RESPONSES = ("record", "teacher")
PROMPT_SPLITS = ("train", "heldout")
WANDB_MODES = ("", "offline", "online", "disabled")  # "": $WANDB_MODE, else offline (train/wandb_run.py)


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
    _one_of("model.attention", config.model.attention, ATTENTION)
    _one_of("model.length_adapter.output", config.model.length_adapter.output, ADAPTER_OUTPUTS)
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
    _one_of("loss.direction", config.loss.direction, DIRECTIONS)
    _one_of("model.projector.kind", config.model.projector.kind, PROJECTOR_KINDS)
    for key in ("model.dtype", "model.param_dtype", "model.frozen_dtype"):
        _one_of(key, _get(config, key), DTYPES)
    _one_of("data.overlong", config.data.overlong, OVERLONG)
    _one_of("data.text_loss", config.data.text_loss, TEXT_LOSSES)
    _one_of("data.conversation_responses", config.data.conversation_responses, CONVERSATION_RESPONSES)
    _one_of("data.eval_prompt_split", config.data.eval_prompt_split, PROMPT_SPLITS)
    _one_of("train.wandb.mode", config.train.wandb.mode, WANDB_MODES)
    check_ranges(config)
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} does not divide into "
            f"train.grad_accum={config.train.grad_accum} microbatches"
        )


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key may take: `low`..`high` (None = unbounded), each end in or out."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is excluded
    high_open: bool = False
    zero: str = ""  # what 0 means, when 0 is a setting ("off")

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        left = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        right = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{left}, {right}"


COUNT = Range(1)  # a positive count
NONNEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
# Every numeric value the trainer reads, with its range: checked before anything is built, so a
# value that would hang the data pipeline (`train.batch_size=0`) or divide by zero mid-run
# (`train.log_every=0`) fails at start naming the key.
VALUE_RANGES: dict[str, Range] = {
    "train.steps": COUNT,
    "train.batch_size": COUNT,
    "train.grad_accum": COUNT,
    "train.log_every": COUNT,
    "train.eval_every": Range(0, zero="no held-out evaluation"),
    "train.eval_batches": NONNEGATIVE,
    "checkpoint.every": Range(0, zero="save only at the last step and on SIGTERM"),
    "checkpoint.keep": COUNT,
    "optimizer.warmup_steps": NONNEGATIVE,
    "optimizer.decay_fraction": FRACTION,
    "optimizer.min_lr_ratio": FRACTION,
    "optimizer.b1": Range(0, 1, high_open=True),
    "optimizer.b2": Range(0, 1, high_open=True),
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NONNEGATIVE,
    "optimizer.clip_norm": Range(0, zero="no clipping"),
    "loss.alpha": FRACTION,
    "loss.jsd_beta": Range(0, 1, low_open=True, high_open=True),
    "loss.label_smoothing": Range(0, 1, high_open=True),
    "loss.z_loss": NONNEGATIVE,
    "loss.temperature": POSITIVE,
    "loss.chunk_size": COUNT,
    "loss.blank_id": NONNEGATIVE,
    "model.projector.downsample": COUNT,
    "model.projector.hidden": Range(0, zero="the projector's default width"),
    "model.projector.width": Range(0, zero="the projector's default kernel width"),
    "model.lora.rank": Range(0, zero="no LoRA"),
    "model.lora.alpha": POSITIVE,
    "model.length_adapter.blank_id": NONNEGATIVE,
    "model.length_adapter.temperature": POSITIVE,
    "model.spec_augment.freq_masks": Range(0, zero="no frequency masks"),
    "model.spec_augment.freq_width": NONNEGATIVE,
    "model.spec_augment.time_masks": Range(0, zero="no time masks"),
    "model.spec_augment.time_width": NONNEGATIVE,
    "model.init_from.step": Range(0, zero="the latest checkpoint"),
    "data.text_weight": FRACTION,
    "data.conversation_weight": FRACTION,
    "data.interleave_prob": FRACTION,
    "data.interleave_ratio": FRACTION,
    "data.span_min": COUNT,
    "data.span_max": COUNT,
    "data.max_slots": COUNT,
    "data.teacher_tokens": COUNT,
    "data.num_threads": NONNEGATIVE,
    "data.num_workers": NONNEGATIVE,
    "data.max_audio_seconds": Range(0, zero="as long as the largest bucket"),
}


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    holder, leaf = _field(config, key)
    return holder[leaf]


def _check_range(key: str, value: Any, allowed: Range) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number")
    if not allowed.holds(value):
        zero = f" (0 = {allowed.zero})" if allowed.zero else ""
        raise ConfigError(f"{key}={value!r} must lie in {allowed}{zero}")


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first numeric value outside its range (`VALUE_RANGES`), a bad
    bucket, example-kind weight, mesh size or learning rate."""
    for key, allowed in VALUE_RANGES.items():
        _check_range(key, _get(config, key), allowed)
    if config.train.eval_every and not config.train.eval_batches:
        raise ConfigError(f"train.eval_every={config.train.eval_every} evaluates, but train.eval_batches is 0")
    if config.data.span_max < config.data.span_min:
        raise ConfigError(f"data.span_max={config.data.span_max} is below data.span_min={config.data.span_min}")
    for group, lr in config.optimizer.lr.items():
        _check_range(f"optimizer.lr.{group}", lr, NONNEGATIVE)
    kinds = dict(config.data.kinds)
    for kind, weight in kinds.items():
        _check_range(f"data.kinds.{kind}", weight, NONNEGATIVE)
    if kinds and not sum(kinds.values()) > 0:
        raise ConfigError(f"data.kinds={kinds} weighs every example kind 0")
    buckets = tuple(config.data.buckets)
    if not buckets:
        raise ConfigError("data.buckets is empty; give at least one (audio samples per slot, student tokens)")
    for bucket in buckets:
        if len(bucket) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in bucket):
            raise ConfigError(
                f"data.buckets has {tuple(bucket)!r}; each bucket is (audio samples per slot, student tokens), "
                "two positive ints"
            )
    problem = audio_limit_problem(
        config.data.max_audio_seconds, buckets, config.data.overlong, config.data.get("sample_rate", 16000)
    )
    if problem:
        raise ConfigError(f"data.{problem}")
    for axis, size in config.mesh.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{axis}={size!r} must be a positive size or -1 (the rest of the devices)")


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


def write_resolved(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> epath.Path:
    """Writes the resolved config as `config.json` (and the ml_collections text) into the workdir
    (local or in an object store), each file published whole."""
    workdir = storage.path(workdir)
    path = workdir / "config.json"
    storage.write_text(path, json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    storage.write_text(workdir / "config.txt", str(config))
    return path


def read_resolved(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir (`write_resolved`)."""
    path = storage.path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a trainer workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/recipe.py[:arg]` the way `config_flags` does: the module's `get_config(arg)`."""
    path, _, arg = spec.partition(":") if ".py:" in spec else (spec, "", "")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_speechlm_config_{Path(path).stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as error:  # the recipes' variant parsing (configs/base.parse_arg)
        raise ConfigError(f"{spec}: {error}") from error


def config_flag_value(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of `--config=spec` or `--config spec` in argv, if present."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# --- command-line overrides (`--config.a.b=value`)


@dataclasses.dataclass(frozen=True)
class Override:
    """One `--config.<key>[=value]` on the command line; `value` None is the bare boolean form."""

    key: str
    value: str | None = None
    negated: bool = False  # --noconfig.<key>

    def __str__(self) -> str:
        flag = f"--{'no' if self.negated else ''}config.{self.key}"
        return flag if self.value is None else f"{flag}={self.value}"


def _override_pattern(flag: str) -> re.Pattern[str]:
    return re.compile(rf"^--?(no)?{re.escape(flag)}\.([^=]+)(?:=(.*))?$", re.DOTALL)


def _field(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    node: Any = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    return node, leaf


def _takes_bare_form(config: ml_collections.ConfigDict | None, key: str) -> bool:
    """Whether `--config.key` alone is complete (bool and None fields, as absl's boolean flags)."""
    if config is None or not has_key(config, key):
        return True  # reported as an unknown key (or a missing --config) later
    holder, leaf = _field(config, key)
    return holder.get_type(leaf) in (bool, type(None)) or holder[leaf] is None


def split_overrides(
    argv: Sequence[str], config: ml_collections.ConfigDict | None, flag: str = "config"
) -> tuple[list[str], list[Override]]:
    """argv -> (the other arguments, the overrides in order); `--config.k v` takes the next argument
    as its value unless the field is a bool (or None) one."""
    pattern = _override_pattern(flag)
    rest: list[str] = []
    overrides: list[Override] = []
    i = 0
    while i < len(argv):
        match = pattern.match(argv[i])
        if not match:
            rest.append(argv[i])
            i += 1
            continue
        negated, key, value = bool(match[1]), match[2], match[3]
        if value is None and not negated and not _takes_bare_form(config, key) and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        overrides.append(Override(key, value, negated))
        i += 1
    return rest, overrides


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "t", "1"):
        return True
    if lowered in ("false", "f", "0"):
        return False
    raise ValueError(f"{text!r} is not a bool (true/false)")


def _parse_int(text: str) -> int:
    # Decimal first ("010" is 10), then 0x.., 0o.., 0b.. as absl's integer flags read them.
    for base in (10, 0):
        try:
            return int(text, base)
        except ValueError:
            continue
    raise ValueError(f"{text!r} is not an int")


def _parse_literal(text: str) -> Any:
    if text in ("true", "false"):
        text = text.capitalize()
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text  # a string: --config.value=my_string


def _parse_tuple(text: str) -> tuple[Any, ...]:
    """`config_flags`' tuple parser: a literal sequence, or a single element."""
    try:
        value = ast.literal_eval(text)
    except ValueError:
        value = text
    except SyntaxError:
        if "," in text or " " in text:
            raise ValueError(f"{text!r} is not a tuple literal; quote the elements, e.g. \"('a', 'b')\"") from None
        value = text
    if isinstance(value, tuple):
        return value
    if isinstance(value, (list, set)):
        return tuple(value)
    return (value,)


def _allows_none(holder: ml_collections.ConfigDict, leaf: str) -> bool:
    """A field that holds None, or a placeholder (a FieldReference, which may be None again)."""
    from ml_collections import config_dict

    stored = getattr(holder, "_fields", {}).get(leaf)
    return holder[leaf] is None or isinstance(stored, config_dict.FieldReference)


def parse_override_value(text: str, kind: type, current: Any, allows_none: bool | None = None) -> Any:
    """One override's text read against the field's type (the `config_flags` rules)."""
    if (current is None if allows_none is None else allows_none) and text in ("None", "none"):
        return None
    if kind is bool:
        return _parse_bool(text)
    if kind is int:
        return _parse_int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    if kind is tuple:
        return _parse_tuple(text)
    if isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict):
        value = ast.literal_eval(text)
        if not isinstance(value, dict):
            raise ValueError(f"{text!r} is not a dict literal")
        return ml_collections.ConfigDict(value)
    if kind in (list, dict):
        value = ast.literal_eval(text)
        if not isinstance(value, kind):
            raise ValueError(f"{text!r} is not a {kind.__name__} literal")
        return value
    return _parse_literal(text)  # a None field (or one of another type): any literal, else the string


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[Override]) -> ml_collections.ConfigDict:
    """Sets every override on `config` in order; ConfigError for an unknown key or a bad value."""
    check_overrides(config, [o.key for o in overrides])
    keys = [o.key for o in overrides]
    for i, first in enumerate(keys):
        for later in keys[i + 1 :]:
            if first.startswith(later + "."):
                raise ConfigError(f"--config.{later} comes after --config.{first} and would undo it; put it first")
    seen_tuples: set[str] = set()
    for override in overrides:
        holder, leaf = _field(config, override.key)
        kind, current = holder.get_type(leaf), holder[leaf]
        try:
            if override.negated or override.value is None:
                if kind is not bool and current is not None:
                    raise ValueError(f"needs a value ({kind.__name__} field)")
                if override.negated and override.value is not None:
                    raise ValueError("--no form takes no value")
                value: Any = not override.negated
            else:
                value = parse_override_value(override.value, kind, current, _allows_none(holder, leaf))
                if kind is tuple and override.key in seen_tuples:
                    value = tuple(current) + value  # --config.k a --config.k b -> ("a", "b")
            holder[leaf] = value
        except (ValueError, TypeError, SyntaxError) as error:
            raise ConfigError(f"{override}: {error}") from None
        if kind is tuple:
            seen_tuples.add(override.key)
    return config


def load_config(spec: str, overrides: Sequence[Override] = ()) -> ml_collections.ConfigDict:
    """The locked config of `--config spec` with the command-line overrides applied."""
    config = load_config_file(spec)
    config.lock()
    return apply_overrides(config, overrides)


CONFIG_HELP = (
    "recipe config file and variant: configs/<recipe>.py:<variant>[,key=value...]; "
    "override any key with --config.<dotted.key>=VALUE (read against the field's type)"
)


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, metavar="FILE.py:VARIANT", help=CONFIG_HELP)


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, flag: str = "config"
) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
    """argparse's namespace and the overridden, locked config (None without `--config`).

    The overrides are taken out of argv first (they need the config's field types), so argparse
    sees only the command's own flags; `--help` prints the usage without reading any config.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pattern = _override_pattern(flag)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.parse_args([arg for arg in argv if not pattern.match(arg)])
    spec = config_flag_value([arg for arg in argv if not pattern.match(arg)], flag)
    config = load_config_file(spec) if spec else None
    rest, overrides = split_overrides(argv, config, flag)
    args = parser.parse_args(rest)
    if config is None:
        if overrides:
            parser.error(f"{overrides[0]} needs --{flag}")
        return args, None
    config.lock()
    return args, apply_overrides(config, overrides)

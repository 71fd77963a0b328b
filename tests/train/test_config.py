"""Config checks: nearest-key errors for unknown overrides, value validation, every recipe variant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from speechlm_jax.configs import asr, mtbi, salad, vtb
from speechlm_jax.configs.base import parse_arg
from speechlm_jax.train import build, partitions
from speechlm_jax.train import config as config_lib
from speechlm_jax.train.main import check_command_line

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", [asr, mtbi, salad, vtb])
@pytest.mark.parametrize("variant", ["tiny", "paper"])
def test_every_recipe_variant_validates(module, variant):
    config = module.get_config(variant)
    config_lib.validate(config)
    assert config.recipe == module.__name__.split(".")[-1]


def test_paper_settings():
    vtb_config = vtb.get_config("paper")
    assert (vtb_config.model.lora.rank, vtb_config.optimizer.lr.lora, vtb_config.data.text_weight) == (32, 1e-4, 0.15)
    assert "gate_proj" in vtb_config.model.lora.targets and "q_proj" in vtb_config.model.lora.targets
    salad_config = salad.get_config("paper")
    assert (salad_config.loss.alpha, salad_config.optimizer.lr.projector, salad_config.optimizer.lr.lora) == (
        1.0,
        1e-3,
        5e-5,
    )
    assert salad.get_config("paper,llm=qwen2.5-7b").model.llm == "Qwen2.5-7B"
    assert salad.get_config("paper,llm=gemma-3-4b,weights_dir=/w").model.llm_weights == "/w/gemma-3-4b"


def test_paper_model_builds_abstractly_at_real_size():
    config = vtb.get_config("paper")
    model = build.abstract_model(config)
    assert model.encoder.config.d_model == 1280 and model.encoder.config.num_mel_bins == 128
    assert model.llm.config.hidden_size == 2560 and model.llm.config.model_type == "gemma3_text"
    for name in ("llama-3.2-3b", "qwen2.5-7b"):
        assert build.llm_config(vtb.get_config(f"paper,llm={name}")).num_hidden_layers == 28
    counts = partitions.count_params(
        nnx.split(model, partitions.trainable_filter(config_lib.trainable_groups(config)), ...)[1]
    )
    assert set(counts) == {"total", "encoder", "projector", "lora"}


def test_parse_arg_rejects_unknown_arguments():
    assert parse_arg("tiny,steps=3", variant="paper", steps=1).steps == 3
    with pytest.raises(ValueError, match="unknown config argument 'stpes'"):
        parse_arg("tiny,stpes=3", variant="paper", steps=1)


def test_nearest_keys_cover_the_whole_path():
    config = salad.get_config("tiny")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_overrides(config, ["optimiser.lr.projector", "train.step", "loss.alpha"])
    message = str(error.value)
    assert "'optimiser.lr.projector' does not exist; nearest valid keys: optimizer.lr.projector" in message
    assert "'train.step' does not exist; nearest valid keys: train.steps" in message
    assert "loss.alpha" not in message


def test_validate_names_the_bad_value():
    config = asr.get_config("tiny")
    config.optimizer.schedule = "warmup_cosin"
    with pytest.raises(config_lib.ConfigError, match="did you mean 'warmup_cosine'"):
        config_lib.validate(config)
    config = asr.get_config("tiny")
    config.train.trainable = "projector,encoder"
    config.optimizer.lr.encoder = 1e-4
    config_lib.validate(config)
    config.train.trainable = "projector,adapter"
    with pytest.raises(config_lib.ConfigError, match="train.trainable='adapter'"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("jsd_beta", 1.0, r"must lie in \(0, 1\)"),
        ("label_smoothing", 1.0, r"must lie in \[0, 1\)"),
        ("z_loss", -1e-3, r"must lie in \[0, inf\)"),
    ],
)
def test_validate_checks_the_loss_options(key, value, message):
    config = asr.get_config("tiny")
    config.loss[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"loss.{key}={value} {message}"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "key,value,message",
    [
        # Each of these once passed validation and then hung the data pipeline or divided by zero.
        ("train.batch_size", 0, r"train.batch_size=0 must lie in \[1, inf\)"),
        ("train.log_every", 0, r"train.log_every=0 must lie in \[1, inf\)"),
        ("checkpoint.every", -5, r"checkpoint.every=-5 must lie in \[0, inf\) \(0 = save only at the last step"),
        ("checkpoint.keep", 0, r"checkpoint.keep=0 must lie in \[1, inf\)"),
        ("train.grad_accum", 0, r"train.grad_accum=0 must lie in \[1, inf\)"),
        ("train.steps", 0, r"train.steps=0"),
        ("optimizer.b2", 1.0, r"optimizer.b2=1.0 must lie in \[0, 1\)"),
        ("optimizer.lr.projector", -1e-3, r"optimizer.lr.projector=-0.001"),
        ("model.projector.downsample", 0, r"model.projector.downsample=0"),
        ("data.max_slots", 0, r"data.max_slots=0"),
        ("data.buckets", (), r"data.buckets is empty"),
        ("data.buckets", ((48000, 0),), r"two positive ints"),
        ("data.kinds", {"asr": 0.0}, r"weighs every example kind 0"),
        ("data.span_max", 0, r"data.span_max=0"),
        ("data.max_audio_seconds", -1.0, r"data.max_audio_seconds=-1.0 must lie in \[0, inf\) \(0 = as long as"),
        ("data.max_audio_seconds", 120.0, r"data.max_audio_seconds=120 is longer than the largest bucket \(48000"),
        ("mesh.data", 0, r"mesh.data=0 must be a positive size or -1"),
        ("train.eval_batches", 0, r"train.eval_batches is 0"),
        ("loss.direction", "backward", r"loss.direction='backward' is not one of"),
        ("model.dtype", "float8", r"model.dtype='float8' is not one of"),
    ],
)
def test_validate_checks_every_range(key, value, message):
    config = asr.get_config("tiny")
    holder, leaf = key.rsplit(".", 1)
    node = config
    for part in holder.split("."):
        node = node[part]
    if leaf == "kinds" or leaf == "buckets":
        del node[leaf]
    node[leaf] = value
    if key == "train.eval_batches":
        config.train.eval_every = 10
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_zero_means_off_where_the_range_says_so():
    config = asr.get_config("tiny")
    config.checkpoint.every = 0
    config.train.eval_every = 0
    config.optimizer.clip_norm = 0.0
    config_lib.validate(config)


def test_every_ranged_key_exists_in_the_base_config():
    from speechlm_jax.configs.base import base_config

    base = base_config()
    assert all(config_lib.has_key(base, key) for key in config_lib.VALUE_RANGES)


def test_command_line_check_loads_the_config_file():
    argv = ["speechlm-train", f"--config={REPO}/configs/vtb.py:tiny", "--config.model.lora.rnak=4"]
    with pytest.raises(config_lib.ConfigError, match="model.lora.rank"):
        check_command_line(argv)
    check_command_line(["speechlm-train", "--config", f"{REPO}/configs/vtb.py:tiny", "--config.model.lora.rank=4"])


def test_cli_fails_at_start_with_nearest_keys(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "speechlm_jax.train.main",
            f"--config={REPO}/configs/asr.py:tiny",
            "--config.train.batch_sise=4",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "nearest valid keys: train.batch_size" in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_resolved_config_is_written(tmp_path):
    config = mtbi.get_config("tiny")
    path = config_lib.write_resolved(config, tmp_path)
    assert '"recipe": "mtbi"' in path.read_text()


def _parse(*overrides):
    from speechlm_jax.train.main import build_parser

    return config_lib.parse_command_line(
        build_parser(), ["--config", f"{REPO}/configs/asr.py:tiny", "--workdir", "w", *overrides]
    )


def test_overrides_are_parsed_against_the_field_types():
    args, config = _parse(
        "--config.train.steps",
        "7",
        "--config.train.progress_bar=false",
        "--noconfig.train.fast_compile",
        "--config.optimizer.lr.projector=3e-3",
        "--config.mesh.fsdp",
        "-1",
        "--config.data.tasks=first_word",
        "--config.data.tasks",
        "count_words",
        "--config.data.buckets=((16000, 64),)",
        "--config.data.tokenizer=/tok",
        "--config.data.kinds={'asr': 0.5, 'text': 0.5}",
        "--config.model.remat",
        "full",
    )
    assert args.workdir == "w" and config.is_locked
    assert config.train.steps == 7 and config.train.progress_bar is False and config.train.fast_compile is False
    assert config.optimizer.lr.projector == 3e-3 and config.mesh.fsdp == -1
    assert config.data.tasks == ("first_word", "count_words") and config.data.buckets == ((16000, 64),)
    assert config.data.tokenizer == "/tok" and dict(config.data.kinds) == {"asr": 0.5, "text": 0.5}
    assert config.model.remat == "full"
    _, config = _parse("--config.train.fast_compile")  # the bare form of a bool field is True
    assert config.train.fast_compile is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.steps=many", "'many' is not an int"),
        ("--config.train.progress_bar=maybe", "'maybe' is not a bool"),
        ("--config.train.steps", "needs a value"),
        ("--config.mesh=3", "not a dict literal"),
        ("--config.optimiser.lr.projector=1", "nearest valid keys: optimizer.lr.projector"),
    ],
)
def test_bad_override_fails_naming_it(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _parse(override)


def test_a_parent_override_after_a_child_one_is_refused():
    with pytest.raises(config_lib.ConfigError, match="would undo it"):
        _parse("--config.mesh.fsdp=2", "--config.mesh={'data': 1, 'fsdp': 1, 'tensor': 1}")
    _, config = _parse("--config.mesh={'data': 1, 'fsdp': 1, 'tensor': 1}", "--config.mesh.fsdp=2")
    assert dict(config.mesh) == {"data": 1, "fsdp": 2, "tensor": 1}


def test_none_fields_take_literals_and_none():
    from ml_collections import config_dict

    config = config_dict.ConfigDict(dict(a=None, p=config_dict.placeholder(int), s="x"))
    config.lock()
    config_lib.apply_overrides(
        config, [config_lib.Override("a", "[1, 2]"), config_lib.Override("p", "3"), config_lib.Override("s", "None")]
    )
    assert config.a == [1, 2] and config.p == 3 and config.s == "None"
    config_lib.apply_overrides(config, [config_lib.Override("p", "None")])
    assert config.p is None

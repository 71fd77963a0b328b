"""Import -> export: an HF folder through a trainer workdir and back out is bitwise the same tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from speechlm_jax.convert import export, main, workdir
from speechlm_jax.data.tokenizer import build_word_tokenizer
from speechlm_jax.models.hf_import import SafetensorsCheckpoint
from speechlm_jax.models.lora import linear_modules
from speechlm_jax.sharding import make_mesh
from speechlm_jax.train import build, checkpoint, optimizer, partitions, restore
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import data as train_data

REPO = Path(__file__).resolve().parents[2]


def tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of a folder (sharded or not), bf16 as raw bits so comparisons are bitwise."""
    ckpt = SafetensorsCheckpoint(folder)
    return {k: ckpt.get(k).view(np.uint16) if ckpt.dtype(k) == "BF16" else ckpt.get(k) for k in ckpt.keys()}


def has_lora(model: nnx.Module) -> bool:
    return any(linear.has_lora for _, linear in linear_modules(model))


def assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def hf_voxtral(folder, words: str) -> None:
    """A random VoxtralForConditionalGeneration saved by transformers itself, with a word tokenizer."""
    tokenizer = build_word_tokenizer([words], folder)
    torch.manual_seed(0)
    config = transformers.VoxtralConfig(
        audio_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_mel_bins=80,
            max_source_positions=100,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=48,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        audio_token_id=transformers.AutoTokenizer.from_pretrained(tokenizer).convert_tokens_to_ids("<audio>"),
    )
    model = transformers.VoxtralForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)


def test_transformers_voxtral_imports_and_exports_bitwise(tokenizer_words, tmp_path):
    hf_voxtral(tmp_path / "hf", tokenizer_words)
    assert main.main(["import", "--hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["trainable"] == "projector" and config["model"]["llm_weights"] == str(run / "base" / "llm")
    assert main.main(["export", "--workdir", str(run), "--out", str(tmp_path / "out")]) == 0
    assert_bitwise(tensors(tmp_path / "hf"), tensors(tmp_path / "out"))
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
        == transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").get_vocab()
    )


def test_import_of_tensors_that_do_not_fit_the_config_fails_without_output(tokenizer_words, tmp_path, capsys):
    hf_voxtral(tmp_path / "hf", tokenizer_words)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main.main(["import", "--hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")]) == 2
    assert "first mismatched tensor: language_model.model.layers.0.mlp.down_proj.weight" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_adapter_and_bf16_survive_import_and_export_bitwise(tiny_speechlm, tokenizer_dir, tmp_path):
    model = tiny_speechlm("qwen2", tied=True)
    tokenizer = tokenizer_dir(tmp_path)
    first = export.export_speechlm(
        model, tmp_path / "first", audio_token_id=4, tokenizer_dir=tokenizer, dtype="bf16", max_shard_size="64KB"
    )
    run = workdir.import_hf(first, tmp_path / "run")
    assert json.loads((run / "config.json").read_text())["train"]["trainable"] == "projector,lora"
    loaded = workdir.load_workdir(run)
    assert loaded.step == workdir.IMPORTED_STEP and loaded.audio_token_id == 4
    assert (
        main.main(
            [
                "export",
                "--workdir",
                str(run),
                "--out",
                str(tmp_path / "second"),
                "--dtype",
                "bf16",
                "--max-shard-size",
                "64KB",
            ]
        )
        == 0
    )
    assert_bitwise(tensors(first), tensors(tmp_path / "second"))
    adapter = "adapter/adapter_model.safetensors"
    assert_bitwise(tensors(first / adapter), tensors(tmp_path / "second" / adapter))
    with safe_open(str(first / adapter), framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_workdir_with_other_base_weights_is_refused(tokenizer_words, tmp_path):
    hf_voxtral(tmp_path / "hf", tokenizer_words)
    run = workdir.import_hf(tmp_path / "hf", tmp_path / "run")
    weights = run / "base" / "llm" / "model.safetensors"
    changed = {k: v.copy() for k, v in tensors(run / "base" / "llm").items()}
    changed["model.norm.weight"] += 1.0
    save_file(changed, weights, metadata={"format": "pt"})
    with pytest.raises(checkpoint.BaseMismatchError, match="differ from those the checkpoint at step 0"):
        workdir.load_workdir(run)


def test_cli_reports_errors_without_output(tiny_speechlm, tmp_path, capsys):
    assert main.main(["export", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "not a trainer workdir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    export.export_llm(tiny_speechlm(lora=False).llm, tmp_path / "llm")
    assert main.main(["import", "--hf", str(tmp_path / "llm"), "--workdir", str(tmp_path / "run")]) == 2
    assert (
        "not VoxtralForConditionalGeneration; an LLM folder (*ForCausalLM) needs no import" in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real trainer workdir: the ASR recipe's tiny variant trained for 2 steps on a small TTS corpus."""
    from speechlm_jax.configs import asr
    from speechlm_jax.toyworld.corpus import build_tiny_corpus
    from speechlm_jax.train import trainer

    corpus = build_tiny_corpus(tmp_path_factory.mktemp("corpus"), train_sentences=4, heldout_sentences=2)
    config = asr.get_config(f"tiny,data_dir={corpus}")
    # Voxtral stacks frames by its audio intermediate_size / d_model: the tiny encoder must agree.
    assert config.model.encoder.encoder_ffn_dim == 4 * config.model.encoder.d_model
    config.train.update(steps=2, progress_bar=False, eval_every=0, fast_compile=True)
    run = tmp_path_factory.mktemp("run")
    trainer.train(config, run, devices=jax.devices()[:1])
    return run, corpus


def test_trained_workdir_exports_to_voxtral_with_our_logits(trained_run, tmp_path):
    run, corpus = trained_run
    loaded = workdir.load_workdir(run)
    assert loaded.step == 2 and has_lora(loaded.model)
    assert main.main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf"), "--merge-lora"]) == 0
    hf = transformers.VoxtralForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()

    # One full 30 s window (the only input length VoxtralEncoder takes): 375 audio tokens.
    samples, audio_tokens = 480_000, 375
    clip = (0.2 * np.sin(np.arange(samples) * 0.05) * 32767).astype(np.int16)
    ids = np.array([[1] + [loaded.audio_token_id] * audio_tokens + [5, 6, 7]], np.int32)
    t = ids.shape[1]
    batch = dict(
        audio=jnp.asarray(clip[None, None]),
        audio_lens=jnp.asarray([[samples]], jnp.int32),
        tokens=jnp.asarray(ids),
        positions=jnp.arange(t, dtype=jnp.int32)[None],
        input_mask=jnp.ones((1, t), jnp.int32),
        audio_index=jnp.asarray([[-1] + list(range(audio_tokens)) + [-1] * 3], jnp.int32),
    )
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    features = extractor(clip.astype(np.float32) / 32768.0, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), input_features=features).logits.numpy()
    np.testing.assert_allclose(np.asarray(loaded.model(batch)), reference, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def conv_projector_run(tokenizer_dir, tmp_path_factory):
    """A workdir of the ASR recipe's tiny variant with a BLSP-style Conv1d projector (random base)."""
    from speechlm_jax.configs import asr

    tmp_path = tmp_path_factory.mktemp("conv")
    config = asr.get_config(f"tiny,data_dir={tmp_path}")
    config.model.projector.kind = "conv"
    config.data.tokenizer = str(tokenizer_dir(tmp_path))
    config.train.fast_compile = True
    run = tmp_path / "run"
    config_lib.write_resolved(config, run)
    workdir.write_checkpoint(config, run, step=3)
    return run


def test_workdir_no_class_represents_is_refused_and_nothing_written(conv_projector_run, tmp_path, capsys):
    run = conv_projector_run
    assert main.main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "strided Conv1d" in capsys.readouterr().err
    assert not any(p.name.startswith((".hf", "hf")) for p in tmp_path.iterdir())
    # The LLM alone still has its class (step 3, the only checkpoint).
    assert (
        main.main(
            [
                "export",
                "--workdir",
                str(run),
                "--step",
                "3",
                "--out",
                str(tmp_path / "llm"),
                "--llm-only",
                "--merge-lora",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "llm" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_checkpoint_that_does_not_fit_its_config_is_refused(conv_projector_run, tmp_path, capsys):
    run = shutil.copytree(conv_projector_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["projector"]["hidden"] = 16
    (run / "config.json").write_text(json.dumps(config))
    assert main.main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf"), "--llm-only"]) == 2
    assert "does not fit the workdir's config.json: first mismatched tensor projector/conv/" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_import_with_a_recipe_restores_the_way_the_trainer_resumes(trained_run, tmp_path):
    run, corpus = trained_run
    assert main.main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf")]) == 0
    recipe = f"{REPO}/configs/asr.py:tiny,data_dir={corpus}"
    assert (
        main.main(["import", "--hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "imported"), "--config", recipe])
        == 0
    )

    # What `trainer.train` does to resume: rebuild the model from the config, split it, make the
    # optimiser state and the data iterator, restore the step onto them, check the base.
    config = restore.read_config(tmp_path / "imported")
    assert config.recipe == "asr" and config.train.trainable == "projector,lora"
    model = build.build_model(config, make_mesh({"data": 1}, jax.devices()[:1]), config_lib.sharding_rules(config))
    _, trainable, frozen = partitions.split_model(model, config_lib.trainable_groups(config))
    tx, _ = optimizer.make_optimizer(config)
    iterator, _ = train_data.Data(config).train_iterator()
    ckpt = checkpoint.Checkpointer(tmp_path / "imported", every=config.checkpoint.every, keep=config.checkpoint.keep)
    restored, _, meta = ckpt.restore(0, trainable, tx.init(trainable), iterator)
    ckpt.close()
    checkpoint.check_base(
        meta, checkpoint.base_hash(build.cast_floating(frozen, config.model.frozen_dtype)), meta["base_path"]
    )

    trained = workdir.load_workdir(run).model
    expected = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
    for path, variable in nnx.to_flat_state(restored):
        np.testing.assert_array_equal(
            np.asarray(variable.get_value()), np.asarray(expected[path].get_value()), err_msg=str(path)
        )
    assert next(iterator)["tokens"].shape[0] == config.train.batch_size


def test_trainer_resumes_an_imported_workdir_from_step_0(trained_run, tmp_path):
    """`speechlm-train` on an imported workdir starts from the imported weights, not a fresh init."""
    from speechlm_jax.train import trainer

    run, corpus = trained_run
    assert main.main(["export", "--workdir", str(run), "--out", str(tmp_path / "hf")]) == 0
    recipe = f"{REPO}/configs/asr.py:tiny,data_dir={corpus}"
    assert (
        main.main(["import", "--hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "imported"), "--config", recipe])
        == 0
    )

    config = restore.read_config(tmp_path / "imported")
    # A zero learning rate: one step leaves the trainable state exactly as it was restored.
    config.optimizer.lr.update(projector=0.0, lora=0.0)
    config.train.update(steps=1, progress_bar=False, eval_every=0)
    result = trainer.train(config, tmp_path / "imported", devices=jax.devices()[:1])

    expected = dict(nnx.to_flat_state(nnx.state(workdir.load_workdir(run).model, nnx.Param)))
    for path, variable in nnx.to_flat_state(result.trainable):
        np.testing.assert_array_equal(
            np.asarray(variable.get_value()), np.asarray(expected[path].get_value()), err_msg=str(path)
        )


def test_the_installed_convert_command_imports_a_voxtral_folder(tiny_speechlm, tokenizer_dir, tmp_path):
    import os
    import subprocess
    import sys

    folder = export.export_speechlm(
        tiny_speechlm("qwen2", tied=True), tmp_path / "hf", audio_token_id=4, tokenizer_dir=tokenizer_dir(tmp_path)
    )
    script = Path(sys.executable).parent / "speechlm-convert"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "speechlm_jax.convert.main"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [*command, "import", "--hf", str(folder), "--workdir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "run")
    assert (tmp_path / "run" / "config.json").is_file()

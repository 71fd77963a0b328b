"""Export to transformers classes: Voxtral logits and generation, *ForCausalLM, shards, bf16, refusals."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from speechlm_jax.convert import export, voxtral
from speechlm_jax.data.tokenizer import load_tokenizer
from speechlm_jax.generate import generate
from speechlm_jax.models.frontend import HOP_LENGTH, audio_token_count
from speechlm_jax.models.hf_import import SafetensorsCheckpoint, per_layer, stacked_layers
from speechlm_jax.models.lora import LoRAConfig
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import build_speechlm


def stored_keys(folder) -> dict[str, str]:
    """{key: safetensors dtype} over every file of a folder."""
    ckpt = SafetensorsCheckpoint(folder)
    return {key: ckpt.dtype(key) for key in ckpt.keys()}


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_voxtral_export_gives_our_logits_and_tokens(
    family, tied, tiny_speechlm, tokenizer_dir, clip, prompt_batch, hf_inputs, load_voxtral, tmp_path
):
    model = tiny_speechlm(family, tied=tied)
    tokenizer = tokenizer_dir(tmp_path)
    audio_token_id = load_tokenizer(str(tokenizer)).audio_token_id
    out = export.export_speechlm(
        model, tmp_path / "hf", audio_token_id=audio_token_id, tokenizer_dir=tokenizer, merge_lora=True
    )

    config = json.loads((out / "config.json").read_text())
    assert (
        config["architectures"] == ["VoxtralForConditionalGeneration"] and config["text_config"]["model_type"] == family
    )
    assert config["audio_token_id"] == audio_token_id
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<audio>") == audio_token_id
    hf = load_voxtral(out)

    batch = prompt_batch(tokenizer, clip)
    inputs = hf_inputs(out, batch, clip)
    with torch.no_grad():
        reference = hf(**inputs).logits.numpy()
    ours = np.asarray(model(batch))
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)

    with torch.no_grad():
        hf_tokens = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :].numpy()
    ours_tokens = generate(
        model.llm,
        None,
        batch["input_mask"],
        inputs_embeds=model.embed_inputs(batch),
        max_new_tokens=8,
        eos_id=2,
        pad_id=0,
    )
    length = int(ours_tokens.lengths[0])
    np.testing.assert_array_equal(np.asarray(ours_tokens.tokens[0, :length]), hf_tokens[:length])
    assert len(hf_tokens) == length


def voxtral_features(folder, clip: np.ndarray, window_samples: int) -> torch.Tensor:
    """Features as VoxtralProcessor makes them for audio of any length: one extraction over the
    clip padded to a multiple of the window, cut into windows stacked along the batch."""
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
    features = extractor(
        clip.astype(np.float32) / 32768.0,
        sampling_rate=16000,
        padding=True,
        truncation=False,
        pad_to_multiple_of=window_samples,
        return_tensors="pt",
    ).input_features
    return features.reshape(extractor.feature_size, -1, window_samples // 160).transpose(0, 1)


def long_batch(clip: np.ndarray, audio_tokens: int, audio_token_id: int) -> dict[str, jnp.ndarray]:
    """`<bos> a b <audio x audio_tokens> c d e`: one slot holding the whole clip."""
    ids = [1, 5, 6] + [audio_token_id] * audio_tokens + [7, 8, 9]
    t = len(ids)
    return dict(
        audio=jnp.asarray(clip[None, None]),
        audio_lens=jnp.asarray([[len(clip)]], jnp.int32),
        tokens=jnp.asarray([ids], jnp.int32),
        positions=jnp.arange(t, dtype=jnp.int32)[None],
        input_mask=jnp.ones((1, t), jnp.int32),
        audio_index=jnp.asarray([[-1] * 3 + list(range(audio_tokens)) + [-1] * 3], jnp.int32),
    )


def test_voxtral_export_matches_on_70_s_of_audio(tiny_speechlm, tokenizer_dir, load_voxtral, tmp_path):
    """70 s is 35 of the tiny encoder's 2 s windows: both sides encode each window on its own and
    concatenate them into one span of 875 audio tokens; the logits agree."""
    model = tiny_speechlm(lora=False)
    tokenizer = tokenizer_dir(tmp_path)
    audio_token_id = load_tokenizer(str(tokenizer)).audio_token_id
    out = export.export_speechlm(model, tmp_path / "hf", audio_token_id=audio_token_id, tokenizer_dir=tokenizer)
    hf = load_voxtral(out)
    window = model.encoder.config.max_frames * HOP_LENGTH  # samples per window
    samples = 70 * 16000
    t = np.arange(samples) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 5 * t) * t) * (1 + np.sin(t)) / 2
    clip = ((wave + 0.02 * np.random.default_rng(0).normal(size=samples)) * 32767).astype(np.int16)
    features = voxtral_features(out, clip, window)
    assert features.shape == (35, 80, 200)
    tokens = audio_token_count(samples, 4)
    assert tokens == 35 * 25
    batch = long_batch(clip, tokens, audio_token_id)
    input_ids = torch.tensor(np.asarray(batch["tokens"]))
    with torch.no_grad():
        reference = hf(input_ids=input_ids, input_features=features).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(batch)), reference, atol=1e-4, rtol=0)
    # Greedy decoding after the 70 s span: our KV-cache decoder and transformers' generate agree.
    with torch.no_grad():
        hf_tokens = hf.generate(
            input_ids=input_ids,
            input_features=features,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=6,
            do_sample=False,
        )[0, input_ids.shape[1] :].numpy()
    ours = generate(
        model.llm,
        None,
        batch["input_mask"],
        inputs_embeds=model.embed_inputs(batch),
        max_new_tokens=6,
        eos_id=2,
        pad_id=0,
    )
    length = int(ours.lengths[0])
    assert length == len(hf_tokens)
    np.testing.assert_array_equal(np.asarray(ours.tokens[0, :length]), hf_tokens)

    # A clip that ends inside its last window: Voxtral feeds that window whole (its padding
    # included: the class has no audio mask), ours only the frames of the clip; the full
    # windows before it are the same frames in both.
    part = clip[: 69 * 16000 + 8000]
    ours, mask = model.encode_audio(jnp.asarray(part[None]), jnp.asarray([len(part)], jnp.int32))
    with torch.no_grad():
        theirs = hf.model.get_audio_features(voxtral_features(out, part, window)).pooler_output.numpy()
    assert theirs.shape[0] == 35 * 25 and int(mask.sum()) == audio_token_count(len(part), 4) == 34 * 25 + 18
    np.testing.assert_allclose(np.asarray(ours[0, : 34 * 25]), theirs[: 34 * 25], atol=1e-4, rtol=0)


def test_keys_are_the_layout_transformers_writes_and_shards_load(tiny_speechlm, load_voxtral, tmp_path):
    model = tiny_speechlm(lora=False)
    out = export.export_speechlm(model, tmp_path / "hf", audio_token_id=4, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(p.stat().st_size < 40_000 + 2_000 for p in out.glob("model-*.safetensors"))

    hf = load_voxtral(out)
    hf.save_pretrained(tmp_path / "resaved")
    assert stored_keys(out).keys() == stored_keys(tmp_path / "resaved").keys()
    assert set(index["weight_map"]) == set(stored_keys(out))


def test_bf16_export_loads_and_runs(
    tiny_speechlm, tokenizer_dir, clip, prompt_batch, hf_inputs, load_voxtral, tmp_path
):
    model = tiny_speechlm()
    tokenizer = tokenizer_dir(tmp_path)
    out = export.export_speechlm(
        model, tmp_path / "hf", audio_token_id=4, tokenizer_dir=tokenizer, merge_lora=True, dtype="bf16"
    )
    dtypes = stored_keys(out)
    assert dtypes.pop("audio_tower.embed_positions.weight") == "F32"
    assert set(dtypes.values()) == {"BF16"}
    hf = load_voxtral(out)
    assert hf.lm_head.weight.dtype == torch.bfloat16
    batch = prompt_batch(tokenizer, clip)
    with torch.no_grad():
        logits = hf(**hf_inputs(out, batch, clip)).logits.float().numpy()
    ours = np.asarray(model(batch))
    assert np.isfinite(logits).all()
    # bf16 weights and activations: close to fp32, not equal.
    assert np.abs(logits - ours).max() < 0.05 * np.abs(ours).max()


def test_llm_alone_as_causal_lm(tiny_speechlm, tokenizer_dir, tmp_path):
    model = tiny_speechlm("qwen2")
    out = export.export_llm(model.llm, tmp_path / "llm", tokenizer_dir=tokenizer_dir(tmp_path), merge_lora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    tokens = np.array([[1, 5, 9, 11, 7, 30, 12]], np.int32)
    with torch.no_grad():
        reference = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.llm(tokens)), reference, atol=1e-4, rtol=0)
    assert not (out / export.ADAPTER_DIR).exists()


def _no_partial_output(tmp_path) -> bool:
    return not any(p.name.startswith(".hf.partial-") or p.name == "hf" for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "projector,message",
    [
        (ProjectorConfig(kind="conv", downsample=4), "strided Conv1d"),
        (ProjectorConfig(kind="frame_stack", downsample=4, use_bias=True), "have biases"),
        (ProjectorConfig(kind="frame_stack", downsample=2), "stacks 2 frames"),
        (ProjectorConfig(kind="frame_stack", downsample=4, hidden=16), "hidden width is 16"),
    ],
)
def test_unrepresentable_models_are_refused_and_nothing_is_written(projector, message, tiny_speechlm, tmp_path):
    model = tiny_speechlm(projector=projector, lora=False)
    with pytest.raises(voxtral.NotRepresentableError, match=message):
        export.export_speechlm(model, tmp_path / "hf", audio_token_id=4)
    assert _no_partial_output(tmp_path)


def test_tensors_that_do_not_fit_the_config_fail_before_writing(tiny_speechlm, tmp_path):
    model = tiny_speechlm(lora=False)
    up = model.llm.layers[1].mlp.up_proj.kernel
    up.set_value(up.get_value()[:, :-1])
    with pytest.raises(
        ValueError, match=r"first mismatched tensor: language_model\.model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        export.export_speechlm(model, tmp_path / "hf", audio_token_id=4)
    assert _no_partial_output(tmp_path)


def test_failure_while_writing_leaves_nothing(tiny_speechlm, tmp_path, monkeypatch):
    model = tiny_speechlm(lora=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_speechlm(model, tmp_path / "hf", audio_token_id=4)
    assert _no_partial_output(tmp_path)
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        export.export_speechlm(model, tmp_path / "hf", audio_token_id=4)


def test_audio_token_outside_the_vocabulary_is_refused(tiny_speechlm, tmp_path):
    with pytest.raises(ValueError, match="audio_token_id 48 is outside the LLM's vocabulary of 48"):
        export.export_speechlm(tiny_speechlm(lora=False), tmp_path / "hf", audio_token_id=48)
    assert _no_partial_output(tmp_path)


def test_sizes_and_dtypes_are_checked():
    assert (
        export.parse_size("5GB") == 5 * 10**9
        and export.parse_size("2MiB") == 2 * 2**20
        and export.parse_size(100) == 100
    )
    with pytest.raises(ValueError, match="cannot read the size"):
        export.parse_size("lots")
    assert export.DTYPES["bf16"] == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("merge_lora", [False, True])
def test_scanned_model_exports_what_the_unrolled_one_does(merge_lora, tiny_speechlm, tmp_path):
    """A SpeechLM with scanned (stacked) LLM and encoder layers, holding the unrolled model's
    values, writes the same tensors (model and PEFT adapter) and config."""
    unrolled = tiny_speechlm()
    scanned = build_speechlm(
        dataclasses.replace(unrolled.encoder.config, scan_layers=True),
        ProjectorConfig(kind="frame_stack", downsample=4),
        dataclasses.replace(unrolled.llm.config, scan_layers=True),
        LoRAConfig(rank=4, alpha=8.0),
        rngs=nnx.Rngs(0),
    )
    values = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(unrolled))}
    stacked = []
    for path, variable in nnx.to_flat_state(nnx.state(scanned)):
        parts = per_layer("/".join(map(str, path)), variable)
        value = np.stack([values[p] for p, _ in parts]) if stacked_layers(variable) else values[parts[0][0]]
        stacked.append((path, variable.replace(jnp.asarray(value))))
    nnx.update(scanned, nnx.from_flat_state(stacked))
    assert scanned.llm.layers.attn.q_proj.lora_a.shape == (2, 32, 4)

    outs = {}
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        outs[name] = export.export_speechlm(model, tmp_path / name, audio_token_id=4, merge_lora=merge_lora)
    pairs = [(outs["unrolled"], outs["scanned"])]
    if not merge_lora:
        pairs.append(tuple(out / export.ADAPTER_DIR / "adapter_model.safetensors" for out in pairs[0]))
    for a, b in pairs:
        ckpt_a, ckpt_b = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
        assert ckpt_a.keys() and sorted(ckpt_a.keys()) == sorted(ckpt_b.keys())
        for key in ckpt_a.keys():
            np.testing.assert_array_equal(ckpt_a.get(key), ckpt_b.get(key))
    assert json.loads((outs["scanned"] / "config.json").read_text()) == json.loads(
        (outs["unrolled"] / "config.json").read_text()
    )
    assert (outs["scanned"] / export.ADAPTER_DIR).exists() != merge_lora

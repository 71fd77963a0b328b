"""FLOP count against XLA's own count of the compiled programs, MFU arithmetic, progress and TensorBoard."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from speechlm_jax.models.frontend import audio_token_count
from speechlm_jax.models.llm import DecoderLLM, LLMConfig
from speechlm_jax.models.whisper import WhisperConfig, WhisperEncoder
from speechlm_jax.train import metrics


def _xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def test_llm_forward_flops_match_xla():
    config = LLMConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    model = DecoderLLM(config, rngs=nnx.Rngs(0))
    batch, tokens = 2, 256
    ids = jnp.zeros((batch, tokens), jnp.int32)
    graphdef, state = nnx.split(model)
    xla = _xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, ids)
    parts = metrics._llm_forward(config, tokens, 0, ())
    # XLA computes the full T x T score matrix; MFU counts the causal half (see the module docstring).
    analytic = batch * (parts["kernels"] + 2 * parts["attention"] + parts["unembed"])
    assert analytic == pytest.approx(xla, rel=0.05)
    assert analytic < xla


def test_encoder_forward_flops_match_xla():
    config = WhisperConfig(
        num_mel_bins=80,
        d_model=256,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=1024,
        max_source_positions=1500,
    )
    encoder = WhisperEncoder(config, rngs=nnx.Rngs(0))
    mel_frames = 1000
    mels = jnp.zeros((2, 80, mel_frames))
    graphdef, state = nnx.split(encoder)
    xla = _xla_flops(lambda s, x: nnx.merge(graphdef, s)(x)[0], state, mels)
    parts = metrics._encoder_forward(config, mel_frames)
    # XLA also counts the elementwise work (exact GELU, softmax, norms), which MFU leaves out.
    assert 2 * (parts["kernels"] + parts["attention"]) == pytest.approx(xla, rel=0.08)
    assert 2 * (parts["kernels"] + parts["attention"]) < xla


def test_encoder_flops_of_audio_over_one_window_match_xla():
    """2.5 windows of a 200-frame window: three windows run, each attending within itself."""
    from speechlm_jax.models.speechlm import encode_windows

    config = WhisperConfig(
        num_mel_bins=80,
        d_model=256,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=1024,
        max_source_positions=100,
    )
    encoder = WhisperEncoder(config, rngs=nnx.Rngs(0))
    mel_frames = 500
    mels = jnp.zeros((1, 80, mel_frames))
    graphdef, state = nnx.split(encoder)
    xla = _xla_flops(lambda s, x: encode_windows(nnx.merge(graphdef, s), x, jnp.full((1,), mel_frames))[0], state, mels)
    parts = metrics._encoder_forward(config, mel_frames)
    assert parts == {k: 3 * v for k, v in metrics._encoder_forward(config, 200).items()}
    assert parts["kernels"] + parts["attention"] == pytest.approx(xla, rel=0.08)
    assert parts["kernels"] + parts["attention"] < xla


def test_backward_counts_frozen_activations_only_where_a_gradient_flows():
    llm = LLMConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
    )
    encoder = WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128
    )
    shape = metrics.StepShape(batch=4, audio_slots=1, audio_samples=16000, tokens=64, teacher_tokens=0)
    common = dict(llm_config=llm, encoder_config=encoder, projector_flops_per_frame=1e4, downsample=4)
    projector_only = metrics.step_flops(shape, trainable=("projector",), **common)
    assert projector_only["encoder_backward"] == 0
    # A frozen LLM still back-propagates through its activations to reach the projector.
    assert projector_only["llm_backward"] == pytest.approx(
        projector_only["llm_forward"] + shape.batch * 2 * 64 * 64 / 2 * 4 * 16 * 2 * 2
    )
    full_llm = metrics.step_flops(shape, trainable=("projector", "llm"), **common)
    assert full_llm["llm_backward"] > projector_only["llm_backward"]
    with_encoder = metrics.step_flops(shape, trainable=("projector", "encoder"), **common)
    assert with_encoder["encoder_backward"] > with_encoder["encoder_forward"]
    teacher = metrics.step_flops(metrics.StepShape(4, 1, 16000, 64, 48), trainable=("projector",), **common)
    assert teacher["teacher_forward"] > 0 and teacher["total"] > projector_only["total"]


def test_mfu_arithmetic():
    cpu = jax.devices()[0]
    assert metrics.mfu(metrics.peak_flops(cpu), 1.0, [cpu]) == pytest.approx(1.0)
    assert metrics.mfu(1e12, 0.5, [cpu, cpu]) == pytest.approx(1e12 / 0.5 / (2 * metrics.peak_flops(cpu)))


def test_progress_bar_shows_the_data_skipped_by_cause(capsys):
    record = {
        "loss": 1.5,
        "data/examples": 40.0,
        "data/skipped": 6.0,
        "data/skipped/missing_file": 3.0,
        "data/skipped/too_short": 2.0,
        "data/skipped/truncated": 0.0,
        "data/source_skipped/no_transcript": 1.0,
    }
    assert metrics.skip_summary(record) == "6 (3 missing_file, 2 too_short, 1 no_transcript)"
    assert metrics.skip_summary({"loss": 1.0, "data/skipped": 0.0}) == ""
    bar = metrics.ProgressBar(10, 0)
    bar.update(2, record)
    assert bar.bar.postfix.endswith("skipped=6 (3 missing_file, 2 too_short, 1 no_transcript)")
    bar.update(1, {"loss": 1.2})  # a record without data counters keeps the last summary
    assert "skipped=6 (3 missing_file" in bar.bar.postfix
    bar.close()
    assert "data skipped: 6 (3 missing_file, 2 too_short, 1 no_transcript)" in capsys.readouterr().err
    quiet = metrics.ProgressBar(10, 0, enabled=False)
    quiet.update(2, record)
    quiet.close()
    assert "data skipped" not in capsys.readouterr().err


def test_length_adapter_readout_flops_match_xla():
    """The adapter's greedy CTC readout: every projector frame through the LLM's final norm and head."""
    config = LLMConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    from speechlm_jax.losses.ctc import chunked_ctc_greedy

    llm = DecoderLLM(config, rngs=nnx.Rngs(0))
    clips, samples, downsample = 3, 16000 * 4, 4
    frames = audio_token_count(samples, downsample)
    embeds = jnp.zeros((clips, frames, config.hidden_size))
    graphdef, state = nnx.split(llm)

    def readout(s, x):
        model = nnx.merge(graphdef, s)
        return chunked_ctc_greedy(model.norm(x), model.unembedding(), chunk_size=64, softcap=None)

    xla = _xla_flops(readout, state, embeds)
    shape = metrics.StepShape(batch=clips, audio_slots=1, audio_samples=samples, tokens=8, teacher_tokens=0)
    kwargs = dict(
        llm_config=config,
        encoder_config=WhisperConfig(num_mel_bins=80, d_model=64, encoder_layers=1, encoder_attention_heads=2),
        projector_flops_per_frame=0.0,
        downsample=downsample,
        trainable=("projector",),
    )
    with_adapter = metrics.step_flops(shape, length_adapter=True, **kwargs)
    without = metrics.step_flops(shape, **kwargs)
    assert with_adapter["length_adapter"] == pytest.approx(xla, rel=0.05)
    assert without["length_adapter"] == 0.0
    assert with_adapter["total"] - without["total"] == with_adapter["length_adapter"]
    assert with_adapter["llm_forward"] == without["llm_forward"]  # static shapes: the LLM's work is unchanged

    # The "embeddings" output: the readout, then each position's posterior and the weighted embeddings.
    from types import SimpleNamespace

    from speechlm_jax.models.speechlm import LengthAdapter, SpeechLM

    def embeddings(s, x, pooled):  # the pooled frames are other values than the frames (no common subexpression)
        model = nnx.merge(graphdef, s)
        best = chunked_ctc_greedy(model.norm(x), model.unembedding(), chunk_size=64, softcap=None)
        adapter = SimpleNamespace(length_adapter=LengthAdapter(0, 64, "embeddings"), llm=model)
        return best, SpeechLM.posterior_embeddings(adapter, pooled)

    frozen = metrics.step_flops(shape, length_adapter="embeddings", **{**kwargs, "trainable": ("lora",)})
    assert frozen["length_adapter"] == pytest.approx(_xla_flops(embeddings, state, embeds, embeds + 1), rel=0.05)
    trained = metrics.step_flops(shape, length_adapter="embeddings", **kwargs)
    assert trained["length_adapter"] == 5 * with_adapter["length_adapter"]  # + the backward of both products


def test_model_flops_count_every_layer_of_scanned_adapters():
    """A scanned model's stacked adapters count once per layer: its model FLOPs are the unrolled model's."""
    from speechlm_jax.models.lora import LoRAConfig
    from speechlm_jax.models.projector import ProjectorConfig
    from speechlm_jax.models.speechlm import build_speechlm

    def flops(scan: bool) -> float:
        llm = LLMConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            scan_layers=scan,
        )
        encoder = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
        model = nnx.eval_shape(
            lambda: build_speechlm(
                dataclasses.replace(encoder, scan_layers=scan),
                ProjectorConfig(kind="frame_stack", downsample=4),
                llm,
                LoRAConfig(rank=4),
                rngs=nnx.Rngs(0),
            )
        )
        shape = metrics.StepShape(batch=2, audio_slots=1, audio_samples=16000, tokens=32, teacher_tokens=0)
        return metrics.ModelFlops(model, ("projector", "lora"), uses_teacher=False, downsample=4).breakdown(shape)

    unrolled, scanned = flops(False), flops(True)
    assert unrolled == scanned and unrolled["total"] > 0

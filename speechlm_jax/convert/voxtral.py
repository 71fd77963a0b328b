"""Our SpeechLM as transformers' `VoxtralForConditionalGeneration`: which models fit, config, key table.

Export (`convert.export`) and import (`convert.workdir`) both go through this module, so
the two directions share one description of the class:

- **What fits.** Voxtral is a Whisper encoder (`VoxtralEncoder`, no final pooling), a
  `multi_modal_projector` that reshapes the encoder output [B, 1500, d] to
  [B * 1500 / k, k * d] with k * d = `audio_config.intermediate_size` (the encoder's MLP
  width, 4 * d in every Whisper) and applies linear_1 (no bias) -> act -> linear_2 (no bias),
  and any `AutoModel` text model plus its own `lm_head`. That is exactly our
  `FrameStackProjector(stack=k, use_bias=False, hidden=d_llm)` on a `WhisperEncoder` with
  `encoder_ffn_dim = k * d_model`, for a Llama, Qwen2/2.5 or Qwen3 decoder (and Gemma 3
  text without final logit soft-capping, which Voxtral's plain `lm_head` does not apply).
  `Qwen2AudioForConditionalGeneration` is not an exact match for any of our models: its
  encoder average-pools by 2 *before* its final LayerNorm and projects with one biased
  Linear, so a Qwen2 decoder is exported as Voxtral with a `qwen2` text config, the class
  whose architecture matches. A Conv1d projector, projector biases (SLAM-LLM), another
  stacking factor or hidden width has no class and is refused (`NotRepresentableError`).
- **Window.** `VoxtralEncoder` takes exactly `2 * max_source_positions` mel frames (30 s
  for real Whisper sizes) and attends to all of them (no mask), giving
  `max_source_positions / k` audio tokens per window; our encoder gives the same values on
  a full window. Longer audio is the same in both: `VoxtralProcessor` extracts the features
  of the whole clip (padded to a multiple of the window), cuts them into windows stacked
  along the batch, and the projector reads the windows' encoder frames concatenated, which
  is what `models.speechlm.encode_windows` does. The one difference is a clip that ends
  inside its last window: Voxtral has no audio mask and feeds that window whole (its
  padding too, as for any clip under one window), ours only the clip's own frames.
- **Keys.** The legacy on-disk layout `save_pretrained` writes (transformers 5 renames it
  on load): `audio_tower.*` (the Whisper encoder table with `encoder.` -> `audio_tower.`),
  `multi_modal_projector.linear_{1,2}.weight`, `language_model.model.*` and
  `language_model.lm_head.weight` (the LLM table under `language_model.`). Voxtral's
  `lm_head` is never tied, so a tied LLM writes a copy of its embedding there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import transformers

from speechlm_jax.models.hf_import import LLM_TABLES, WHISPER_TABLE, Rule, transpose
from speechlm_jax.models.llm import LLMConfig
from speechlm_jax.models.projector import ConvProjector, FrameStackProjector, ProjectorConfig
from speechlm_jax.models.speechlm import SpeechLM
from speechlm_jax.models.whisper import ACTIVATIONS, WhisperConfig

ARCHITECTURE = "VoxtralForConditionalGeneration"
LM_HEAD_KEY = "language_model.lm_head.weight"
EMBED_KEY = "language_model.model.embed_tokens.weight"
# In memory (transformers 5) the text model lives at `model.language_model`; PEFT adapters
# name modules by these in-memory paths.
IN_MEMORY_LLM_PREFIX = "model.language_model."


class NotRepresentableError(ValueError):
    """No transformers class represents the model exactly; the message names what does not fit."""


def activation_name(projector: FrameStackProjector) -> str:
    """The name (in `whisper.ACTIVATIONS`, the same names as transformers' ACT2FN) of the projector's activation."""
    return next(name for name, fn in ACTIVATIONS.items() if fn is projector.activation)


def check_representable(model: SpeechLM) -> None:
    """Raises NotRepresentableError listing every part that VoxtralForConditionalGeneration cannot hold."""
    encoder, llm, projector = model.encoder.config, model.llm.config, model.projector
    problems = []
    if isinstance(projector, ConvProjector):
        problems.append(
            f"the projector is a strided Conv1d (stride {projector.stride}, width {projector.width}); Voxtral's "
            "projector stacks frames into a two-layer MLP and Qwen2-Audio's average-pools before the encoder's "
            "LayerNorm into one Linear"
        )
    else:
        k = projector.stack
        if projector.linear_1.bias is not None:
            problems.append(
                "the projector Linears have biases (SLAM-LLM adapter); Voxtral's linear_1/linear_2 have none"
            )
        if k * encoder.d_model != encoder.encoder_ffn_dim:
            problems.append(
                f"the projector stacks {k} frames of d_model {encoder.d_model}, but Voxtral stacks "
                "audio_config.intermediate_size / hidden_size = encoder_ffn_dim / d_model = "
                f"{encoder.encoder_ffn_dim} / {encoder.d_model} frames"
            )
        if projector.linear_1.out_features != llm.hidden_size:
            problems.append(
                f"the projector's hidden width is {projector.linear_1.out_features}; "
                f"Voxtral's is the LLM width {llm.hidden_size}"
            )
        if encoder.max_source_positions % k:
            problems.append(
                f"the {encoder.max_source_positions} encoder frames of a window do not split into groups of {k}"
            )
    if llm.final_logit_softcapping is not None:
        problems.append(
            f"the LLM soft-caps its final logits ({llm.final_logit_softcapping}); Voxtral's lm_head does not"
        )
    if model.length_adapter is not None:
        problems.append(
            "the CTC length adapter pools the projector's frames by the LLM head's greedy labels; "
            "Voxtral (like every transformers audio-LLM class) feeds each projector frame to the LLM"
        )
    if problems:
        raise NotRepresentableError(
            "no transformers class represents this SpeechLM exactly (VoxtralForConditionalGeneration is the one for a "
            "Whisper encoder + frame-stacking projector + decoder LLM): " + "; ".join(problems)
        )


def hf_config(model: SpeechLM, audio_token_id: int) -> transformers.VoxtralConfig:
    """The VoxtralConfig of a representable SpeechLM (call `check_representable` first)."""
    encoder = model.encoder.config
    audio = dict(
        model_type="voxtral_encoder",
        hidden_size=encoder.d_model,
        intermediate_size=encoder.encoder_ffn_dim,
        num_hidden_layers=encoder.encoder_layers,
        num_attention_heads=encoder.encoder_attention_heads,
        num_mel_bins=encoder.num_mel_bins,
        max_source_positions=encoder.max_source_positions,
        activation_function=encoder.activation_function,
    )
    text = model.llm.config.to_hf()
    text.pop("architectures")
    return transformers.VoxtralConfig(
        audio_config=audio,
        text_config=text,
        audio_token_id=int(audio_token_id),
        projector_hidden_act=activation_name(model.projector),
        architectures=[ARCHITECTURE],
    )


def configs_from_hf(config: Mapping[str, Any]) -> tuple[WhisperConfig, ProjectorConfig, LLMConfig]:
    """(encoder, projector, LLM) configs of a Voxtral config.json dict."""
    if config.get("model_type") != "voxtral":
        raise ValueError(f"model_type {config.get('model_type')!r} is not 'voxtral'")
    audio = config["audio_config"]
    encoder = WhisperConfig(
        num_mel_bins=audio["num_mel_bins"],
        d_model=audio["hidden_size"],
        encoder_layers=audio["num_hidden_layers"],
        encoder_attention_heads=audio["num_attention_heads"],
        encoder_ffn_dim=audio["intermediate_size"],
        max_source_positions=audio["max_source_positions"],
        activation_function=audio.get("activation_function", "gelu"),
    )
    if encoder.encoder_ffn_dim % encoder.d_model:
        raise ValueError(
            f"audio intermediate_size {encoder.encoder_ffn_dim} is not a multiple of hidden_size {encoder.d_model}"
        )
    projector = ProjectorConfig(
        kind="frame_stack",
        downsample=encoder.encoder_ffn_dim // encoder.d_model,
        activation=config.get("projector_hidden_act", "gelu"),
        use_bias=False,
    )
    return encoder, projector, LLMConfig.from_hf(config["text_config"])


def table(llm: LLMConfig) -> tuple[Rule, ...]:
    """Our SpeechLM parameter paths -> Voxtral on-disk keys: the Whisper and LLM tables, re-rooted."""
    encoder = tuple(
        Rule(f"encoder/{r.ours}", "audio_tower." + r.hf.removeprefix("encoder."), r.hook) for r in WHISPER_TABLE
    )
    projector = (
        Rule("projector/linear_1/kernel", "multi_modal_projector.linear_1.weight", transpose),
        Rule("projector/linear_2/kernel", "multi_modal_projector.linear_2.weight", transpose),
    )
    decoder = tuple(Rule(f"llm/{r.ours}", f"language_model.{r.hf}", r.hook) for r in LLM_TABLES[llm.model_type])
    return encoder + projector + decoder


def in_memory_module(llm_key: str) -> str:
    """An LLM checkpoint key (`model.layers.0.self_attn.q_proj.weight`) -> the module's path inside
    VoxtralForConditionalGeneration in memory (`model.language_model.layers.0.self_attn.q_proj`)."""
    return IN_MEMORY_LLM_PREFIX + llm_key.removeprefix("model.").rsplit(".", 1)[0]

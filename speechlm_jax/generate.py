"""Batched KV-cache decoding for the decoder LLM (teacher targets, evaluation).

`generate` prefills a fixed-size `KVCache` with the (left-padded) prompt, given as token
ids or as embeddings (a speech prefix built by `SpeechLM.embed_inputs`), then decodes
inside one `jax.lax.while_loop` that stops as soon as every row has produced an EOS.
The model is split into graphdef + state and the whole program (prefill + loop) is
jitted once per (batch, prompt length, max_new_tokens, sampling settings); the cache
lives in the loop carry, so XLA updates it in place with `dynamic_update_slice`.

Decoding is greedy at temperature 0, otherwise temperature sampling with optional
nucleus (top-p) filtering from an explicit rng. After a row's EOS its remaining
tokens are `pad_id`, as transformers' `generate` pads finished rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from speechlm_jax.models.llm import DecoderLLM, default_positions


class GenerateOutput(NamedTuple):
    """tokens [batch, max_new_tokens] (pad_id after EOS); lengths [batch] (tokens up to and including EOS)."""

    tokens: jax.Array
    lengths: jax.Array


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """Next tokens [batch] from float32 logits [batch, vocab]: argmax at temperature 0, else sampled.

    top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


@partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "eos_ids", "temperature", "top_p", "pad_id", "lora"),
)
def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_tokens: jax.Array | None,
    prompt_mask: jax.Array,
    inputs_embeds: jax.Array | None,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    temperature: float,
    top_p: float,
    pad_id: int,
    lora: bool,
) -> GenerateOutput:
    model = nnx.merge(graphdef, state)
    mask = prompt_mask.astype(jnp.int32)
    batch, prompt_len = mask.shape
    embeds = model.embed(prompt_tokens) if inputs_embeds is None else inputs_embeds
    positions = default_positions(mask)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    hidden, cache = model.hidden_states(embeds, positions=positions, input_mask=mask, lora=lora, cache=cache)
    rng, key = jax.random.split(rng)
    first = sample_logits(model.logits(hidden[:, -1:])[:, 0], key, temperature=temperature, top_p=top_p)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    # Left padding puts every row's last prompt token in the last slot.
    carry = (jnp.int32(1), tokens, _is_eos(first, eos_ids), cache, first, positions[:, -1] + 1, rng)

    def not_finished(carry: tuple) -> jax.Array:
        step, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry: tuple) -> tuple:
        step, tokens, done, cache, last, position, rng = carry
        rng, key = jax.random.split(rng)
        hidden, cache = model.hidden_states(
            model.embed(last[:, None]),
            positions=position[:, None],
            input_mask=jnp.ones((batch, 1), jnp.int32),
            lora=lora,
            cache=cache,
        )
        token = sample_logits(model.logits(hidden)[:, 0], key, temperature=temperature, top_p=top_p)
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, tokens, done | _is_eos(token, eos_ids), cache, token, position + 1, rng

    _, tokens, *_ = jax.lax.while_loop(not_finished, decode_step, carry)
    eos = _is_eos(tokens, eos_ids)
    lengths = jnp.where(jnp.any(eos, axis=1), jnp.argmax(eos, axis=1) + 1, max_new_tokens)
    return GenerateOutput(tokens, lengths.astype(jnp.int32))


def generate(
    model: DecoderLLM,
    prompt_tokens: jax.Array | None,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    pad_id: int = 0,
    lora: bool = True,
) -> GenerateOutput:
    """Decodes up to `max_new_tokens` per row from left-padded prompts.

    prompt_tokens [B, P] int (may be None when inputs_embeds is given), prompt_mask [B, P]
    (1 = real token, padding on the left), inputs_embeds [B, P, D] to start from
    embeddings instead of token ids (e.g. a speech prefix). `eos_id` may be several ids.
    Sampling (temperature > 0) needs `rng`.
    """
    if prompt_tokens is None and inputs_embeds is None:
        raise ValueError("generate needs prompt_tokens or inputs_embeds")
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32),
        jnp.asarray(prompt_mask, jnp.int32),
        inputs_embeds,
        rng if rng is not None else jax.random.key(0),
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        temperature=float(temperature),
        top_p=float(top_p),
        pad_id=pad_id,
        lora=lora,
    )

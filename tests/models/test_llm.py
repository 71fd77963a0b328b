"""DecoderLLM against transformers (Llama 3 / Qwen2 / Qwen3 / Gemma 3), plus cache, LoRA, remat and sharding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from speechlm_jax.models.hf_import import load_llm
from speechlm_jax.models.llm import AttentionMask, DecoderLLM, KVCache, LLMConfig, default_positions
from speechlm_jax.models.lora import LoRAConfig, apply_lora, merge_lora
from speechlm_jax.sharding import batch_sharding, make_mesh, shard_state, state_shardings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llm_families, save_hf_model):
    """(family, tied) -> (checkpoint dir, the transformers model saved there)."""
    out = {}
    for family in llm_families:
        for tied in (False, True):
            directory = tmp_path_factory.mktemp(f"{family}_{'tied' if tied else 'untied'}")
            out[family, tied] = directory, save_hf_model(family, directory, tied=tied)
    return out


def right_padded_batch(seed: int = 0, length: int = 14) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    tokens = rs.randint(3, 160, (3, length))
    mask = np.ones_like(tokens)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return tokens * mask, mask


def left_padded_batch(seed: int = 0, length: int = 14) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = right_padded_batch(seed, length)
    return tokens[:, ::-1].copy(), mask[:, ::-1].copy()


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(checkpoints, llm_family, tied, attention):
    directory, hf = checkpoints[llm_family, tied]
    model = load_llm(directory, attention=attention)
    assert (model.lm_head is None) == tied
    tokens, mask = right_padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens), input_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    # The unembedding + logits path used by the chunked losses gives the same numbers.
    hidden, _ = model.hidden_states(
        model.embed(jnp.asarray(tokens)), positions=default_positions(jnp.asarray(mask)), input_mask=jnp.asarray(mask)
    )
    assert model.unembedding().shape == (model.config.hidden_size, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), ours, atol=1e-6)


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_logits_equal_full_forward(checkpoints, family, attention):
    model = load_llm(checkpoints[family, True][0], attention=attention)
    tokens, mask = left_padded_batch(seed=1, length=13)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    positions = default_positions(mask)
    full = model(tokens, positions=positions, input_mask=mask)

    @nnx.jit
    def extend(model: DecoderLLM, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache):
        hidden, cache = model.hidden_states(model.embed(tokens), positions=positions, input_mask=mask, cache=cache)
        return model.logits(hidden), cache

    cache = model.init_cache(tokens.shape[0], 16)
    prefill = 6
    logits, cache = extend(model, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache)
    pieces = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = extend(model, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        pieces.append(logits)
    cached = jnp.concatenate(pieces, axis=1)
    assert int(cache.index) == tokens.shape[1]
    valid = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(cached) - np.asarray(full))[valid].max() <= 1e-5


def test_lora_zero_b_lora_off_and_merge(checkpoints):
    model = load_llm(checkpoints["qwen2", False][0])
    tokens, mask = (jnp.asarray(a) for a in right_padded_batch())
    base = model(tokens, input_mask=mask)
    paths = apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    assert "layers/1/attn/q_proj" in paths and "layers/0/mlp/down_proj" in paths
    np.testing.assert_array_equal(np.asarray(model(tokens, input_mask=mask)), np.asarray(base))

    for _, linear in [(p, m) for p, m in nnx.iter_graph(model) if getattr(m, "has_lora", False)]:
        linear.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(3), linear.lora_b[...].shape)
    adapted = model(tokens, input_mask=mask)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(model(tokens, input_mask=mask, lora=False)), np.asarray(base))
    merge_lora(model)
    np.testing.assert_allclose(np.asarray(model(tokens, input_mask=mask)), np.asarray(adapted), atol=1e-5)


def test_remat_keeps_values_and_gradients(checkpoints):
    directory = checkpoints["gemma3", True][0]
    tokens, mask = (jnp.asarray(a) for a in right_padded_batch())

    @nnx.jit
    def loss_and_grads(model: DecoderLLM):
        def loss(model: DecoderLLM) -> jax.Array:
            logp = jax.nn.log_softmax(model(tokens, input_mask=mask)[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        return nnx.value_and_grad(loss)(model)

    plain_loss, plain_grads = loss_and_grads(load_llm(directory))
    for policy in ("full", "dots_saveable"):
        model = load_llm(directory, remat=policy)
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda state, g=graphdef: nnx.merge(g, state)(tokens, input_mask=mask))(state))
        assert "remat" in jaxpr or "checkpoint" in jaxpr
        remat_loss, remat_grads = loss_and_grads(model)
        np.testing.assert_allclose(float(remat_loss), float(plain_loss), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-5 * np.abs(b).max())


def test_sharded_forward_equals_single_device(checkpoints):
    model = load_llm(checkpoints["llama", False][0])
    tokens, mask = right_padded_batch(length=12)
    tokens, mask = np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])
    single = np.asarray(model(jnp.asarray(tokens), input_mask=jnp.asarray(mask)))

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    graphdef, state = nnx.split(model)
    sharded = shard_state(state, mesh)
    specs = [s.spec for s in jax.tree.leaves(state_shardings(state, mesh))]
    assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)

    @jax.jit
    def forward(state: nnx.State, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(tokens, input_mask=mask)

    rows = batch_sharding(mesh, 2)
    out = forward(sharded, jax.device_put(tokens, rows), jax.device_put(mask, rows))
    valid = mask.astype(bool)
    assert np.abs(np.asarray(out) - single)[valid].max() <= 1e-5


def test_attention_softcapping_caps_scores():
    """attn_logit_softcapping (set directly; HF's Gemma 3 ignores it) caps scores at tanh(s / c) * c."""
    config = LLMConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    capped = dataclasses.replace(config, attn_logit_softcapping=0.5)
    attn = DecoderLLM(config, rngs=nnx.Rngs(0)).layers[0].attn
    attn_capped = DecoderLLM(capped, rngs=nnx.Rngs(0)).layers[0].attn
    x = 30.0 * jax.random.normal(jax.random.key(0), (1, 4, 16))
    cos, sin = jnp.ones((1, 4, 8)), jnp.zeros((1, 4, 8))
    mask = AttentionMask(jnp.ones((1, 4), bool), jnp.arange(4))

    q = attn.q_proj(x).reshape(1, 4, 2, 8)
    k = attn.k_proj(x).reshape(1, 4, 1, 8)
    v = attn.v_proj(x).reshape(1, 4, 1, 8)
    scores = jnp.einsum("bthd,bskd->bhts", q, k) * 8**-0.5
    scores = jnp.tanh(scores / 0.5) * 0.5
    probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((4, 4), bool)), scores, -jnp.inf), axis=-1)
    expected = attn.o_proj(jnp.einsum("bhts,bskd->bthd", probs, v).reshape(1, 4, 16))
    out, _ = attn_capped(x, cos, sin, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
    plain, _ = attn(x, cos, sin, mask)
    assert np.abs(np.asarray(plain) - np.asarray(out)).max() > 1e-3


def test_gemma_embedding_scale_in_bf16_like_transformers(checkpoints):
    _, hf = checkpoints["gemma3", True]
    directory = checkpoints["gemma3", True][0]
    model = load_llm(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    tokens = np.arange(3, 40).reshape(1, -1)
    embed = hf.model.embed_tokens.to(torch.bfloat16)
    with torch.no_grad():
        ref = embed(torch.tensor(tokens)).float().numpy()
    embed.to(torch.float32)
    ours = np.asarray(model.embed(jnp.asarray(tokens)).astype(jnp.float32))
    np.testing.assert_array_equal(ours, ref)


ATTENTION_CASES = {
    # name: (kv heads, sliding window (every layer sliding), padding of the batch)
    "causal": (4, None, "none"),
    "gqa_right_padding": (2, None, "right"),
    "gqa_left_padding": (1, None, "left"),
    "sliding_window": (2, 3, "right"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_dot_product_attention_equals_einsum(case):
    """jax.nn.dot_product_attention (is_causal, key mask, local window, GQA) gives the einsum's
    logits and gradients, float32, on every position (padding too)."""
    kv_heads, window, padding = ATTENTION_CASES[case]
    config = LLMConfig(
        model_type="qwen2",
        vocab_size=160,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        qkv_bias=True,
        sliding_window=window,
        layer_types=("sliding_attention",) * 2 if window else (),
    )
    tokens, mask = {"none": right_padded_batch, "right": right_padded_batch, "left": left_padded_batch}[padding]()
    if padding == "none":
        mask = np.ones_like(mask)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

    def loss_and_grads(attention: str):
        model = DecoderLLM(dataclasses.replace(config, attention=attention), rngs=nnx.Rngs(0))
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
        for _, linear in [(p, m) for p, m in nnx.iter_graph(model) if getattr(m, "has_lora", False)]:
            linear.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), linear.lora_b[...].shape)

        def loss(model: DecoderLLM) -> tuple[jax.Array, jax.Array]:
            logits = model(tokens, input_mask=mask)
            return jnp.sum(jnp.sin(logits) * mask[..., None]), logits

        (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        return logits, grads

    ref_logits, ref_grads = loss_and_grads("einsum")
    logits, grads = loss_and_grads("dot_product")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(1.0, float(np.abs(b).max())))
    if window:
        # The window matters here: the same model with full attention differs.
        full = DecoderLLM(dataclasses.replace(config, sliding_window=None, layer_types=()), rngs=nnx.Rngs(0))
        assert np.abs(np.asarray(full(tokens, input_mask=mask)) - np.asarray(ref_logits)).max() > 1e-3


def test_fused_attention_refuses_softcapping():
    with pytest.raises(ValueError, match="model.attention=einsum"):
        LLMConfig(attn_logit_softcapping=20.0, attention="dot_product")
    with pytest.raises(ValueError, match="not one of"):
        LLMConfig(attention="flash")


def stacked_like(unrolled: nnx.State, scanned: nnx.State) -> nnx.State:
    """`scanned`'s structure holding `unrolled`'s values, layer i's at index i of each stacked leaf."""
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(unrolled)}
    out = []
    for path, variable in nnx.to_flat_state(scanned):
        name = "/".join(map(str, path))
        if name.startswith("layers/"):
            rest = name[len("layers/") :]
            value = jnp.stack([flat[f"layers/{i}/{rest}"] for i in range(variable.get_value().shape[0])])
        else:
            value = flat[name]
        out.append((path, variable.replace(value)))
    return nnx.from_flat_state(out)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scanned_layers_equal_unrolled(checkpoints, family):
    """One scanned layer over stacked weights (imported from the same HF folder) gives the unrolled logits."""
    directory = checkpoints[family, False][0]
    unrolled, scanned = load_llm(directory), load_llm(directory, scan_layers=True)
    assert scanned.layers.attn.q_proj.kernel.shape == (2, 64, 64)
    tokens, mask = (jnp.asarray(a) for a in right_padded_batch())
    reference = np.asarray(unrolled(tokens, input_mask=mask))
    # float32 rounding only (XLA fuses the scanned body differently): 1e-6 of the logits' scale.
    np.testing.assert_allclose(
        np.asarray(scanned(tokens, input_mask=mask)), reference, atol=1e-6 * np.abs(reference).max()
    )
    graphdef, state = nnx.split(scanned)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, input_mask=mask))(state))
    assert jaxpr.count("scan[") == 1


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_lora_gradients_equal_unrolled(checkpoints, remat):
    directory = checkpoints["qwen2", False][0]
    tokens, mask = (jnp.asarray(a) for a in right_padded_batch())
    unrolled, scanned = load_llm(directory), load_llm(directory, scan_layers=True, remat=remat)
    lora = LoRAConfig(rank=2, alpha=4.0)
    apply_lora(unrolled, lora, rngs=nnx.Rngs(1))
    apply_lora(scanned, lora, rngs=nnx.Rngs(1))
    for _, linear in [(p, m) for p, m in nnx.iter_graph(unrolled) if getattr(m, "has_lora", False)]:
        linear.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), linear.lora_b[...].shape)
    nnx.update(scanned, stacked_like(nnx.state(unrolled), nnx.state(scanned)))

    def grads(model: DecoderLLM) -> nnx.State:
        def loss(lora_state: nnx.State, rest: nnx.State, graphdef: nnx.GraphDef) -> jax.Array:
            logits = nnx.merge(graphdef, lora_state, rest)(tokens, input_mask=mask)
            return jnp.sum(jnp.sin(logits) * mask[..., None])

        graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
        return jax.jit(jax.grad(loss), static_argnums=2)(lora_state, rest, graphdef)

    if remat == "full":
        graphdef, state = nnx.split(scanned)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, input_mask=mask))(state))
        assert "checkpoint" in jaxpr or "remat" in jaxpr
    expected = stacked_like(grads(unrolled), nnx.state(scanned, nnx.LoRAParam))
    got = grads(scanned)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.shape[0] == 2
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_scanned_kv_cache_decoding_equals_unrolled(checkpoints, attention):
    directory = checkpoints["llama", True][0]
    unrolled = load_llm(directory)
    scanned = load_llm(directory, scan_layers=True, attention=attention)
    tokens, mask = left_padded_batch(seed=1, length=11)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    positions = default_positions(mask)
    full = unrolled(tokens, positions=positions, input_mask=mask)

    @nnx.jit
    def extend(model: DecoderLLM, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache):
        hidden, cache = model.hidden_states(model.embed(tokens), positions=positions, input_mask=mask, cache=cache)
        return model.logits(hidden), cache

    cache = scanned.init_cache(tokens.shape[0], 14)
    assert cache.keys.shape == (2, 3, 14, 2, 16)
    logits, cache = extend(scanned, tokens[:, :5], positions[:, :5], mask[:, :5], cache)
    pieces = [logits]
    for t in range(5, tokens.shape[1]):
        logits, cache = extend(scanned, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        pieces.append(logits)
    assert int(cache.index) == tokens.shape[1]
    valid = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(jnp.concatenate(pieces, axis=1)) - np.asarray(full))[valid].max() <= 1e-5


def test_scanned_layers_refuse_mixed_layer_types(checkpoints):
    with pytest.raises(ValueError, match="model.scan_layers=false"):
        load_llm(checkpoints["gemma3", True][0], scan_layers=True)

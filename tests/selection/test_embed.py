"""Text embeddings: the LLM's mean-pooled hidden states against transformers, an HF encoder
folder against its own unpadded forward, and the sharded corpus writer's resume."""

from __future__ import annotations

import json

import jax
import numpy as np
import torch
import transformers

from speechlm_jax.data.sources import read_text_corpus
from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from speechlm_jax.models import hf_import
from speechlm_jax.selection import embed
from speechlm_jax.sharding import make_mesh

TEXTS = [
    "the small cat sleeps",
    "a dog runs near the river",
    "two brown dogs",
    "the cat",
    "a small brown cat runs near the barn and sleeps",
    "the river",
]


def _reference_mean(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return hidden.mean(0).numpy()


def test_llm_embedder_matches_transformers_mean_pooled_hidden_states(save_hf_model, tmp_path):
    hf = save_hf_model("llama", tmp_path / "llm", tied=False)
    tok = load_tokenizer(build_word_tokenizer(TEXTS, tmp_path / "tok"))
    mesh = make_mesh({"data": 2}, jax.devices()[:2])
    llm = hf_import.load_llm(tmp_path / "llm", mesh=mesh)
    embedder = embed.LLMEmbedder(llm, tok, mesh=mesh, batch_size=4, length_multiple=8)
    ours = embedder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 64)
    for text, vector in zip(TEXTS, ours):
        reference = _reference_mean(hf.model, [tok.bos_id] + tok.encode(text))
        np.testing.assert_allclose(vector, reference, rtol=2e-4, atol=2e-5)


def test_hf_encoder_embedder_matches_unpadded_forward(tmp_path):
    folder = tmp_path / "bert"
    build_word_tokenizer(TEXTS, folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).eval().save_pretrained(folder)
    assert not embed.is_decoder_folder(folder)
    embedder = embed.HFEncoderEmbedder(folder, batch_size=4)
    ours = embedder.embed(TEXTS)
    for text, vector in zip(TEXTS, ours):
        ids = embedder.tokenizer(text)["input_ids"]
        np.testing.assert_allclose(vector, _reference_mean(embedder.model, ids), rtol=1e-4, atol=1e-5)


class _Counting:
    """A deterministic embedder that records every text it embeds."""

    def __init__(self):
        self.seen: list[str] = []

    def embed(self, texts):
        self.seen += list(texts)
        return np.asarray([[len(t), t.count(" ")] for t in texts], np.float32)


def test_embed_corpus_is_sharded_and_resumes(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS * 2)))
    records = read_text_corpus(corpus)
    first = _Counting()
    paths = embed.embed_corpus(records, first, tmp_path / "emb", shard_size=5)
    assert [p.name for p in paths] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert len(first.seen) == 12
    paths[1].unlink()  # as if interrupted before the second shard was written
    again = _Counting()
    embed.embed_corpus(records, again, tmp_path / "emb", shard_size=5)
    assert again.seen == [r["text"] for r in records[5:10]]
    ids, vectors = embed.load_embeddings(tmp_path / "emb", len(records), 5)
    assert ids.tolist() == [r["id"] for r in records]
    np.testing.assert_array_equal(vectors, _Counting().embed([r["text"] for r in records]))

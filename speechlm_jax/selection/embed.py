"""Step 1 of active selection: one embedding vector per text of the corpus.

    corpus JSONL ({"id", "text"}, documents or sentences; or plain lines)
      -> batches of `batch_size` texts, sharded over the mesh's batch axes
      -> an `Embedder`: texts -> [batch, dim] float32
      -> <out>/shard-00000.npz ... ({"ids", "embeddings"}), `shard_size` texts each

Two embedders:

    LLMEmbedder      the built-in default: the decoder LLM's own final (normed) hidden
                     states, mean-pooled over the text's tokens, LoRA off (the teacher's
                     view of the text). Pure Flax: a Llama / Qwen / Gemma HF folder is read
                     by `models.hf_import` (no torch), or the stage-1 run's LLM is used.
    HFEncoderEmbedder  any other local HF encoder folder (BERT, E5, ...) through
                     `transformers.AutoModel`, mean-pooled over the attention mask. The
                     transformers releases this project pins have no Flax models, so this
                     path needs torch at run time (the `test` extra, or a CPU torch).

Resumable and multi-host: shard `i` belongs to process `i % process_count`, is written
atomically, and a shard whose file exists is not computed again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from speechlm_jax.data.tokenizer import SpeechTokenizer
from speechlm_jax.models.llm import DecoderLLM
from speechlm_jax.sharding import DEFAULT_RULES, Rules, batch_sharding, make_mesh, shard_state


class Embedder(Protocol):
    """Texts -> embeddings [len(texts), dim] float32."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@partial(jax.jit, static_argnames=("graphdef",))
def _mean_hidden(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the final hidden states [B, D] over the real tokens (mask [B, T]), LoRA off, float32."""
    llm = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None, :], tokens.shape)
    hidden, _ = llm.hidden_states(llm.embed(tokens), positions=positions, input_mask=mask, lora=False)
    weights = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class LLMEmbedder:
    """Mean-pooled final hidden states of a DecoderLLM (LoRA off), batches sharded on `mesh`.

    Texts are `<bos> text` truncated to `max_tokens`; lengths are rounded up to
    `length_multiple` and rows padded to `batch_size`, so few shapes compile.
    """

    def __init__(
        self,
        llm: DecoderLLM,
        tokenizer: SpeechTokenizer,
        *,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        batch_size: int = 32,
        max_tokens: int = 256,
        length_multiple: int = 32,
    ):
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None else make_mesh({"data": 1}, jax.devices()[:1])
        self.rules = rules
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = _round_up(batch_size, shards)
        self.max_tokens = max_tokens
        self.length_multiple = length_multiple
        self.graphdef, state = nnx.split(llm)
        self.state = shard_state(state, self.mesh, rules)

    def _ids(self, text: str) -> list[int]:
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        return (bos + self.tokenizer.encode(text))[: self.max_tokens]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = [self._ids(t) for t in texts[start : start + self.batch_size]]
            length = min(
                _round_up(max(len(i) for i in ids), self.length_multiple),
                _round_up(self.max_tokens, self.length_multiple),
            )
            tokens = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for row, row_ids in enumerate(ids):
                tokens[row, : len(row_ids)] = row_ids
                mask[row, : len(row_ids)] = 1
            put = partial(jax.device_put, device=batch_sharding(self.mesh, 2, self.rules))
            pooled = _mean_hidden(self.graphdef, self.state, put(tokens), put(mask))
            out.append(np.asarray(jax.device_get(pooled))[: len(ids)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class HFEncoderEmbedder:
    """Mean-pooled last hidden states of a local HF encoder folder via `transformers.AutoModel` (needs torch)."""

    def __init__(self, folder: str | Path, *, batch_size: int = 32, max_tokens: int = 256):
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"embedding with the HF encoder {folder} needs torch (transformers has no Flax models); "
                "install a CPU torch, or use the built-in LLM embedder"
            ) from error
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            with self._torch.no_grad():
                hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def is_decoder_folder(folder: str | Path) -> bool:
    """Whether an HF folder holds a decoder LLM this package reads in Flax (Llama, Qwen, Gemma 3)."""
    from speechlm_jax.models.llm import ARCHITECTURES

    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type")
    return model_type in ARCHITECTURES or (model_type == "gemma3" and "text_config" in config)


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.npz"


def _shards(num: int, shard_size: int) -> Iterator[tuple[int, int, int]]:
    for index, start in enumerate(range(0, num, shard_size)):
        yield index, start, min(start + shard_size, num)


def embed_corpus(
    records: Sequence[dict[str, str]], embedder: Embedder, out_dir: str | Path, *, shard_size: int = 4096
) -> list[Path]:
    """Writes the embeddings of `records` as shards (see the module docstring); returns this process's shard paths.

    Shards already on disk are kept, so an interrupted run continues where it stopped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = []
    for index, start, stop in _shards(len(records), shard_size):
        if index % jax.process_count() != jax.process_index():
            continue
        path = shard_path(out_dir, index)
        mine.append(path)
        if path.is_file():
            continue
        chunk = records[start:stop]
        vectors = embedder.embed([r["text"] for r in chunk])
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, ids=np.asarray([r["id"] for r in chunk]), embeddings=vectors.astype(np.float32))
        os.replace(tmp, path)
    return mine


def load_embeddings(out_dir: str | Path, num_records: int, shard_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N], embeddings [N, dim]) from every shard of `embed_corpus`, in corpus order."""
    ids, vectors = [], []
    for index, start, stop in _shards(num_records, shard_size):
        path = shard_path(Path(out_dir), index)
        if not path.is_file():
            raise FileNotFoundError(f"embedding shard {path} is missing; run the embed stage")
        with np.load(path) as shard:
            if len(shard["ids"]) != stop - start:
                raise ValueError(f"{path} holds {len(shard['ids'])} texts, expected {stop - start}")
            ids.append(shard["ids"])
            vectors.append(shard["embeddings"])
    return np.concatenate(ids), np.concatenate(vectors)

"""Batching: the pipeline's batches as global jax.Arrays sharded over the mesh's batch axes."""

from __future__ import annotations

import jax
import numpy as np

from speechlm_jax.data.batching import to_global_arrays
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.sharding import make_mesh


def test_to_global_arrays(wav_manifest, word_tokenizer):
    mesh = make_mesh({"data": 4, "fsdp": 2})
    config = PipelineConfig(
        speech_sources=({"type": "manifest", "path": str(wav_manifest)},),
        buckets=((16000, 48), (48000, 64)),
        max_slots=3,
        teacher_tokens=64,
        batch_size=8,
        downsample=4,
        num_threads=1,
        prefetch_buffer_size=2,
    )
    iterator, _ = build_pipeline(config, tokenizer=word_tokenizer)
    batch = next(iterator)
    arrays = to_global_arrays(batch, mesh)
    for key, value in batch.items():
        assert arrays[key].shape == value.shape
        assert arrays[key].sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(jax.device_get(arrays[key]), value)

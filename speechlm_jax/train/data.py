"""The trainer's view of the data pipeline: `config.data` -> this host's Grain iterators.

`speechlm_jax.data` (assembled in `data.pipeline`) owns everything about examples and batches; this module only
fills in what the trainer knows and the pipeline config does not: the per-host batch size
(`train.batch_size` over the processes), the projector's downsample factor (it fixes how
many audio positions a clip takes), the seed, and the held-out variant used for
evaluation (other sources, held-out prompt phrasings, read once in order).
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np

from speechlm_jax.data import batching, pipeline
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.preflight import check_sources
from speechlm_jax.data.tasks import import_task_modules
from speechlm_jax.data.tokenizer import SpeechTokenizer, load_tokenizer

# Keys of `config.data` that are the trainer's, not PipelineConfig fields.
TRAINER_KEYS = (
    "tokenizer",
    "task_modules",
    "eval_speech_sources",
    "eval_conversation_sources",
    "eval_prompt_split",
    "made_by",
)


def pipeline_config(config: ml_collections.ConfigDict, *, heldout: bool = False) -> PipelineConfig:
    """The PipelineConfig of this run (training or held-out evaluation) for this host."""
    if config.train.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={config.train.batch_size} does not divide over {jax.process_count()} processes"
        )
    fields = {k: v for k, v in config.data.to_dict().items() if k not in TRAINER_KEYS}
    fields.update(
        batch_size=config.train.batch_size // jax.process_count(), downsample=config.model.projector.downsample
    )
    if heldout:
        fields["prompt_split"] = config.data.eval_prompt_split
        if config.data.eval_speech_sources:
            fields["speech_sources"] = config.data.eval_speech_sources
        # Held-out conversations only: the training ones are never scored as held out.
        fields["conversation_sources"] = tuple(config.data.get("eval_conversation_sources", ()))
        if not fields["conversation_sources"]:
            fields["conversation_weight"] = 0.0
    return PipelineConfig.from_config(fields)


class Data:
    """The tokenizer, the checkpointable training iterator and fresh held-out passes."""

    def __init__(self, config: ml_collections.ConfigDict):
        check_sources(config)
        import_task_modules(config.data.task_modules)
        self.config = config
        self.tokenizer: SpeechTokenizer = load_tokenizer(config.data.tokenizer)
        self.train_config = pipeline_config(config)
        self.eval_config = pipeline_config(config, heldout=True)
        self._eval_dataset: grain.IterDataset | None = None

    def _host(self) -> dict[str, int]:
        return dict(process_index=jax.process_index(), process_count=jax.process_count(), seed=self.config.seed)

    def train_iterator(self) -> tuple[grain.DatasetIterator, batching.PipelineStats]:
        """The training batches (shuffled, repeated), checkpointed with the run, and their counters."""
        return pipeline.build_pipeline(self.train_config, tokenizer=self.tokenizer, split="train", **self._host())

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the held-out batches, from the start each time it is called."""
        if self._eval_dataset is None:
            self._eval_dataset, _ = pipeline.build_dataset(
                self.eval_config, tokenizer=self.tokenizer, split="heldout", **self._host()
            )
        return iter(self._eval_dataset)

    def batch_ndims(self) -> dict[str, int]:
        """Rank of every batch array (from an empty batch of the first bucket)."""
        c = self.train_config
        empty = batching.collate(
            [],
            c.buckets[0],
            batch_size=1,
            max_slots=c.max_slots,
            teacher_tokens=c.teacher_tokens,
            downsample=c.downsample,
            pad_id=0,
        )
        return {k: v.ndim for k, v in empty.items()}

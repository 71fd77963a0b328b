"""SALAD: cross-modal distillation from the text LLM into its speech-reading self.

loss = alpha * KL(teacher(text twin, LoRA off) || student(speech or interleaved)) on the
text positions (`kl_mask`) + (1 - alpha) * NLL on the response. The teacher is the same
weights with LoRA off, in the same step, under stop_gradient. Stage 1 (this config) uses
paired speech + transcript; stage 2 adds TTS speech for the text clusters with the largest
misalignment (a data change: `data.speech_sources`).

Variants: `toy` (the demo's toy world in the folder `out`, see `configs/toyworld.py`),
`tiny` (CPU), `paper` (Whisper-large-v3 + `llm`; alpha = 1, distillation only,
on text positions; the adapter at lr 1e-3 and the LLM's LoRA at 5e-5; interleaved inputs).
"""

import ml_collections

from speechlm_jax.configs import toyworld
from speechlm_jax.configs.base import base_config, parse_arg, real, tiny
from speechlm_jax.toyworld.tasks import SEEN_TASKS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(
        arg, variant="paper", llm="llama-3.2-3b", data_dir="", weights_dir="", alpha=1.0, out=toyworld.DEMO_OUT
    )
    c = base_config()
    c.recipe = "salad"
    c.loss.name = "salad"
    c.loss.alpha = a.alpha
    c.loss.temperature = 1.0
    c.loss.direction = "forward"
    c.train.trainable = "projector,lora"
    c.model.lora.rank, c.model.lora.alpha = 16, 32.0
    c.optimizer.lr.projector = 1e-3
    c.optimizer.lr.lora = 5e-5
    c.data.kinds = ml_collections.ConfigDict({"asr": 0.5, "continuation": 0.5})
    c.data.interleave_prob = 0.5
    if a.variant == "toy":
        # KL to the teacher on every text position of the same (interleaved) examples, plus 20%
        # text-only examples: KL to the teacher there holds the LoRA'd LLM to the original on
        # text (the forgetting term); projector + LLM LoRA. A fifth of the speech is running text
        # (the transcript with spans spoken, no prompt): SALAD's own stage-1 data, the form M is
        # measured in, which stage 2's selection then targets.
        c = toyworld.recipe(c, a.out)
        c.data.kinds = ml_collections.ConfigDict({"imitation": 0.6, "running_text": 0.2, "asr": 0.2})
        c.data.tasks = SEEN_TASKS
        c.data.targets = toyworld.targets(a.out)
        c.data.text_sources = (toyworld.paths(a.out)["text_sft"],)
        c.data.text_weight = 0.2
        c.optimizer.lr.lora = 5e-4
        c.data.interleave_prob = 0.5
        c.data.max_slots = 2  # every slot is a whole bucket of audio through the encoder
        # Warmup, constant, then a linear decay over the last 20 steps: the run keeps its step-80
        # checkpoint, from which stage 2 (`speechlm-select train`) continues at the peak rate.
        c.optimizer.schedule = "warmup_stable_decay"
        c.optimizer.decay_fraction = 0.2
        return c
    if a.variant == "tiny":
        c = tiny(c, a.data_dir)
        c.data.kinds = ml_collections.ConfigDict({"asr": 1.0})
        c.optimizer.lr.projector, c.optimizer.lr.lora = 1e-2, 3e-3
        return c
    if a.variant == "paper":
        c = real(c, a.llm, weights_dir=a.weights_dir, data_dir=a.data_dir)
        c.train.steps, c.train.batch_size = 20_000, 64
        c.optimizer.warmup_steps = 1000
        return c
    raise ValueError(f"unknown variant {a.variant!r}; one of tiny, toy, paper")

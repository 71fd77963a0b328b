"""Connector alignment: CTC of the encoder and projector through the frozen LLM's own head.

    speechlm-train --config configs/align.py:tiny --workdir /tmp/align
    speechlm-train --config configs/asr.py:tiny --config.model.init_from.workdir=/tmp/align \\
        --config.model.init_from.parts=projector,encoder --workdir /tmp/asr

Each projector frame is read out through the LLM's final norm and unembedding and scored by CTC
against the transcript (`loss.name = "ctc"`), so the frames land where the LLM reads its own token
embeddings, with no instruction data at all. The LLM is untouched (no LoRA, frozen). At full scale
this is the ASR-alignment stage many speech LLMs run before instruction data; a recipe then starts
its projector (and encoder) from it with `model.init_from`, and `speechlm-eval --ctc_asr --cascade`
reads the aligned connector as an ASR system (the cascade baseline).

Variants: `tiny` (random tiny models on the tiny corpus in `data_dir`), `toy` (the demo's frozen
teacher and pretrained encoder in the folder `out`), `paper` (Whisper-large-v3 + `llm`, the encoder
frozen, the projector at 1e-3: the connector alone moves). `blank` is the blank token id: a token no
transcript contains (the tokenizer's pad), whose logit comes from the connector's learned blank
vector (`model.projector.ctc_blank`), not from the LLM's row for it.
"""

import ml_collections

from speechlm_jax.configs import toyworld
from speechlm_jax.configs.base import base_config, parse_arg, real, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, variant="paper", llm="llama-3.2-3b", data_dir="", weights_dir="", blank=0, out=toyworld.DEMO_OUT)
    c = base_config()
    c.recipe = "ctc"
    c.loss.name = "ctc"
    c.loss.blank_id = a.blank
    c.model.lora.rank = 0
    c.train.trainable = "encoder,projector"
    # The blank is the connector's own learned vector: the LLM's row for `blank` (its pad token) is
    # one it never learnt to predict (on the toy teacher no frame can give it over 13% probability).
    c.model.projector.ctc_blank = True
    c.optimizer.lr.projector = 1e-3
    c.optimizer.lr.encoder = 1e-4
    c.data.kinds = ml_collections.ConfigDict({"asr": 1.0})
    c.data.max_slots = 1
    if a.variant == "toy":
        c = toyworld.recipe(c, a.out, aligned=False)
        c.loss.blank_id = toyworld.BLANK_ID
        c.train.steps = toyworld.ALIGN_STEPS
        c.optimizer.lr.encoder = toyworld.ALIGN_ENCODER_LR
        c.data.interleave_prob = 0.0
        return c
    if a.variant == "tiny":
        c = tiny(c, a.data_dir)
        c.data.max_slots = 1
        c.optimizer.lr.projector = c.optimizer.lr.encoder = 1e-2
        return c
    if a.variant == "paper":
        c = real(c, a.llm, weights_dir=a.weights_dir, data_dir=a.data_dir)
        c.train.trainable = "projector"
        c.train.steps, c.train.batch_size = 10_000, 64
        c.optimizer.warmup_steps = 500
        return c
    raise ValueError(f"unknown variant {a.variant!r}; one of tiny, toy, paper")

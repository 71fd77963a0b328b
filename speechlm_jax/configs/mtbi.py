"""MTBI (multi-task behavior imitation): the student answers speech as the LLM answers text.

The target of `prompt + speech` is the LLM's own response to `prompt + transcript`
(a targets JSONL written by `speechlm-generate`, or the task's computable answer in the
toy world), over several tasks, with part of the content interleaved (some words spoken,
the rest written). Only paired speech + transcript is needed. The LLM stays frozen;
the projector trains (LoRA optional), so the text abilities cannot be forgotten.

Variants: `toy` (the demo's toy world in the folder `out`, see `configs/toyworld.py`),
`tiny` (toy-world tasks with computable answers, CPU), `paper` (Whisper-large-v3
+ `llm`, projector only, lr 1e-4, imitation over ASR, continuation and `tasks`, half of
the examples interleaved).
"""

import ml_collections

from speechlm_jax.configs import toyworld
from speechlm_jax.configs.base import base_config, parse_arg, real, tiny
from speechlm_jax.toyworld.tasks import SEEN_TASKS

TINY_TASKS = ("first_word", "last_word", "count_words", "repeat")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(
        arg, variant="paper", llm="qwen2.5-7b", data_dir="", weights_dir="", targets="", out=toyworld.DEMO_OUT
    )
    c = base_config()
    c.recipe = "mtbi"
    c.loss.name = "behavior_imitation"
    c.train.trainable = "projector"
    c.optimizer.lr.projector = 1e-4
    c.data.kinds = ml_collections.ConfigDict({"imitation": 0.6, "continuation": 0.2, "asr": 0.2})
    c.data.interleave_prob = 0.5
    c.data.interleave_ratio = 0.5
    if a.targets:
        c.data.targets = (a.targets,)
    if a.variant == "toy":
        # The teacher's own answers on the seen tasks, half the examples interleaved, some ASR;
        # projector only (the LLM stays frozen).
        c = toyworld.recipe(c, a.out)
        c.data.kinds = ml_collections.ConfigDict({"imitation": 0.8, "asr": 0.2})
        c.data.tasks = SEEN_TASKS
        c.data.targets = toyworld.targets(a.out)
        c.data.use_task_answer = False
        c.data.interleave_prob = 0.5
        c.data.max_slots = 2  # every slot is a whole bucket of audio through the encoder
        return c
    if a.variant == "tiny":
        c = tiny(c, a.data_dir)
        c.data.kinds = ml_collections.ConfigDict({"imitation": 0.8, "asr": 0.2})
        c.data.tasks = TINY_TASKS
        c.data.use_task_answer = True
        c.optimizer.lr.projector = 1e-2
        return c
    if a.variant == "paper":
        c = real(c, a.llm, weights_dir=a.weights_dir, data_dir=a.data_dir)
        c.data.tasks = ("continuation",)
        c.train.steps, c.train.batch_size = 20_000, 64
        c.optimizer.warmup_steps = 1000
        return c
    raise ValueError(f"unknown variant {a.variant!r}; one of tiny, toy, paper")

"""The trainer's pipeline configs of a run with conversations: training reads them, held-out
evaluation reads only the held-out ones."""

from speechlm_jax.configs.base import base_config
from speechlm_jax.train.data import pipeline_config


def test_heldout_evaluation_never_reads_the_training_conversations():
    config = base_config()
    config.data.conversation_sources = ("/data/chats.jsonl",)
    config.data.conversation_weight = 0.5
    train = pipeline_config(config)
    assert train.conversation_sources == ("/data/chats.jsonl",) and train.conversation_weight == 0.5
    assert train.task_names[-1] == "conversation"
    heldout = pipeline_config(config, heldout=True)
    assert heldout.conversation_sources == () and heldout.conversation_weight == 0.0
    config.data.eval_conversation_sources = ("/data/heldout_chats.jsonl",)
    heldout = pipeline_config(config, heldout=True)
    assert heldout.conversation_sources == ("/data/heldout_chats.jsonl",) and heldout.conversation_weight == 0.5

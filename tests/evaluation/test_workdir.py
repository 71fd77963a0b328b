"""speechlm-eval on a trained workdir: the trainer's checkpoint is restored and every benchmark runs.

The run trains the projector only (no LoRA), so with `--oracle` the student sees exactly what
the base LLM reads: the report must show gap 0 on every split and M = F = 0.
"""

import pytest

from speechlm_jax.configs import asr as asr_config
from speechlm_jax.evaluation import main as eval_main
from speechlm_jax.toyworld.corpus import build_tiny_corpus
from speechlm_jax.toyworld.sentences import sentences
from speechlm_jax.toyworld.tasks import HELDOUT_TASKS, SEEN_TASKS
from speechlm_jax.train import trainer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    corpus = build_tiny_corpus(root / "corpus", train_sentences=8, heldout_sentences=2)
    config = asr_config.get_config(f"tiny,data_dir={corpus}")
    config.model.lora.rank = 0
    config.train.trainable = "projector"
    config.train.steps = 2
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.progress_bar = False
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    trainer.train(config, root / "wd")
    return root / "wd"


def test_oracle_eval_of_a_trained_run(workdir, tmp_path):
    (tmp_path / "sentences.txt").write_text(sentences("heldout", 1, seed=0)[0] + "\n")
    (tmp_path / "corpus.txt").write_text(sentences("heldout", 1, seed=1)[0] + "\n")
    result = eval_main.run(
        eval_main.parse_request(
            [
                "--workdir",
                str(workdir),
                "--oracle",
                "--task_modules",
                "speechlm_jax.toyworld.tasks",
                "--generalisation",
                str(tmp_path / "sentences.txt"),
                "--seen_tasks",
                ",".join(SEEN_TASKS),
                "--heldout_tasks",
                ",".join(HELDOUT_TASKS),
                "--corpus",
                str(tmp_path / "corpus.txt"),
                "--asr",
                "--asr_limit",
                "2",
                "--ctc_asr",
                "--cascade",
                "--max_new_tokens",
                "3",
                "--batch_size",
                "8",
            ]
        )
    )
    assert result["model"]["step"] == 2 and result["model"]["recipe"] == "asr"
    assert set(result["generalisation"]) == {"seen_tasks/train_prompts", "seen_tasks/heldout_prompts", "heldout_tasks"}
    assert all(split["overall"]["gap"] == 0.0 for split in result["generalisation"].values())
    # Without item files, retention covers every toy task; no adapter, so nothing is forgotten.
    assert result["retention"]["overall"]["items"] == 14 and result["retention"]["overall"]["drop"] == 0.0
    assert abs(result["diagnostics"]["misalignment"]["per_token"]) < 1e-6
    assert abs(result["diagnostics"]["forgetting"]["per_token"]) < 1e-6
    assert result["asr"]["utterances"] == 2
    assert result["ctc_asr"]["utterances"] == 2 and 0.0 <= result["ctc_asr"]["cer"]
    assert set(result["cascade"]) == set(result["generalisation"])
    assert all(0.0 <= c["overall"]["cascade"] <= 1.0 for c in result["cascade"].values())
    for name in ("report.json", "report.md", "gap_per_task.png", "text_vs_speech.png", "training_curves.png"):
        assert (workdir / name).is_file()

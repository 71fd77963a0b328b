"""The toy world's shared settings: model shapes, data paths under the demo folder, step counts.

`make demo` (`python -m speechlm_jax.demo.main`) grows a whole speech LLM on two CPU
cores in minutes: a tiny text LLM (the teacher) trained from scratch on the toy tasks, a
tiny Whisper-architecture encoder pretrained on the synthesised speech with an ASR
objective, a connector-alignment run (CTC through the frozen teacher's own head), and then
the four recipes, each starting from that aligned connector. Every stage is a run of the
project's trainer; this module only says how big and how long.

    teacher(out)          text SFT of the whole LLM on every toy task (train phrasings,
                          train sentences): a VoiceTextBlender mixture that is all text
    encoder_pretrain(out) CTC of encoder + projector through a small separate decoder's
                          head, all trainable, on the training speech and the encoder's
                          own sentences (the stand-in for Whisper's own pretraining);
                          only the encoder is kept
    recipe(c, out)        what every recipe's `:toy` variant shares: the teacher as the
                          frozen LLM, the aligned connector (`configs/align.py:toy`, which
                          calls it with aligned=False) with the CTC length adapter, the toy
                          corpus, the shapes

Paths: `out` is the demo folder (absolute); its stages are laid out by
`speechlm_jax.demo.build` (`corpus/`, `speech/`, `teacher/`, `encoder/`, `align/`, `targets/`).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from speechlm_jax.configs.base import base_config
from speechlm_jax.models.frontend import audio_token_count

DEMO_OUT = "demo_out"
TASK_MODULE = "speechlm_jax.toyworld.tasks"  # registers the toy tasks (`data.task_modules`)

# Corpus sizes: training sentences (text for the teacher, speech for everything else) and
# held-out sentences (evaluation only; disjoint by construction, `toyworld.sentences`).
TRAIN_SENTENCES = 2000
HELDOUT_SENTENCES = 200
# And 4,000 more training sentences spoken for the encoder's CTC pretraining alone (`encoder.txt`;
# the stand-in for the far larger speech a real encoder is pretrained on). Trained on the 2,000 alone
# the encoder reached a training loss of 0.003 and guessed words from the sentences it had learnt
# (`valley` for `slowly`): 8.2% WER, 49.5% of utterances exact. On 6,000, the same 2,400 steps
# read 4.0% WER, 72.5% exact (README, the toy world's table).
ENCODER_SENTENCES = 4000
EVAL_SENTENCES = 32  # held-out sentences per task in the generalisation benchmark (128 held-out-task items)
ASR_EVAL_UTTERANCES = 32
# The teacher's text data asks every task once per training sentence, and the copying tasks
# six times (every training phrasing): whole-sentence answers need a copying (induction)
# mechanism, which a small model trained from scratch forms late, and every speech recipe
# needs it too (reading words off audio frames in order). Measured at 1500 teacher steps:
# three times each 56% text accuracy, six times 74%, ten times 65%.
TEXT_SFT_ASKS = {"repeat": 6, "reverse": 6}
# And beside the tasks, language modelling on random word sequences that repeat (`copy_lm.jsonl`,
# `toyworld.corpus.write_copy_sequences`; a quarter of the teacher's rows): the copying a real
# LLM brings from pretraining. Copying forms in a sudden drop of the loss, somewhere between
# steps 1,400 and 3,000 and later in some seeds than others; `TEACHER_STEPS` leaves room for it.
# Measured (README, the toy world's experiments): at 3,500 steps text 84.2% (repeat 18.8) without
# them, 94.2 / 84.4% with them (two draws of the sequences); at 5,000 steps 92.9 / 91.5% (two seeds).
COPY_SEQUENCES = 16000
# Several voices, rates and pitches so the encoder cannot key on one speaker.
VOICE_NAMES = ("en-us", "en-gb", "en-us+f3", "en+m3", "en-gb-scotland+f2", "en-029+m1")
VOICE_RATES = (150, 190)
VOICE_PITCHES = (35, 65)

# The teacher: a Llama-style decoder over the word-level tokenizer (about 450 words).
TEACHER_LLM = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# The speech encoder (Whisper architecture, 80 mels) and the ASR decoder it is pretrained with.
ENCODER = dict(
    model_type="whisper",
    num_mel_bins=80,
    d_model=128,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=256,
    max_source_positions=1500,
)
ASR_DECODER = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# Projector downsampling, for the encoder's CTC pretraining and the connector alike: 12.5
# frames/s, about 3.5 frames per word (at 6.25 frames/s, 12% of words got no frame of their
# own); the recipes' length adapter pools them to about one position per word.
DOWNSAMPLE = 4
# A strided convolution 16 encoder frames wide: each output frame (80 ms apart) hears 320 ms, about a word.
PROJECTOR_WIDTH = 16
# The connector's projector (the alignment run's and so every recipe's) is twice the teacher's width
# inside: its greedy CTC readout through the teacher's head read 12.7% WER after 500 steps, against
# 15.3% at 128, in the same seconds (README, the toy world's table).
CONNECTOR_HIDDEN = 256
BLANK_ID = 0  # CTC's blank: the word tokenizer's <pad>, never in a transcript

# Static shapes: clips are at most 5 s (the slowest voice reads ten words in about 4 s). An
# example holds a clip's audio positions and at most 32 text positions (prompt, answer, template).
SPEECH_SECONDS = (3, 5)


def speech_buckets(downsample: int) -> tuple[tuple[int, int], ...]:
    """The (samples, positions) buckets of speech examples at projector downsampling `downsample`."""
    buckets = []
    for seconds in SPEECH_SECONDS:
        samples = 16000 * seconds
        positions = audio_token_count(samples, downsample) + 32
        buckets.append((samples, -(-positions // 8) * 8))
    return tuple(buckets)


TEXT_BUCKETS = ((3200, 24), (3200, 40))
TEACHER_TOKENS = 48

TARGET_SHARDS = 4

TEACHER_STEPS = 5000
# The two runs that train from scratch, the teacher and the encoder, warm up over 300 steps (the
# others, 30). The teacher (lr 3e-3) read 96.0 / 93.1% text accuracy in two seeds (repeat 96.9 /
# 96.9, reverse 96.9 / 84.4) against 92.9 / 91.5% with 30; the encoder at lr 3e-3 read 8.3 / 15.3%
# WER in two seeds against 16.3% (seed 0, 30 steps at 2e-3) on the same speech, and 12.6% at 5e-3.
FROM_SCRATCH_WARMUP = 300
ENCODER_STEPS = 2400  # 1,600: WER 15.9%; 2,400: 13.9% (as long as the teacher's branch takes beside it)
# The encoder's CTC pretraining with a 30-step warmup: at 5e-3 two runs on the same config read at
# 24.3% and 43.8% WER (their losses part at step 400) and another seed at 18.4%; at 2e-3, 17.6%.
ENCODER_LR = 3e-3
ALIGN_ENCODER_LR = 5e-3  # the encoder's rate in the alignment run (measured there at this value)
RECIPE_STEPS = 100
ALIGN_STEPS = 500
PROJECTOR_LR = 5e-3  # a fresh projector (the alignment run's)
# A recipe's projector starts aligned: at 5e-3 mtbi fell from 73 to 33% on seen tasks in 500
# steps, at 3e-4 to 69%; at 5e-5 it keeps what the alignment gave (README, the toy world's table).
ALIGNED_PROJECTOR_LR = 5e-5
# The length adapter's posterior is sharpened (logits / 0.1): mtbi from the demo's aligned connector
# read 83.4 / 73.4 / 73.4% (seen / held-out phrasings / held-out tasks), the cascade's own figures on
# the same items, against 79.7 / 70.9 / 67.2% at 1.0, where a frame the head is unsure of enters the
# teacher as a blend of embeddings it never saw as input (README, the toy world's table).
ADAPTER_TEMPERATURE = 0.1
BATCH_SIZE = 32
SPEECH_BATCH_SIZE = 16

# SALAD's stage 2 on the demo's salad run (`speechlm-select`, the `salad+stage2` row): a "web"
# corpus of toy training sentences the speech does not hold, clustered, probed; the texts drawn
# at P(c) ∝ P_web(c) M(c)^gamma up to a tenth of the stage-1 speech, spoken, and stage 2 run from
# the step-80 checkpoint (before the decay) for as many steps as stage 1, the new speech entering
# its mixture 4 times (about a quarter of the speech it reads; once, it would be a twelfth).
STAGE2_CORPUS = 2000
STAGE2_CLUSTERS = 32
STAGE2_PROBES = 12  # probe texts per cluster
STAGE2_GAMMA = 5.0
STAGE2_BUDGET_FRACTION = 0.1
STAGE2_STEPS = RECIPE_STEPS
STAGE2_REPEAT = 4


def paths(out: str | Path) -> dict[str, str]:
    """Where every stage of the demo reads and writes, under the (absolute) demo folder."""
    out = Path(out).absolute()
    return {
        "tokenizer": str(out / "corpus" / "tokenizer"),
        "text_sft": str(out / "corpus" / "text_sft.jsonl"),
        "copy_lm": str(out / "corpus" / "copy_lm.jsonl"),
        "speech": str(out / "speech" / "train" / "manifest.jsonl"),
        "speech_heldout": str(out / "speech" / "heldout" / "manifest.jsonl"),
        "speech_encoder": str(out / "speech" / "encoder" / "manifest.jsonl"),
        "teacher_run": str(out / "teacher" / "run"),
        "teacher": str(out / "teacher" / "hf"),
        "encoder_run": str(out / "encoder" / "run"),
        "encoder": str(out / "encoder" / "hf"),
        "align": str(out / "align" / "run"),
        "targets": str(out / "targets" / "shards"),
        "recipes": str(out / "recipes"),
        "xla_cache": str(out / "xla_cache"),
    }


def _common(c: ml_collections.ConfigDict, out: str | Path) -> ml_collections.ConfigDict:
    """CPU settings every toy run shares: float32, single-host, small logging intervals."""
    p = paths(out)
    c.model.dtype = c.model.param_dtype = c.model.frozen_dtype = "float32"
    c.model.projector.downsample = DOWNSAMPLE
    c.model.projector.kind = "conv"
    c.model.projector.width = PROJECTOR_WIDTH
    c.train.batch_size = BATCH_SIZE
    c.train.log_every = 25
    c.train.eval_every = 0
    c.train.compilation_cache = p["xla_cache"]
    c.optimizer.warmup_steps = 30
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.min_lr_ratio = 0.05
    c.loss.chunk_size = 128
    c.data.tokenizer = p["tokenizer"]
    c.data.made_by.folder = str(Path(out).absolute())
    c.data.made_by.command = f"python -m speechlm_jax.demo.main --out {c.data.made_by.folder}"
    c.data.task_modules = (TASK_MODULE,)
    c.data.teacher_tokens = TEACHER_TOKENS
    c.data.num_threads = 2
    c.data.eval_speech_sources = ({"type": "manifest", "path": p["speech_heldout"]},)
    c.model.remat = "none"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.checkpoint.every = 100_000  # the trainer saves the last step anyway
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    return c


def _shapes(c: ml_collections.ConfigDict, llm: dict, encoder: dict | str) -> ml_collections.ConfigDict:
    # A preset-name field becomes a dict of HF fields (a ConfigDict field cannot change type).
    del c.model["llm"], c.model["encoder"]
    c.model.llm = ml_collections.ConfigDict(llm) if isinstance(llm, dict) else llm
    c.model.encoder = ml_collections.ConfigDict(encoder) if isinstance(encoder, dict) else encoder
    return c


def _text_llm(c: ml_collections.ConfigDict, sources: tuple[str, ...], steps: int) -> ml_collections.ConfigDict:
    """Text-only training of the whole LLM on chat JSONL `sources`, loss on every token."""
    c.recipe = "text_sft"
    c.loss.name = "cross_entropy"
    c.model.lora.rank = 0
    c.train.trainable = "llm"
    c.train.steps = steps
    c.optimizer.lr.llm = 3e-3
    c.optimizer.warmup_steps = FROM_SCRATCH_WARMUP
    c.optimizer.weight_decay = 0.01
    c.data.text_sources = sources
    c.data.text_weight = 1.0
    # From scratch, the teacher learns the toy language from every token, not only the answers.
    c.data.text_loss = "all"
    c.data.kinds = ml_collections.ConfigDict({"asr": 1.0})
    c.data.buckets = TEXT_BUCKETS
    c.data.max_slots = 1
    c.data.eval_speech_sources = ()
    return c


def teacher(out: str | Path) -> ml_collections.ConfigDict:
    """Text SFT of the whole teacher LLM from scratch on every toy task (a VoiceTextBlender
    mixture of text only), with the copying sequences beside them (`COPY_SEQUENCES`)."""
    c = _shapes(_common(base_config(), out), TEACHER_LLM, ENCODER)
    return _text_llm(c, (paths(out)["text_sft"], paths(out)["copy_lm"]), TEACHER_STEPS)


def encoder_pretrain(out: str | Path) -> ml_collections.ConfigDict:
    """CTC pretraining of the speech encoder, read out through a projector and a small decoder's head.

    CTC supervises every audio frame directly: each projector frame learns to carry the
    word it hears (or blank), which is what the recipes' frozen encoder must offer. (ASR
    through the decoder's attention, the alternative, reached 25% token accuracy in the
    same budget, where CTC's frames spelled whole transcripts.)
    """
    p = paths(out)
    c = _common(base_config(), out)
    c = _shapes(c, ASR_DECODER, ENCODER)
    c.recipe = "ctc"
    c.loss.name = "ctc"
    c.loss.blank_id = BLANK_ID
    c.model.lora.rank = 0
    c.train.trainable = "encoder,projector,llm"
    c.train.steps = ENCODER_STEPS
    c.optimizer.lr.encoder = c.optimizer.lr.projector = c.optimizer.lr.llm = ENCODER_LR
    c.optimizer.warmup_steps = FROM_SCRATCH_WARMUP
    c.train.batch_size = SPEECH_BATCH_SIZE
    c.data.speech_sources = tuple({"type": "manifest", "path": p[key]} for key in ("speech", "speech_encoder"))
    c.data.kinds = ml_collections.ConfigDict({"asr": 1.0})
    c.data.buckets = speech_buckets(DOWNSAMPLE)
    c.data.max_slots = 1
    return c


def recipe(c: ml_collections.ConfigDict, out: str | Path, *, aligned: bool = True) -> ml_collections.ConfigDict:
    """What every recipe's `:toy` variant shares: frozen teacher, pretrained encoder, toy corpus, shapes.

    With `aligned` (every recipe; not the alignment run itself) the projector and encoder
    start from the connector-alignment run (`configs/align.py:toy`, CTC through the teacher's
    head, with its learned blank) and the CTC length adapter pools each word's frames into one
    position, read as the teacher's embeddings under the head's posterior, so all four recipes
    start from the same aligned connector, at a projector learning rate that keeps it. The
    recipe keeps its own objective, trainable groups and data kinds; its config file sets its
    toy mixture (the seen toy tasks, `SEEN_TASKS`) after this. Only shapes, paths and budgets
    are set here.
    """
    p = paths(out)
    c = _common(c, out)
    c.optimizer.lr.projector = ALIGNED_PROJECTOR_LR if aligned else PROJECTOR_LR
    c.model.projector.hidden = CONNECTOR_HIDDEN
    c = _shapes(c, p["teacher"], p["encoder"])
    c.model.llm_weights = p["teacher"]
    c.model.encoder_weights = p["encoder"]
    if aligned:
        c.model.init_from.workdir = p["align"]
        c.model.init_from.parts = "projector,encoder"
        c.model.projector.ctc_blank = True  # the aligned connector's learned blank (`configs/align.py`)
        c.model.length_adapter.enabled = True
        c.model.length_adapter.blank_id = BLANK_ID
        # Each pooled frame as the teacher's own embeddings under the head's posterior: 73% on seen
        # tasks before any recipe step, against 28% for the aligned connector's raw frames.
        c.model.length_adapter.output = "embeddings"
        c.model.length_adapter.temperature = ADAPTER_TEMPERATURE
    if c.model.lora.rank:
        c.model.lora.rank, c.model.lora.alpha = 8, 16.0
    c.train.steps = RECIPE_STEPS
    c.train.batch_size = SPEECH_BATCH_SIZE
    c.data.speech_sources = ({"type": "manifest", "path": p["speech"]},)
    c.data.buckets = speech_buckets(DOWNSAMPLE)
    return c


def targets(out: str | Path) -> tuple[str, ...]:
    """The teacher-target shard files `speechlm-generate` writes into the demo folder."""
    folder = Path(paths(out)["targets"])
    return tuple(str(folder / f"targets-{i:05d}-of-{TARGET_SHARDS:05d}.jsonl") for i in range(TARGET_SHARDS))

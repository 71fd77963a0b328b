"""The keys every recipe shares; recipes (`asr.py`, `mtbi.py`, `salad.py`, `vtb.py`) override values.

A recipe is data: which groups train, the loss and its weights, the data mixture and the
optimiser. Every key a run may set exists here, so `--config.<key>=...` of a key that is
not here fails at start with the nearest valid keys (`speechlm_jax.train.config`).

Conventions: an empty string means "unset" (ml_collections cannot override a None field
from the command line); sharding rules are strings of mesh axes ("data,fsdp", "" for
replicated); learning rates are per trainable group (`projector`, `lora`, `encoder`, `llm`).
"""

from __future__ import annotations

import ml_collections

from speechlm_jax.models.lora import LLM_ALL_LINEAR
from speechlm_jax.sharding import DEFAULT_RULES

WHISPER_ALL_LINEAR = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def _rule_string(mesh_axes: object) -> str:
    if mesh_axes is None:
        return ""
    return mesh_axes if isinstance(mesh_axes, str) else ",".join(mesh_axes)


def parse_arg(arg: str | None, **defaults: object) -> ml_collections.ConfigDict:
    """Parses a variant string `name` or `name,key=value,...` (big_vision style) against defaults."""
    parsed = ml_collections.ConfigDict(dict(defaults))
    for i, part in enumerate(p for p in (arg or "").split(",") if p):
        if "=" not in part:
            if i:
                raise ValueError(f"variant {part!r} must come first in {arg!r}")
            parsed.variant = part
            continue
        key, value = part.split("=", 1)
        if key not in parsed:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(parsed.keys())}")
        kind = type(parsed[key])
        parsed[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return parsed


def base_config() -> ml_collections.ConfigDict:
    """Every key of a training run with recipe-neutral defaults."""
    c = ml_collections.ConfigDict()
    c.recipe = "asr"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A preset name (`speechlm_jax.models.presets`), a local HF folder, or a dict of HF config fields.
    c.model.llm = "Llama-3.2-3B"
    c.model.llm_weights = ""  # HF folder with safetensors; "" = random init
    c.model.encoder = "whisper-large-v3"
    c.model.encoder_weights = ""
    # hidden / width 0 = the projector's default (d_llm / the downsample factor). ctc_blank: the
    # connector's own learned CTC blank in place of the LLM's blank token row (`loss.blank_id`) in
    # every CTC readout through the LLM's head (connector alignment, length adapter, cascade).
    c.model.projector = ml_collections.ConfigDict(
        dict(kind="frame_stack", downsample=4, hidden=0, activation="gelu", use_bias=False, width=0, ctc_blank=False)
    )
    # The CTC length adapter: about one position per token, by the LLM head's greedy labels of the
    # projector frames (blank = `blank_id`); for a connector CTC-aligned to this LLM. output:
    # "frames" (each token's frames mean-pooled) or "embeddings" (the LLM's input embeddings
    # weighted by the head's posterior of each pooled frame, softmax at `temperature`).
    c.model.length_adapter = ml_collections.ConfigDict(
        dict(enabled=False, blank_id=0, output="frames", temperature=1.0)
    )
    # SpecAugment of the training audio (Park et al., 2019; `models.frontend.SpecAugment`): masks per
    # utterance of up to `*_width` log-mel bins / frames (10 ms each); 0 masks = off. Evaluation,
    # generation and teacher targets never mask.
    c.model.spec_augment = ml_collections.ConfigDict(dict(freq_masks=0, freq_width=27, time_masks=0, time_width=100))
    # Start parts of the model from an earlier run's checkpoint (`train.init_from`): "" = no.
    c.model.init_from = ml_collections.ConfigDict(dict(workdir="", parts="projector", step=0))
    # Targets are regexes searched in each part's own module paths (`layers/3/attn/q_proj`; with
    # model.scan_layers `layers/attn/q_proj`, one stacked module for every layer alike).
    c.model.lora = ml_collections.ConfigDict(
        dict(
            rank=0,
            alpha=16.0,
            targets=rf".*{LLM_ALL_LINEAR}$",
            encoder=False,
            encoder_targets=rf".*{WHISPER_ALL_LINEAR}$",
        )
    )
    c.model.dtype = "bfloat16"  # compute dtype; trainables are stored in param_dtype
    c.model.param_dtype = "float32"  # the trainable parameters
    c.model.frozen_dtype = "bfloat16"  # the frozen base (halves its memory; matmuls run in `dtype` anyway)
    c.model.remat = "none"
    # How the LLM and the encoder attend (models/layers.py ATTENTION): einsum (the reference, every
    # score formed), dot_product (jax.nn.dot_product_attention, JAX picks the kernel), cudnn (NVIDIA GPUs).
    c.model.attention = "einsum"
    # The LLM's and the encoder's layers as one scanned layer over stacked weights: compile time does
    # not grow with depth. Checkpoints (and PEFT adapters) keep the form they were written in.
    c.model.scan_layers = False

    c.train = ml_collections.ConfigDict()
    c.train.trainable = "projector,lora"
    c.train.steps = 10_000
    c.train.batch_size = 32  # global, per optimizer step
    c.train.grad_accum = 1  # microbatches per step (lax.scan)
    c.train.nonfinite = "stop"  # or "skip": keep the previous state and go on
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    c.train.progress_bar = True
    c.train.fast_compile = False  # skip XLA's expensive optimisation passes (tests, debugging)
    c.train.compilation_cache = ""  # a directory: XLA programs persist there, so a restart skips compiling
    # Weights & Biases (train/wandb_run.py): on when `project` is set; mode "" = $WANDB_MODE, else offline.
    c.train.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = ml_collections.ConfigDict(dict(projector=1e-4, lora=1e-4, encoder=1e-5, llm=5e-5))
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 500
    c.optimizer.decay_fraction = 0.1  # warmup_stable_decay: the final fraction of steps that decays
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.clip_norm = 1.0  # global norm over every trainable group; 0 = off

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "cross_entropy"  # cross_entropy | behavior_imitation | salad | ctc
    c.loss.blank_id = 0  # ctc: a token id no transcript contains (the tokenizer's pad)
    c.loss.alpha = 1.0  # salad: weight of the KL term; 1 - alpha weighs the NLL
    c.loss.temperature = 1.0
    c.loss.direction = "forward"  # KL(teacher || student) | reverse | jsd
    c.loss.jsd_beta = 0.5  # direction=jsd: m = b teacher + (1 - b) student; 0.5 is the symmetric JSD
    c.loss.label_smoothing = 0.0  # cross_entropy, behavior_imitation: uniform smoothing eps
    c.loss.z_loss = 0.0  # cross_entropy, behavior_imitation: weight of logsumexp(logits)^2 (PaLM)
    c.loss.chunk_size = 1024  # positions per unembedding chunk (the [B, T, V] logits never exist)

    # The Grain pipeline (`speechlm_jax.data.pipeline.PipelineConfig` fields); the trainer
    # sets its per-host batch size and the projector's downsample factor itself.
    c.data = ml_collections.ConfigDict()
    c.data.tokenizer = ""  # local HF tokenizer folder (the LLM's)
    # ({"type": "manifest" | "librispeech" | "tfds" | "hf" | "lhotse" | "nemo", "path": ...},); an "hf"
    # source also takes "split", "audio_column" and "text_column" (data/hf_source.py).
    c.data.speech_sources = ()
    c.data.text_sources = ()  # text-only SFT JSONL paths
    c.data.targets = ()  # teacher-response JSONL paths (behavior imitation)
    c.data.text_weight = 0.0
    c.data.text_loss = "response"  # "all": every token of text-only examples (from-scratch LLMs)
    c.data.conversation_sources = ()  # multi-turn conversation JSONL paths (`data.conversations`)
    c.data.conversation_weight = 0.0  # their fraction of the mixture
    c.data.conversation_responses = "record"  # "teacher": the teacher's answers from data.targets (MTBI, SALAD)
    c.data.eval_conversation_sources = ()  # held-out conversations (the training ones are never evaluated)
    c.data.kinds = ml_collections.ConfigDict({"asr": 1.0})
    c.data.tasks = ()
    c.data.task_modules = ()  # modules that register tasks when imported, e.g. speechlm_jax.toyworld.tasks
    c.data.use_task_answer = False
    c.data.interleave_prob = 0.0
    c.data.interleave_ratio = 0.5
    c.data.span_min = 1
    c.data.span_max = 5
    c.data.buckets = ((16000 * 8, 256), (16000 * 30, 512))  # (audio samples per slot, student tokens)
    c.data.max_slots = 4
    c.data.teacher_tokens = 512
    c.data.overlong = "drop"
    # The longest utterance read, in seconds (0: as long as the largest bucket). Past the
    # encoder's 30 s window a slot is encoded window by window: for 120 s, add buckets such as
    # (16000 * 60, 768), (16000 * 120, 1280).
    c.data.max_audio_seconds = 0.0
    c.data.num_threads = 4
    c.data.num_workers = 0
    # Held-out evaluation: other sources (empty = the training ones) and the held-out prompts.
    c.data.eval_speech_sources = ()
    c.data.eval_prompt_split = "heldout"
    # The folder the data paths lie in and the command that writes it: a missing path there
    # fails naming the command (`speechlm_jax.data.preflight.check_sources`).
    c.data.made_by = ml_collections.ConfigDict({"folder": "", "command": ""})

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = ml_collections.ConfigDict({name: _rule_string(axes) for name, axes in DEFAULT_RULES})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c


# Shapes of the `:tiny` variants: a random Llama-style LLM and Whisper-style encoder small
# enough to train on one CPU core in seconds (vocab large enough for the word tokenizer).
# The LLM is frozen and random: its normed hidden state (norm sqrt(d)) against a random
# unembedding (std 0.02) bounds the logits near sqrt(d) * 0.02 * sqrt(d), so d = 128 is
# the smallest width whose adapters can still make the next token clearly likelier.
TINY_LLM = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_ENCODER = dict(
    model_type="whisper",
    num_mel_bins=80,
    d_model=64,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=256,
    max_source_positions=1500,
)


TINY_DATA = "/tmp/speechlm_tiny_corpus"
TOY_TASK_MODULE = "speechlm_jax.toyworld.tasks"


def use_tiny_corpus(c: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
    """Reads the tiny TTS corpus in `data_dir` (any model size: the word tokenizer fits every vocabulary).

    `python -m speechlm_jax.toyworld.corpus DIR` writes that corpus (train/ and
    heldout/, text_sft.jsonl, a word-level tokenizer) with the espeak TTS.
    """
    c.data.tokenizer = f"{data_dir}/tokenizer"
    c.data.made_by.folder = data_dir
    c.data.made_by.command = f"python -m speechlm_jax.toyworld.corpus {data_dir}"
    c.data.task_modules = (TOY_TASK_MODULE,)
    c.data.speech_sources = ({"type": "manifest", "path": f"{data_dir}/train/manifest.jsonl"},)
    c.data.eval_speech_sources = ({"type": "manifest", "path": f"{data_dir}/heldout/manifest.jsonl"},)
    if c.data.text_weight > 0:
        c.data.text_sources = (f"{data_dir}/text_sft.jsonl",)
    return c


def tiny(c: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
    """Turns a recipe into its CPU variant: tiny random models on the tiny corpus in `data_dir`."""
    # A preset-name field becomes a dict of HF fields (a ConfigDict field cannot change type).
    del c.model["llm"], c.model["encoder"]
    c.model.llm = ml_collections.ConfigDict(TINY_LLM)
    c.model.encoder = ml_collections.ConfigDict(TINY_ENCODER)
    c.model.dtype = "float32"
    c.model.frozen_dtype = "float32"
    if c.model.lora.rank:
        c.model.lora.rank, c.model.lora.alpha = 4, 8.0
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.optimizer.warmup_steps = 2
    c.optimizer.clip_norm = 1.0
    c.loss.chunk_size = 32
    use_tiny_corpus(c, data_dir or TINY_DATA)
    c.data.buckets = ((16000 * 3, 96),)
    c.data.max_slots = 2
    c.data.teacher_tokens = 64
    c.data.num_threads = 1
    c.mesh.data = -1
    c.checkpoint.every = 20
    c.checkpoint.keep = 2
    return c


# Real sizes: Whisper-large-v3 with one of the decoders the recipes were published with.
REAL_LLMS = {"llama-3.2-3b": "Llama-3.2-3B", "qwen2.5-7b": "Qwen2.5-7B", "gemma-3-4b": "gemma-3-4b"}


def real(
    c: ml_collections.ConfigDict, llm: str, *, weights_dir: str = "", data_dir: str = ""
) -> ml_collections.ConfigDict:
    """Whisper-large-v3 + `llm` (a preset name) at real size, bf16 compute, FSDP over the devices.

    `weights_dir/<name>` folders hold the HF checkpoints (`speechlm-convert` or a hub download
    made elsewhere); without `weights_dir` the weights are random (shape and speed runs).
    `data_dir` reads the tiny corpus instead of the recipe's data (speed runs, smoke tests).
    """
    if llm not in REAL_LLMS:
        raise ValueError(f"unknown LLM {llm!r}; one of {sorted(REAL_LLMS)}")
    c.model.llm = REAL_LLMS[llm]
    c.model.encoder = "whisper-large-v3"
    if weights_dir:
        c.model.llm_weights = f"{weights_dir}/{llm}"
        c.model.encoder_weights = f"{weights_dir}/whisper-large-v3"
        c.data.tokenizer = f"{weights_dir}/{llm}"
    if data_dir:
        use_tiny_corpus(c, data_dir)
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = "full"
    # Gemma 3 alternates sliding and full layers, which one scanned layer cannot express.
    c.model.scan_layers = not llm.startswith("gemma")
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c
